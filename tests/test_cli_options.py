"""Every option of every command is generated from one pydantic field: its default, help and flags are written once.

The checks run on what Typer built (click parameters), so a hand-written option, a default that drifts from its
field, a field with no option or a literal ``typer.Option(DEFAULT, ...)`` in o2mcli/cli fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, Field
from typer.main import get_command

from o2mcli.cli import app
from o2mcli.cli.options import config_values, options, specs
from o2mcli.distill.modes import MODES
from o2mcli.errors import flag_name
from o2mcli.merge import MERGE_METHODS
from o2mcli.parsing import cli
from o2mcli.stages.distill import DistillConfig
from o2mcli.stages.merge import MergeConfig

CLI = Path(__file__).resolve().parents[1] / "o2mcli" / "cli"


def _commands(typer_app: typer.Typer) -> list[tuple[str, object, tuple]]:
    """(name, click command, the models its options come from) for every command and the root callback."""
    group = get_command(typer_app)
    out = [("o2m", group, typer_app.registered_callback.callback.option_models)]
    for info in typer_app.registered_commands:
        name = info.name or info.callback.__name__
        out.append((name, group.commands[name], info.callback.option_models))
    return out


def _problems(command, models: tuple) -> list[str]:
    """What differs between a click command's parameters and its models' fields."""
    problems = []
    found = specs(*models)
    params = {p.name: p for p in command.params if p.name != "help"}
    for name in params.keys() - found.keys():
        problems.append(f"{name}: an option of no field")
    for name, s in found.items():
        if s.internal:
            if name in params:
                problems.append(f"{name}: internal, yet an option")
            continue
        p = params.get(name)
        if p is None:
            problems.append(f"{name}: a field with no option (mark it internal if it is a library setting)")
            continue
        if not s.argument and tuple(p.opts + p.secondary_opts) != s.flags:
            problems.append(f"{name}: flags {p.opts} != {s.flags}")
        want = None if s.unset else (not s.field.default) if s.negate else s.field.default
        if s.required:
            if not p.required:
                problems.append(f"{name}: a required field, an optional option")
        elif p.default != want and not (p.default in ((), []) and want is None):
            problems.append(f"{name}: option default {p.default!r} != field default {want!r}")
        if getattr(p, "help", None) != s.field.description:
            problems.append(f"{name}: help is not the field's description")
    return problems


def test_every_option_is_its_field() -> None:
    commands = _commands(app)
    assert {n for n, _, _ in commands} >= {"o2m", "train", "prune", "distill", "merge", "sample", "score", "export",
                                           "info"}
    problems = {name: _problems(cmd, models) for name, cmd, models in commands}
    assert not any(problems.values()), problems


def test_the_check_fails_on_a_drifted_default_a_missing_option_and_a_hand_written_one() -> None:
    class Config(BaseModel):
        steps: int = Field(10, description="Steps.")
        lr: float = Field(1e-3, description="Rate.")

    drift = typer.Typer()

    @drift.command()
    def run(steps: int = typer.Option(11, "--steps", help="Steps."), extra: int = typer.Option(0, "--extra")) -> None:
        pass

    run.option_models = (Config,)
    problems = _problems(get_command(drift), (Config,))
    assert any("steps: option default 11 != field default 10" in p for p in problems)
    assert any(p.startswith("lr: a field with no option") for p in problems)
    assert any(p.startswith("extra: an option of no field") for p in problems)

    good = typer.Typer()

    @good.command()
    @options(Config)
    def run2(**given) -> None:
        pass

    good.command()(lambda: None)  # a group of two, so get_command keeps the names
    assert _problems(get_command(good).commands["run2"], (Config,)) == []


def _defaults_written_in(source: str) -> list[str]:
    """``typer.Option(...)`` / ``typer.Argument(...)`` calls with a default (a first positional that is not a flag,
    or ``default=``), as ``line: text``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("Option", "Argument")):
            continue
        first = node.args[0] if node.args else None
        flag = isinstance(first, ast.Starred) or (isinstance(first, ast.Constant) and isinstance(first.value, str)
                                                  and first.value.startswith("-"))
        if (first is not None and not flag) or any(k.arg in ("default", "default_factory") for k in node.keywords):
            out.append(f"{node.lineno}: {ast.unparse(node)[:80]}")
    return out


