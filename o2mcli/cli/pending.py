"""Stages registered before their issue lands: they refuse clearly and write nothing."""

from __future__ import annotations

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.errors import NotImplementedStage

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _pending(name: str, issue: int) -> None:
    raise NotImplementedStage(f"o2m {name} is not implemented yet (issue #{issue}); nothing was written")


@app.command(context_settings=_EXTRA)
@handles_errors
def merge(ctx: typer.Context) -> None:
    """Task-arithmetic merge of K students (not implemented yet: issue #6)."""
    _pending("merge", 6)
