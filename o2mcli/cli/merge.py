"""``o2m merge``: its options are MergeConfig's fields (every method's own options among them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.stages.merge import MergeConfig

ORDER = ("inputs", "out", "method", "lam")  # --help's order; the rest follow in field order


@app.command()
@handles_errors
@options(MergeConfig, order=ORDER)
def merge(**given: Any) -> None:
    """Merge the K students of one run into one UNet by task arithmetic."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.stages.merge import run_merge

    values = config_values(MergeConfig, given)
    if "inputs" not in values:
        values["inputs"] = (str(find_newest_model(Path("."), kinds=("students",))),)
    if "out" not in values:
        values["out"] = default_output(Path("."), "merged", ".safetensors")
    cfg = MergeConfig(**values)
    path = run_merge(cfg)
    typer.echo(f"wrote {path}: {cfg.method} of the students in {', '.join(cfg.inputs)}")
