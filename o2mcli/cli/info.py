"""``o2m info``."""

from __future__ import annotations

import typer

from o2mcli.cli.app import app, fail, handles_errors


@app.command()
@handles_errors
def info(
    path: str = typer.Argument(..., help="A stage directory, a model file or diffusers directory, or digits-teacher."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what a stage directory or model holds: kind, config, parents, artifacts, models, summary."""
    from o2mcli.inspect import describe, format_text, to_json

    d = describe(path)
    typer.echo(to_json(d) if as_json else format_text(d))
    integrity = d.get("integrity", "ok")
    if integrity != "ok":  # the description is printed, and a script still sees the failure
        fail(f"{path}: integrity check failed: {integrity}")
