"""``o2m train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Device, Force, Seed, out_option


@app.command()
@handles_errors
def train(
    data: str = typer.Option("digits", "--data", help="'digits' (bundled) or a folder of same-size images."),
    out: Annotated[Path, out_option("Stage directory, or a .safetensors file.")] = Path("teacher"),
    steps: int = typer.Option(4000, help="Optimizer steps."),
    batch_size: int = typer.Option(128, "--batch-size", "-b"),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (linear warm-up)."),
    variance: str = typer.Option("fixed", help="fixed (C outputs) or learned (2C outputs, hybrid loss)."),
    cond: str = typer.Option("none", "--cond", help="none, or class: a class-conditional teacher from the data's "
                             "labels (the digits, or a folder with one subfolder per class)."),
    label_dropout: float = typer.Option(0.1, "--label-dropout", help="--cond class: probability a label is "
                                        "replaced by the null class, so classifier-free guidance works."),
    channels: str = typer.Option("32,64,64", help="block_out_channels, comma-separated."),
    layers_per_block: int = typer.Option(1, "--layers-per-block"),
    norm_groups: int = typer.Option(8, "--norm-groups", help="GroupNorm groups."),
    attention_level: int = typer.Option(1, "--attention-level", help="Level with attention blocks; -1 for none."),
    timesteps: int = typer.Option(1000, help="Training timesteps T."),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    seed: Seed = 0,
    device: Device = "auto",
    save_every: int = typer.Option(500, "--save-every", help="Checkpoint interval (steps)."),
    log_every: int = typer.Option(50, "--log-every", help="Metrics interval (steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same output."),
    force: Force = False,
) -> None:
    """Train a DDPM teacher (diffusers UNet2DModel + DDPMScheduler) with EMA and AdamW."""
    from o2mcli.stages.train import TrainConfig, run_train

    cfg = TrainConfig(data=data, out=out, steps=steps, batch_size=batch_size, lr=lr, variance=variance,
                      cond=cond, label_dropout=label_dropout,
                      block_out_channels=channels, layers_per_block=layers_per_block,
                      norm_num_groups=norm_groups, attention_level=None if attention_level < 0 else attention_level,
                      num_train_timesteps=timesteps, ema_decay=ema_decay, seed=seed, device=device,
                      save_every=save_every, log_every=log_every, resume=resume, force=force)
    path = run_train(cfg)
    import os
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 wrote it and says so
        typer.echo(f"wrote {path}")
