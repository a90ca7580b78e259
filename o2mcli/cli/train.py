"""``o2m train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    variance: Optional[str] = typer.Option(None, help="fixed (C outputs; the default) or learned (2C outputs, hybrid "
                                           "loss). With --model-config, the config's out_channels decide."),
    prediction_type: str = typer.Option("epsilon", "--prediction-type", help="What the model learns to output: "
                                        "epsilon (eps, the noise) or v_prediction (v, Salimans & Ho 2022)."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="A diffusers model config (JSON) to "
                                                "train instead of the built-in UNet: its _class_name picks the "
                                                "family (UNet2DModel without one, DiTTransformer2DModel, ...)."),
    cond: str = typer.Option("none", "--cond", help="none, or class: a class-conditional teacher from the data's "
                             "labels (the digits, or a folder with one subfolder per class)."),
    label_dropout: float = typer.Option(0.1, "--label-dropout", help="--cond class: probability a label is "
                                        "replaced by the null class, so classifier-free guidance works."),
    channels: Optional[str] = typer.Option(None, help="Built-in UNet: block_out_channels, comma-separated "
                                           "[default: 32,64,64]."),
    layers_per_block: Optional[int] = typer.Option(None, "--layers-per-block", help="Built-in UNet [default: 1]."),
    norm_groups: Optional[int] = typer.Option(None, "--norm-groups", help="Built-in UNet: GroupNorm groups "
                                              "[default: 8]."),
    attention_level: Optional[int] = typer.Option(None, "--attention-level", help="Built-in UNet: level with "
                                                  "attention blocks; -1 for none [default: 1]."),
    timesteps: int = typer.Option(1000, help="Training timesteps T."),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    seed: Seed = 0,
    device: Device = "auto",
    save_every: int = typer.Option(500, "--save-every", help="Checkpoint interval (steps)."),
    log_every: int = typer.Option(50, "--log-every", help="Metrics interval (steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same output."),
    force: Force = False,
) -> None:
    """Train a DDPM teacher (diffusers UNet2DModel, or the model --model-config describes, + DDPMScheduler) with EMA
    and AdamW."""
    from o2mcli.stages.train import TrainConfig, run_train

    # Only the options given reach the config, so the stage can tell a default from a choice (--model-config
    # refuses the built-in UNet's shape options and a --variance its config contradicts).
    given = {"variance": variance, "denoiser_config": model_config, "block_out_channels": channels,
             "layers_per_block": layers_per_block, "norm_num_groups": norm_groups}
    chosen = {k: v for k, v in given.items() if v is not None}
    if attention_level is not None:  # -1: none (a given None, unlike a missing option)
        chosen["attention_level"] = None if attention_level < 0 else attention_level
    cfg = TrainConfig(data=data, out=out, steps=steps, batch_size=batch_size, lr=lr, cond=cond,
                      label_dropout=label_dropout, num_train_timesteps=timesteps, prediction_type=prediction_type, ema_decay=ema_decay, seed=seed,
                      device=device, save_every=save_every, log_every=log_every, resume=resume, force=force,
                      **chosen)
    path = run_train(cfg)
    import os
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 wrote it and says so
        typer.echo(f"wrote {path}")
