"""``o2m distill``: its options are DistillConfig's fields (every mode's own options among them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.stages.distill import DistillConfig

# --help's order (DistillConfig keeps its fields' order: mode options first).
ORDER = ("template", "mode", "teacher", "students", "boundaries", "p_own", "kd", "alpha", "init", "data", "rho",
         "init_steps", "init_batch", "kl_weight", "buffer_guidance", "student_config", "label_dropout", "prompts",
         "pipeline", "latent_cache", "prediction_type", "steps", "batch_size", "lr", "lr_warmup", "ema_decay", "seed",
         "device", "save_every", "log_every", "resume", "out", "force")


@app.command()
@handles_errors
@options(DistillConfig, order=ORDER)
def distill(**given: Any) -> None:
    """Distil a teacher into K students: O2MKD on data (O2OKD with K=1), or DKDM with no data at all."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.stages.distill import run_distill

    values = config_values(DistillConfig, given)
    if "template" not in values and values["student_config"] is None:
        values["template"] = str(find_newest_model(Path("."), kinds=("template",)))
    if "out" not in values and not values["resume"]:  # --resume: ./students, the field's default
        values["out"] = default_output(Path("."), "students")
    cfg = DistillConfig(**values)
    path = run_distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        s = read_manifest(path, verify=False).summary
        losses = ", ".join(f"{f.get('loss', float('nan')):.4f}" for f in s["final"])
        typer.echo(f"wrote {path}: {cfg.students} students over {s['ranges']} in {s['seconds']:.1f} s "
                   f"({s['student_images_per_s']:.1f} student img/s); final losses {losses}")
