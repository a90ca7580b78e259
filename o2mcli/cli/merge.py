"""``o2m merge``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Force


@app.command()
@handles_errors
def merge(
    inputs: Optional[List[str]] = typer.Argument(None, help="A students directory (o2m distill's output), or "
                                                 "student files; default: the newest students directory here."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="A .safetensors file (default merged.safetensors, "
                                       "or merged-2.safetensors...) or a directory."),
    method: str = typer.Option("task-arithmetic", help="task-arithmetic (theta_0 + lambda sum w_k task vectors) or "
                                                       "average (weighted mean)."),
    lam: Optional[str] = typer.Option(None, "--lambda", help="Task-vector scale; default 1/K (the plain average)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Per-student weights w_k, e.g. 1,1,2,1."),
    force: Force = False,
) -> None:
    """Merge the K students of one run into one UNet by task arithmetic."""
    from o2mcli.chain import find_newest_model
    from o2mcli.stages.merge import MergeConfig, run_merge

    if not inputs:
        inputs = [str(find_newest_model(Path("."), kinds=("students",)))]

    if out is None:
        from o2mcli.outputs import default_output

        out = default_output(Path("."), "merged", ".safetensors")
    cfg = MergeConfig(inputs=tuple(inputs), out=out, method=method,
                      lam=lam, weights=weights,
                      force=force)
    path = run_merge(cfg)
    typer.echo(f"wrote {path}: {cfg.method} of the students in {', '.join(inputs)}")
