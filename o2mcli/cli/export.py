"""``o2m export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Force, out_option


@app.command()
@handles_errors
def export(
    model: Annotated[str, typer.Argument(help="Model file or directory (one UNet), or digits-teacher.")],
    out: Annotated[Path, out_option("Diffusers pipeline directory to write.")],
    force: Force = False,
) -> None:
    """Write a diffusers DDPMPipeline directory (unet/ + scheduler/) that plain diffusers loads offline."""
    from o2mcli.chain import resolve_model_spec
    from o2mcli.fsutil import check_output_free
    from o2mcli.models.io import export_pipeline, load_model

    check_output_free(out, force, inputs=[model])
    loaded = load_model(resolve_model_spec(model), "cpu")
    lo, hi = loaded.ranges[0]
    path = export_pipeline(loaded, out, force=force)
    if not loaded.is_group and (lo, hi) != (0, loaded.num_train_timesteps):
        typer.echo(f"warning: {model} was trained for timesteps [{lo}, {hi}) only; the pipeline samples all "
                   f"{loaded.num_train_timesteps}", err=True)
    typer.echo(f"wrote {path} (diffusers DDPMPipeline)")
