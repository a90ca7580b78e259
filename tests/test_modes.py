"""Distillation modes are objects behind a registry: the stage names none, and a new one is a registration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import assert_refused, cli, tiny_teacher_file
from o2mcli.distill.modes import MODES, O2MKD
from o2mcli.manifest import read_manifest
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu"]
STAGE = Path(__file__).resolve().parents[1] / "o2mcli" / "stages" / "distill.py"


@pytest.fixture
def template(tmp_path: Path) -> Path:
    teacher = tiny_teacher_file(tmp_path / "teacher.safetensors")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


def test_the_stage_tests_no_mode_by_name() -> None:
    text = STAGE.read_text()
    assert not re.search(r"""["'](o2mkd|dkdm)["']""", text.split("class DistillConfig", 1)[1].split("\n\n\n", 1)[1])
    assert "mode ==" not in text and "mode !=" not in text
    assert len(text.splitlines()) < 200


def test_a_registered_mode_runs_through_the_stage(in_tmp: Path, template: Path, monkeypatch) -> None:
    """A new mode is one class and one registration: here O2MKD with 2 students by default and a note."""

    class Halves(O2MKD):
        name = "halves"
        default_students = 2

        def summary(self, engine, init_info: dict) -> dict:
            return {"note": f"{len(engine.students)} halves"}

    monkeypatch.setitem(MODES._items, "halves", Halves)
    res = cli("distill", template, "--mode", "halves", "--steps", "2", *FAST, "-o", "h")
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "h")
    assert man.config["mode"] == "halves" and len(man.models) == 2 and man.summary["note"] == "2 halves"
    assert [m.timestep_range for m in man.models] == [(0, 500), (500, 1000)]


def test_an_unknown_mode_is_refused_with_the_choices(in_tmp: Path, template: Path) -> None:
    assert_refused(cli("distill", template, "--mode", "bogus", "--steps", "1", *FAST, "-o", "x"),
                   "--mode", "bogus", "o2mkd", "dkdm")
    assert not (in_tmp / "x").exists()
