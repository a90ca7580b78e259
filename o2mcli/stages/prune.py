"""``o2m prune``: channel-slim a teacher UNet into a student template (a plain diffusers UNet2DModel).

The output is a ``template`` stage directory:

* ``template.safetensors``: the template (self-describing o2m file; ``o2m export`` turns it into a
  diffusers directory that ``UNet2DModel.from_pretrained`` loads without o2m);
* ``manifest.json``: the full config, the teacher as ``parents[0]`` (the distill stage follows it),
  and a summary: params and MACs before and after, per block, heads kept, and the measured
  sampling throughput of template and teacher in the same run.

``--ratio R`` removes the fraction R of the channels of *every* block (``block_out_channels``
times 1-R, rounded to a multiple of ``--round-to``); MACs fall roughly as (1-R)^2.
``--target-macs`` instead picks the smallest ratio whose template fits the budget.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.chain import resolve_model_spec
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import macs

ARTIFACT = "template.safetensors"


class PruneConfig(BaseModel):
    """Every setting of a pruning run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    teacher: str
    ratio: Optional[float] = None  # checked by plan_widths, with the message users need
    target_macs: Optional[float] = None  # "3.4G" accepted
    _parse_macs = field_validator("target_macs", mode="before")(classmethod(lambda cls, v: macs(v)))
    round_to: Optional[int] = Field(None, ge=1)
    importance: Literal["magnitude", "random", "taylor"] = "magnitude"
    data: Optional[str] = None
    taylor_batches: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    students: Optional[int] = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)  # torch.Generator takes 64-bit seeds
    device: str = "auto"
    throughput: bool = True
    throughput_steps: int = Field(5, ge=1)
    throughput_batch: int = Field(16, ge=1)
    out: Path = Path("template")
    force: bool = False


def run_prune(cfg: PruneConfig) -> Path:
    """Prune ``cfg.teacher`` into a template; write a ``template`` stage directory at ``cfg.out``."""
    from o2mcli.devices import resolve_device
    from o2mcli.fsutil import atomic_dir, check_output_free
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.models.io import load_model, model_record, save_model_file, unet_config_of
    from o2mcli.pruning.importance import get_importance
    from o2mcli.pruning.pruners import pruner_for

    # 1. Refuse bad outputs and inputs before any work.
    if cfg.ratio is not None and cfg.target_macs is not None:
        raise O2MError(f"--ratio {cfg.ratio} and --target-macs {cfg.target_macs:.4g}: give one budget, not both")
    if cfg.target_macs is not None and cfg.target_macs <= 0:
        raise OptionError("target_macs", cfg.target_macs, "must be positive")
    out = Path(cfg.out)
    check_output_free(out, cfg.force, inputs=[cfg.teacher, cfg.data])
    teacher_path = resolve_model_spec(cfg.teacher)
    device = resolve_device(cfg.device)
    if cfg.importance == "taylor" and cfg.data is None:
        get_importance("taylor")(data=False)  # raises the one-line explanation
    loaded = load_model(teacher_path, "cpu")
    if loaded.is_group:
        raise O2MError(f"{teacher_path}: a group of {len(loaded.ranges)} students; o2m prune takes one teacher UNet")
    teacher = loaded.unet
    tcfg = unet_config_of(teacher)
    pruner = pruner_for(tcfg, teacher_path)
    pruner.check(tcfg, teacher_path)

    # 2. The width plan: a ratio, or the least pruning that meets a MACs budget.
    plan = pruner.plan(tcfg, cfg.ratio, cfg.target_macs, cfg.round_to)

    # 3. Importance (Taylor needs gradients of denoising losses on real images) and the pruning pass.
    student = copy.deepcopy(teacher)
    extra = {}
    if cfg.importance == "taylor":
        extra["taylor_loss"] = _taylor_grads(student, loaded, cfg, device)
    importance = get_importance(cfg.importance)(seed=cfg.seed, data=cfg.data is not None)
    outcome = pruner.prune(student, plan, importance)
    student.zero_grad(set_to_none=True)
    template = pruner.rebuild(student, plan.new_config(tcfg), teacher_path)

    # 4. Measure, then write the stage directory atomically.
    summary = pruner.summary(teacher, template, plan, outcome)
    summary.update(extra)
    if cfg.throughput:
        summary["throughput"] = _throughput(teacher, template, loaded.scheduler_config, cfg, device)
    if cfg.students:
        summary["students"] = (f"all {cfg.students} students start from this one template (merging needs a shared "
                               "initialization); nothing extra is written")
    config = cfg.model_dump(mode="json")
    config["teacher"] = str(teacher_path.resolve())
    config["ratio"] = plan.ratio
    config["round_to"] = plan.round_to
    T = loaded.num_train_timesteps
    provenance = {"stage": "prune", "teacher": str(teacher_path.resolve()), "teacher_sha256": loaded.sha256,
                  "ratio": plan.ratio, "importance": cfg.importance, "seed": cfg.seed}
    if loaded.conditioning is not None and loaded.conditioning.get("null_class") is not None:
        provenance["conditioning"] = loaded.conditioning  # the template asks for the teacher's classes
    with atomic_dir(out, force=cfg.force) as tmp:
        save_model_file(tmp / ARTIFACT, template, loaded.scheduler_config, kind="template", timestep_range=(0, T),
                        provenance=provenance)
        write_manifest(tmp, "template", config, parents=[parent_ref(teacher_path)],
                       models=[model_record("template", ARTIFACT, template, (0, T))],
                       scheduler_config=loaded.scheduler_config, summary=summary)
    return out


