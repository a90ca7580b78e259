"""``o2m train``: its options are TrainConfig's fields."""

from __future__ import annotations

import os
from typing import Any

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.stages.train import TrainConfig

ORDER = ("data", "out", "steps", "batch_size", "lr", "variance", "prediction_type", "denoiser_config", "cond",
         "label_dropout", "block_out_channels", "layers_per_block", "norm_num_groups", "attention_level",
         "num_train_timesteps", "ema_decay")  # --help's order; the rest follow in field order


@app.command()
@handles_errors
@options(TrainConfig, order=ORDER)
def train(**given: Any) -> None:
    """Train a DDPM teacher (diffusers UNet2DModel, or the model --model-config describes, + DDPMScheduler) with EMA
    and AdamW."""
    from o2mcli.stages.train import run_train

    # Only the options given reach the config (unset ones are left out), so the stage can tell a default from a
    # choice (--model-config refuses the built-in UNet's shape options and a --variance its config contradicts).
    values = config_values(TrainConfig, given)
    if "attention_level" in values and values["attention_level"] < 0:  # -1: none (a given None, unlike no option)
        values["attention_level"] = None
    path = run_train(TrainConfig(**values))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 wrote it and says so
        typer.echo(f"wrote {path}")
