"""``o2m info``."""

from __future__ import annotations

from typing import Any

import typer
from pydantic import BaseModel, Field

from o2mcli.cli.app import app, fail, handles_errors
from o2mcli.cli.options import options
from o2mcli.parsing import cli


class InfoOptions(BaseModel):
    path: str = Field(json_schema_extra=cli(argument=True),
                      description="A stage directory, a model file or diffusers directory, or digits-teacher.")
    as_json: bool = Field(False, json_schema_extra=cli("--json"), description="Print machine-readable JSON.")


@app.command()
@handles_errors
@options(InfoOptions)
def info(**given: Any) -> None:
    """Show what a stage directory or model holds: kind, config, parents, artifacts, models, summary."""
    from o2mcli.inspect import describe, format_text, to_json

    opts = InfoOptions(**given)
    d = describe(opts.path)
    typer.echo(to_json(d) if opts.as_json else format_text(d))
    integrity = d.get("integrity", "ok")
    if integrity != "ok":  # the description is printed, and a script still sees the failure
        fail(f"{opts.path}: integrity check failed: {integrity}")