# 5. Helpers ---------------------------------------------------------------------------------------

def _taylor_grads(unet: torch.nn.Module, loaded, cfg: PruneConfig, device: torch.device) -> float:
    from o2mcli.data import load_dataset
    from o2mcli.diffusion.schedulers import schedule_terms
    from o2mcli.pruning.importance.taylor import accumulate_denoising_grads

    data = load_dataset(cfg.data)
    c, size = unet.config.in_channels, unet.config.sample_size
    if data.shape != (c, size, size):
        raise O2MError(f"{data.source}: images are {'x'.join(map(str, data.shape))} (CxHxW) but the teacher "
                       f"takes {c}x{size}x{size}")
    labels = None
    if loaded.conditioning is not None:
        from o2mcli.data.labels import check_data_classes, label_plan

        # The teacher's own conditional loss ranks the channels: each image with its class (no dropout).
        labels = check_data_classes(label_plan(loaded.conditioning, 0.0, Path(cfg.teacher)), data, Path(cfg.teacher))
    unet.to(device)
    loss = accumulate_denoising_grads(unet, data.to_model_range(), schedule_terms(loaded.scheduler_config),
                                      batches=cfg.taylor_batches, batch_size=cfg.batch_size, seed=cfg.seed,
                                      labels=labels)
    unet.to("cpu")
    if loss != loss:
        raise O2MError(f"{cfg.teacher}: the teacher's denoising loss is NaN on {data.source}; cannot rank channels")
    return round(loss, 6)


def _throughput(teacher, template, scheduler_config: dict, cfg: PruneConfig, device: torch.device) -> dict:
    """Sampling throughput of both models, alternated in one run (best of two each, to damp noise)."""
    from o2mcli.diffusion.sampler import measure_throughput

    best = {"teacher": 0.0, "template": 0.0}
    models = {"teacher": teacher.to(device).eval(), "template": template.to(device).eval()}
    for _ in range(2):
        for name, m in models.items():
            r = measure_throughput(m, "ddim", scheduler_config, cfg.throughput_steps, cfg.throughput_batch, device,
                                   repeats=1, seed=cfg.seed)
            best[name] = max(best[name], r["images_per_s"])
    for m in models.values():
        m.to("cpu")
    return {"teacher_images_per_s": round(best["teacher"], 3), "template_images_per_s": round(best["template"], 3),
            "speedup": round(best["template"] / best["teacher"], 3), "device": str(device), "scheduler": "ddim",
            "steps": cfg.throughput_steps, "batch_size": cfg.throughput_batch}
