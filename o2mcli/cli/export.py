"""``o2m export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel, Field

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import options
from o2mcli.parsing import cli
from o2mcli.stages import fields


class ExportOptions(BaseModel):
    model: str = Field(json_schema_extra=cli(argument=True),
                       description="Model file or directory (one UNet), or digits-teacher.")
    out: Path = Field(json_schema_extra=cli("-o", "--out"), description="Diffusers pipeline directory to write.")
    force: bool = fields.force()
    pipeline: Optional[Path] = Field(None, description="Stable Diffusion models: the pipeline whose VAE, text encoder "
                                     "and tokenizer go with the UNet (default: the one the model records; checked by "
                                     "sha256).")


@app.command()
@handles_errors
@options(ExportOptions)
def export(**given: Any) -> None:
    """Write a diffusers pipeline directory that plain diffusers loads offline: a DDPMPipeline (unet/ + scheduler/),
    for a Stable Diffusion UNet a StableDiffusionPipeline with its teacher's VAE, text encoder and tokenizer, or for a
    DiT (no pixel-space pipeline in diffusers) a model directory that DiTTransformer2DModel.from_pretrained loads."""
    import json

    from o2mcli.chain import resolve_model_spec
    from o2mcli.outputs import reserve_output
    from o2mcli.models.io import export_pipeline, load_model

    o = ExportOptions(**given)
    model, out, force, pipeline = o.model, o.out, o.force, o.pipeline
    reserve_output(out, force, inputs=[model, pipeline])
    loaded = load_model(resolve_model_spec(model), "cpu")
    lo, hi = loaded.ranges[0]
    path = export_pipeline(loaded, out, force=force, pipeline=pipeline)
    if not loaded.is_group and (lo, hi) != (0, loaded.num_train_timesteps):
        typer.echo(f"warning: {model} was trained for timesteps [{lo}, {hi}) only; the pipeline samples all "
                   f"{loaded.num_train_timesteps}", err=True)
    # A pipeline names its class in model_index.json; a model directory (a DiT: no pixel-space pipeline) in config.json.
    index = path / "model_index.json"
    kind = json.loads((index if index.is_file() else path / "config.json").read_text()).get("_class_name", "pipeline")
    typer.echo(f"wrote {path} (diffusers {kind})")
