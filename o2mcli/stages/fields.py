"""Fields that several stage configs share, each declared once: its default, its checks and its ``--help``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from o2mcli.parsing import cli


def seed(what: str = "Seeds every random draw of the run.") -> Any:
    """``--seed``, with what it seeds in this stage (torch.Generator takes 64-bit seeds)."""
    return Field(0, ge=0, lt=2**63, description=what)


def device() -> Any:
    return Field("auto", description="auto, cpu, cuda or cuda:N.")


def force() -> Any:
    return Field(False, description="Replace an existing output (only one o2m wrote; never an input).")


def resume() -> Any:
    return Field(False, description="Continue an interrupted run of the same output.")


def save_every() -> Any:
    return Field(500, ge=1, description="Checkpoint interval (steps).")


def log_every() -> Any:
    return Field(50, ge=1, description="Metrics interval (steps).")


def ema_decay() -> Any:
    return Field(0.999, ge=0, lt=1)


def stage_out(kind: str) -> Any:
    """``-o/--out``: a stage directory, by default ``./KIND`` (or ``KIND-2``, ...: the command picks a free one)."""
    return Field(Path(kind), description=f"Stage directory; default ./{kind} (or {kind}-2...).",
                 json_schema_extra=cli("-o", "--out", unset=True))


def internal(default: Any, **checks: Any) -> Any:
    """A setting of the library with no option."""
    return Field(default, **checks, json_schema_extra=cli(internal=True))