def test_no_command_writes_an_option_default() -> None:
    found = {p.name: _defaults_written_in(p.read_text()) for p in sorted(CLI.glob("*.py"))}
    assert not any(found.values()), found
    # only the generator builds options at all: a command declares none by hand
    hand = [p.name for p in CLI.glob("*.py") if p.name != "options.py" and "typer.Option(" in p.read_text()]
    assert not hand, hand


def test_the_scan_finds_a_written_default() -> None:
    assert _defaults_written_in('import typer\ndef f(x: int = typer.Option(5, "--x")): pass\n')
    assert _defaults_written_in('def f(x = typer.Argument(None, help="h")): pass\n')
    assert _defaults_written_in('def f(x = typer.Option(default=2)): pass\n')
    assert not _defaults_written_in('def f(x: Annotated[int, typer.Option("--x", "-x", help="h")] = 5): pass\n')


def test_error_messages_name_the_flag_the_field_has() -> None:
    """``--flag VALUE: why`` messages (o2mcli.errors.flag_name) name each stage field's own flag."""
    stage_configs = {m for _, _, models in _commands(app) for m in models if m.__module__.startswith("o2mcli.stages")}
    assert len(stage_configs) == 6
    for model in stage_configs:
        for field, s in specs(model).items():
            if s.internal or s.argument or s.negate:
                continue
            long = [f for f in s.flags if f.startswith("--")][0]
            assert flag_name(field) == long, (model.__name__, field, flag_name(field), long)


def test_modes_and_methods_own_their_options() -> None:
    """Each mode's (method's) options model is part of the config: its fields, defaults and help are the command's."""
    owned = {}
    for mode in MODES.values():
        if mode.options is not None:
            for f in mode.options.model_fields:
                assert DistillConfig.model_fields[f].default == mode.options.model_fields[f].default
                owned.setdefault(f, mode.name)
    assert {"rho", "init_steps", "init_batch", "kl_weight", "buffer_guidance", "prompts"} <= \
        {f for f, m in owned.items() if m == "dkdm"}
    assert owned["data"] == "o2mkd"
    assert "lam" in getattr(MERGE_METHODS["task-arithmetic"], "options").model_fields
    assert "lam" in MergeConfig.model_fields


def test_recorded_config_fields_are_unchanged() -> None:
    """Manifests record the configs and resume compares distill's fingerprint: the fields stay flat and named."""
    assert sorted(DistillConfig.model_fields) == sorted([
        "template", "teacher", "student_config", "mode", "students", "boundaries", "p_own", "kd", "alpha", "init",
        "data", "rho", "init_steps", "init_batch", "kl_weight", "prediction_type", "buffer_guidance",
        "label_dropout", "prompts", "pipeline", "latent_cache", "steps", "batch_size", "lr", "lr_warmup",
        "weight_decay", "ema_decay", "grad_clip", "vlb_weight", "seed", "device", "save_every", "log_every",
        "resume", "force", "out"])
    assert sorted(MergeConfig.model_fields) == ["force", "inputs", "lam", "method", "out", "weights"]


def test_config_values_turn_back_what_typer_parsed() -> None:
    class Config(BaseModel):
        png: bool = Field(True, json_schema_extra=cli("--no-png", negate=True))
        out: Path = Field(Path("x"), json_schema_extra=cli(unset=True))
        prompt: tuple[str, ...] | None = None

    assert config_values(Config, {"png": True, "out": None, "prompt": []}) == {"png": False, "prompt": None}
    assert config_values(Config, {"png": False, "out": Path("y"), "prompt": ["a"]}) == \
        {"png": True, "out": Path("y"), "prompt": ("a",)}


@pytest.mark.parametrize("bad", [("--rho", "0"), ("--buffer-guidance", "2")])
def test_a_dkdm_option_keeps_its_refusal(bad, in_tmp: Path) -> None:
    from conftest import assert_refused, cli as run

    assert_refused(run("distill", "digits-teacher", *bad, "--steps", "1", "-o", "x"), bad[0])
