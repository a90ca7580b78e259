"""The options every command shares (device, seed, force, out), declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only one o2m wrote; never an "
                                                     "input).")]


def seed_option(what: str = "Seeds every random draw of the run.") -> Any:
    """``--seed`` with what it seeds in this command."""
    return typer.Option("--seed", help=what)


def out_option(what: str) -> Any:
    """``-o/--out`` with what this command writes there."""
    return typer.Option("-o", "--out", help=what)


def stage_out(kind: str) -> Any:
    """``-o/--out`` of a stage directory that defaults to ``./KIND`` (or ``KIND-2``, ...: never overwritten)."""
    return out_option(f"Stage directory; default ./{kind} (or {kind}-2...).")


Seed = Annotated[int, seed_option()]
OptionalOut = Optional[Path]
