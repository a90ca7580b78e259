"""``o2m distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Device, Force, Seed, stage_out


@app.command()
@handles_errors
def distill(
    template: Optional[str] = typer.Argument(None, help="Template (o2m prune's output) or any student-shaped model; "
                                                        "default: the newest template in the current directory."),
    mode: str = typer.Option("o2mkd", help="o2mkd (real data; K=1 or --p-own 0 is O2OKD) or dkdm (data-free)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher; default: the one the template was pruned from."),
    students: Optional[int] = typer.Option(None, "--students", "-k", help="K students, each owning a contiguous "
                                           "timestep range. Default: 4 with --mode o2mkd; 1 with --mode dkdm (DKDM's "
                                           "single student; -k 4 there is data-free O2MKD)."),
    boundaries: Optional[str] = typer.Option(None, help="Custom ranges, e.g. 0,200,450,700,1000 (default uniform)."),
    p_own: float = typer.Option(0.5, "--p-own", help="Per step, probability a student trains on its own range "
                                                     "(else on all timesteps)."),
    kd: str = typer.Option("output", help="KD loss: output (Hinton), at (attention transfer), sp "
                                          "(similarity-preserving), crd (contrastive), feat (BK-SDM: output + "
                                          "block-output features), none (no KD: plain training "
                                          "on the data, the teacher never runs)."),
    alpha: float = typer.Option(1.0, help="Weight of the KD loss against the plain diffusion loss."),
    init: str = typer.Option("template", help="Start the students from the template or from the teacher."),
    data: Optional[str] = typer.Option(None, "--data", help="o2mkd: 'digits' (default) or a folder of images (for "
                                                            "Stable Diffusion: with metadata.jsonl captions); dkdm "
                                                            "takes none."),
    rho: float = typer.Option(0.4, help="dkdm: the buffer holds rho*T*b noisy samples."),
    init_steps: Optional[int] = typer.Option(None, "--init-steps", help="dkdm: reach each slot's t with an S-step "
                                             "DDIM jump instead of exact ancestral shuffle denoise."),
    init_batch: int = typer.Option(1024, "--init-batch", help="dkdm: teacher batch while building the buffer."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="dkdm: weight of KL(p_T || p_S) (learned variances)."),
    buffer_guidance: float = typer.Option(1.0, "--buffer-guidance", metavar="W",
                                          help="dkdm, conditional teacher: classifier-free guidance weight of the "
                                          "teacher steps that move buffer slots (the build and every training "
                                          "step; one more teacher forward each), so the slots follow the guided "
                                          "trajectories that sampling at --guidance W visits. The KD target stays "
                                          "the teacher's conditional prediction, since sampling guides the "
                                          "students' own branches. Default 1: no guidance (W <= 1 is none), as in "
                                          "DKDM's paper (unconditional teachers) and o2m's published results."),
    student_config: Optional[Path] = typer.Option(None, "--student-config", help="A diffusers model config JSON "
                                                  "(UNet2DModel, or another family by _class_name, e.g. "
                                                  "DiTTransformer2DModel): fresh students of any shape, random init "
                                                  "(needs --teacher; for a class-conditional teacher, a label table "
                                                  "of its classes: num_class_embeds K+1, num_embeds_ada_norm K)."),
    label_dropout: Optional[float] = typer.Option(None, "--label-dropout", help="Conditional teacher: "
                                                  "probability a batch label or caption (o2mkd) or buffer slot's "
                                                  "label or prompt (dkdm) is the null class or empty prompt, so "
                                                  "students learn both guidance branches. Default: the teacher's own "
                                                  "training dropout (Stable Diffusion: 0.1)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="dkdm under a Stable Diffusion teacher: a prompt "
                                           "file (one per line); every buffer slot is a latent with one prompt."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Stable Diffusion teacher: the pipeline whose "
                                           "VAE and text encoder to use (default: the one the teacher records; "
                                           "sha256-checked)."),
    latent_cache: Optional[Path] = typer.Option(None, "--latent-cache", help="Stable Diffusion teacher: where the "
                                                "captioned --data's latents and text embeddings are cached (default: "
                                                "beside the output, DATA.latents-RES; reused when it matches)."),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="What the students output: "
                                                  "epsilon (eps) or v_prediction (v). Default: what the template "
                                                  "(or --init teacher) outputs. KD and the diffusion loss compare in "
                                                  "the students' parametrization, the teacher's output converted "
                                                  "exactly (an eps student of a v teacher)."),
    steps: int = typer.Option(1000, help="Optimizer steps (every student takes one per step)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch per student per step (per process)."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate (linear warm-up)."),
    lr_warmup: int = typer.Option(100, "--lr-warmup", help="Steps of linear learning-rate warm-up."),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    seed: Seed = 0,
    device: Device = "auto",
    save_every: int = typer.Option(500, "--save-every", help="Checkpoint interval (steps)."),
    log_every: int = typer.Option(50, "--log-every", help="Metrics interval (steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same output."),
    out: Annotated[Optional[Path], stage_out("students")] = None,
    force: Force = False,
) -> None:
    """Distil a teacher into K students: O2MKD on data (O2OKD with K=1), or DKDM with no data at all."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.stages.distill import DistillConfig, run_distill

    if template is None and student_config is None:
        template = str(find_newest_model(Path("."), kinds=("template",)))
    if out is None:
        out = default_output(Path("."), "students") if not resume else Path("students")
    cfg = DistillConfig(template=template, mode=mode, teacher=teacher, students=students, boundaries=boundaries,
                        p_own=p_own, kd=kd, alpha=alpha, init=init, data=data, rho=rho, init_steps=init_steps,
                        init_batch=init_batch, kl_weight=kl_weight, buffer_guidance=buffer_guidance,
                        label_dropout=label_dropout, prompts=prompts, prediction_type=prediction_type,
                        pipeline=pipeline, latent_cache=latent_cache,
                        student_config=student_config, steps=steps, batch_size=batch_size, lr=lr, lr_warmup=lr_warmup,
                        ema_decay=ema_decay, seed=seed, device=device, save_every=save_every, log_every=log_every,
                        resume=resume, out=out, force=force)
    path = run_distill(cfg)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        s = read_manifest(path, verify=False).summary
        losses = ", ".join(f"{f.get('loss', float('nan')):.4f}" for f in s["final"])
        typer.echo(f"wrote {path}: {cfg.students} students over {s['ranges']} in {s['seconds']:.1f} s "
                   f"({s['student_images_per_s']:.1f} student img/s); final losses {losses}")
