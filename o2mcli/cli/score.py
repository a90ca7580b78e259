"""``o2m score``: its options are ScoreConfig's fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.stages.score import ScoreConfig


@app.command()
@handles_errors
@options(ScoreConfig)
def score(**given: Any) -> None:
    """FID/KID (clean-fid), CLIP score, params, MACs and throughput of sampled models, as a Table-1-style report."""
    from o2mcli.chain import find_newest_samples
    from o2mcli.outputs import default_output
    from o2mcli.scoring.report import markdown_table
    from o2mcli.stages.score import run_score

    values = config_values(ScoreConfig, given)
    if "samples" not in values:
        values["samples"] = [find_newest_samples(Path("."))]
    if "out" not in values:
        values["out"] = default_output(Path("."), "scores")
    path = run_score(ScoreConfig(**values))
    report = json.loads((path / "report.json").read_text())
    typer.echo(markdown_table(report["rows"]))
    typer.echo(f"wrote {path}")
