"""``o2m prune``: channel-slim a teacher UNet into a student template (a plain diffusers UNet2DModel, or a
UNet2DConditionModel for a Stable Diffusion teacher).

The output is a ``template`` stage directory:

* ``template.safetensors``: the template (self-describing o2m file; ``o2m export`` turns it into a
  diffusers directory that ``from_pretrained`` loads without o2m);
* ``manifest.json``: the full config, the teacher as ``parents[0]`` (the distill stage follows it),
  and a summary: params and MACs before and after, per block, heads kept, and the measured
  sampling throughput of template and teacher in the same run.

``--ratio R`` removes the fraction R of the channels of *every* block (``block_out_channels``
times 1-R, rounded to a multiple of ``--round-to``); MACs fall roughly as (1-R)^2.
``--target-macs`` instead picks the smallest ratio whose template fits the budget.
``--blocks bk-base|bk-small|bk-tiny`` (Stable Diffusion UNets) removes whole blocks as BK-SDM does
(``pruning/blocks.py``), alone or followed by a ratio's slimming of what remains.
``--drop-blocks N`` (DiT) removes N evenly spaced middle transformer blocks (the first and last stay), alone or
followed by a ratio's removal of heads (``pruning/pruners/dit.py``).

A text-conditioned teacher's template records the teacher's pipeline (path and the VAE, text
encoder and tokenizer sha256) in its provenance, so later stages find those parts without copies.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.models.conditioning import takes_labels, takes_prompts
from o2mcli.outputs import run_scope
from o2mcli.chain import resolve_model_spec
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import cli, macs
from o2mcli.stages import fields

ARTIFACT = "template.safetensors"


class PruneConfig(BaseModel):
    """Every setting of a pruning run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    teacher: str = Field(json_schema_extra=cli(argument=True, unset=True), description="Teacher model file or "
                         "directory, or digits-teacher; default: the newest teacher in the current directory.")
    # checked by plan_widths, with the message users need
    ratio: Optional[float] = Field(None, description="Fraction of channels removed from every block, in (0, 1); MACs "
                                   "fall about as (1-R)^2. Default 0.3 (none with --blocks).")
    # BK-SDM block removal, before any ratio
    blocks: Optional[str] = Field(
        None, description="Stable Diffusion UNets: remove blocks as BK-SDM does (bk-base: second resnet+attention pair "
        "of each stage; bk-small: also the mid block; bk-tiny: also the innermost stage); SDXL UNets: KOALA's, SSD-1B's "
        "or Vega's pattern (koala-1b, koala-700m, ssd-1b, vega); with --ratio, then slim.")
    # DiT: whole transformer blocks removed, before any ratio
    drop_blocks: Optional[int] = Field(None, ge=1, description="DiT: remove N evenly spaced middle transformer blocks "
                                       "(the first and last stay); with --ratio, then remove heads.")
    target_macs: Optional[float] = Field(None, json_schema_extra=cli(text=True), description="Instead of --ratio: the "
                                         "least pruning whose template costs at most this many MACs per forward (e.g. "
                                         "3.4G).")  # "3.4G" accepted
    _parse_macs = field_validator("target_macs", mode="before")(classmethod(lambda cls, v: macs(v)))

    @field_validator("blocks")
    @classmethod
    def _known_pattern(cls, v: Optional[str]) -> Optional[str]:
        from o2mcli.pruning.pruners import block_variants

        if v is not None and v not in block_variants():
            raise ValueError(f"Input should be one of {', '.join(block_variants())}")
        return v

    round_to: Optional[int] = Field(None, ge=1, description="Channel counts become multiples of N; default the "
                                    "GroupNorm group count (times the attention head size if fixed).")
    importance: Literal["magnitude", "random", "taylor"] = Field("magnitude", description="magnitude, random or "
                                                                 "taylor (needs --data).")
    data: Optional[str] = Field(None, description="Images for Taylor importance: 'digits' or a folder.")
    taylor_batches: int = Field(8, ge=1, description="Batches of denoising loss for Taylor.")
    batch_size: int = Field(32, ge=1, json_schema_extra=cli("--batch-size", "-b"),
                            description="Batch size of the Taylor batches.")
    students: Optional[int] = Field(None, ge=1, description="K students to come: they all start from this one "
                                    "template, so nothing extra is written.")
    seed: int = fields.seed("Seeds the Taylor batches and random importance.")
    device: str = fields.device()
    throughput: bool = Field(True, json_schema_extra=cli("--no-throughput", negate=True),
                             description="Skip the throughput measurement.")
    throughput_steps: int = fields.internal(5, ge=1)
    # None: 16 images, or 1 latent for a Stable Diffusion UNet
    throughput_batch: Optional[int] = fields.internal(None, ge=1)
    out: Path = fields.stage_out("template")
    force: bool = fields.force()


@run_scope
def run_prune(cfg: PruneConfig) -> Path:
    """Prune ``cfg.teacher`` into a template; write a ``template`` stage directory at ``cfg.out``."""
    from o2mcli.devices import resolve_device
    from o2mcli.outputs import atomic_dir, reserve_output
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.models.io import load_model, model_record, save_model_file, denoiser_config_of
    from o2mcli.pruning.importance import get_importance
    from o2mcli.pruning.pruners import pruner_for

    # 1. Refuse bad outputs and inputs before any work.
    if cfg.ratio is not None and cfg.target_macs is not None:
        raise O2MError(f"--ratio {cfg.ratio} and --target-macs {cfg.target_macs:.4g}: give one budget, not both")
    if cfg.target_macs is not None and cfg.target_macs <= 0:
        raise OptionError("target_macs", cfg.target_macs, "must be positive")
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=[cfg.teacher, cfg.data])
    teacher_path = resolve_model_spec(cfg.teacher)
    device = resolve_device(cfg.device)
    if cfg.blocks is not None and cfg.drop_blocks is not None:
        raise O2MError(f"--blocks {cfg.blocks} and --drop-blocks {cfg.drop_blocks}: give one (--blocks is BK-SDM's "
                       "for Stable Diffusion UNets, --drop-blocks is for DiTs)")
    removes = cfg.blocks is not None or cfg.drop_blocks is not None
    if cfg.importance == "taylor" and cfg.data is None and not removes:
        get_importance("taylor")(data=False)  # raises the one-line explanation
    loaded = load_model(teacher_path, "cpu")
    if loaded.is_group:
        raise O2MError(f"{teacher_path}: a group of {len(loaded.ranges)} students; o2m prune takes one teacher UNet")
    teacher = loaded.denoiser
    tcfg = denoiser_config_of(teacher)
    pruner_for(tcfg, teacher_path).check(tcfg, teacher_path)  # refusals before any work
    text = takes_prompts(loaded.conditioning)
    slim = not removes or cfg.ratio is not None or cfg.target_macs is not None
    if text and slim and cfg.importance == "taylor":
        raise O2MError(f"{teacher_path}: --importance taylor is not supported for Stable Diffusion UNets yet (its "
                       "gradients need captioned latents); use magnitude or random")

    # 2-3. Blocks, width plan, importance and the pruning pass (Taylor: gradients of denoising losses on real images).
    def taylor_grads(student: torch.nn.Module) -> dict:
        return {"taylor_loss": _taylor_grads(student, loaded, cfg, device)}

    template, summary = make_template(teacher, blocks=cfg.blocks, drop_blocks=cfg.drop_blocks, ratio=cfg.ratio,
                                      target_macs=cfg.target_macs, round_to=cfg.round_to, importance=cfg.importance,
                                      seed=cfg.seed,
                                      data=cfg.data is not None, where=teacher_path,
                                      gradients=taylor_grads if cfg.importance == "taylor" else None)

    # 4. Measure, then write the stage directory atomically.
    if cfg.throughput:
        # An SD UNet call is ~100x a pixel DDPM's: one latent a batch keeps the measurement to minutes on a CPU.
        batch = cfg.throughput_batch or (1 if text else 16)
        summary["throughput"] = _throughput(teacher, template, loaded.scheduler_config, cfg, batch, device)
    if cfg.students:
        summary["students"] = (f"all {cfg.students} students start from this one template (merging needs a shared "
                               "initialization); nothing extra is written")
    config = cfg.model_dump(mode="json")
    config["teacher"] = str(teacher_path.resolve())
    config["ratio"] = summary["ratio"]
    config["round_to"] = summary["round_to"]
    T = loaded.num_train_timesteps
    provenance = {"stage": "prune", "teacher": str(teacher_path.resolve()), "teacher_sha256": loaded.sha256,
                  "ratio": config["ratio"], "importance": cfg.importance, "seed": cfg.seed}
    if "block_removal" in summary:
        provenance["blocks"] = summary["block_removal"]  # what went, and student block -> teacher block
    if text or (takes_labels(loaded.conditioning) and loaded.conditioning.get("null_class") is not None):
        # The template asks for the teacher's classes, or names the teacher's pipeline (VAE, text encoder,
        # tokenizer by path and sha256) instead of copying it.
        provenance["conditioning"] = loaded.conditioning
    with atomic_dir(out, force=cfg.force) as tmp:
        save_model_file(tmp / ARTIFACT, template, loaded.scheduler_config, kind="template", timestep_range=(0, T),
                        provenance=provenance)
        write_manifest(tmp, "template", config, parents=[parent_ref(teacher_path)],
                       models=[model_record("template", ARTIFACT, template, (0, T))],
                       scheduler_config=loaded.scheduler_config, summary=summary)
    return out


def make_template(teacher: torch.nn.Module, *, blocks: Optional[str] = None, drop_blocks: Optional[int] = None,
                  ratio: Optional[float] = None,
                  target_macs: Optional[float] = None, round_to: Optional[int] = None, importance: str = "magnitude",
                  seed: int = 0, data: bool = False, where: Path = Path("teacher"),
                  gradients: Optional[Callable[[torch.nn.Module], dict]] = None) -> tuple[torch.nn.Module, dict]:
    """The template ``o2m prune`` writes, in memory, and its summary: ``blocks`` removed first (BK-SDM), then the
    channels of what remains slimmed by ``ratio`` or to ``target_macs`` (default ratio 0.3 without ``blocks``).
    ``drop_blocks`` (DiT) removes that many whole transformer blocks first instead of ``blocks``.
    ``gradients(student)`` fills the gradients a criterion needs (Taylor) and returns summary fields."""
    from o2mcli.models.io import denoiser_config_of
    from o2mcli.pruning.importance import get_importance
    from o2mcli.pruning.pruners import PRUNERS, pruner_for
    from o2mcli.pruning.pruners.base import check_capability

    tcfg = denoiser_config_of(teacher)
    pruner = pruner_for(tcfg, where)
    pruner.check(tcfg, where)
    check_capability(pruner, PRUNERS.values(), blocks, drop_blocks, where)
    removal, base = None, teacher
    if blocks is not None:
        base, removal = pruner.remove_blocks(teacher, blocks, where)
    elif drop_blocks is not None:
        base, removal = pruner.drop_blocks(teacher, drop_blocks, where)
    if removal is not None and ratio is None and target_macs is None:
        template, summary = base, None  # built from its config by plain diffusers, every tensor a teacher's
    else:
        bcfg = denoiser_config_of(base)
        plan = pruner.plan(bcfg, ratio, target_macs, round_to)
        student = copy.deepcopy(base)
        extra = gradients(student) if gradients is not None else {}
        criterion = get_importance(importance)(seed=seed, data=data)
        outcome = pruner.prune(student, plan, criterion)
        student.zero_grad(set_to_none=True)
        template = pruner.rebuild(student, plan.new_config(bcfg), where)
        del student
        summary = {**pruner.summary(base, template, plan, outcome), **extra}
    if removal is not None and drop_blocks is not None:
        summary = pruner.removal_summary(teacher, base, template, removal, summary)
    elif removal is not None:
        summary = blocks_summary(teacher, base, template, removal, summary)
    return template, summary


# 5. Helpers ---------------------------------------------------------------------------------------

def blocks_summary(teacher, shallow, template, removal, slim: Optional[dict]) -> dict:
    """The summary of a block removal (and of the slimming after it, if any): totals against the teacher, one row
    per teacher block with the student block that took its place (params and MACs 0 where none did; channels from
    the slimming), and the removal record (feature-KD pairs)."""
    from o2mcli.models.stats import count_block_params
    from o2mcli.pruning.widths import block_macs

    tp_, sp = count_block_params(teacher), count_block_params(template)
    tm, sm = block_macs(teacher), block_macs(template)
    from_teacher = {t: s for s, t in removal.block_map.items()}
    widths = {r["block"]: r["channels"] for r in (slim or {}).get("blocks", [])}  # slimming's rows: student names
    blocks = []
    for name in tp_:
        staged = name.split(".")[0].endswith("blocks")  # down_blocks.i / up_blocks.i may move; the rest stays
        other = from_teacher.get(name) if staged else (name if name in sp else None)
        row = {"block": name, "student_block": other, "channels": widths.get(other, [None, None]),
               "params": [tp_[name], sp.get(other, 0)], "macs": [tm.get(name, 0), sm.get(other, 0)]}
        row["params_kept"] = round(row["params"][1] / max(row["params"][0], 1), 4)
        row["macs_kept"] = round(row["macs"][1] / max(row["macs"][0], 1), 4) if row["macs"][0] else None
        blocks.append(row)
    tparams, sparams, tmacs, smacs = sum(tp_.values()), sum(sp.values()), sum(tm.values()), sum(sm.values())
    chans = list(teacher.config.block_out_channels)
    out = dict(slim or {})
    out.update({
        "teacher": {"params": tparams, "macs": tmacs, "block_out_channels": chans},
        "template": {"params": sparams, "macs": smacs, "block_out_channels": list(template.config.block_out_channels)},
        "params_ratio": round(sparams / tparams, 4),
        "macs_ratio": round(smacs / tmacs, 4),
        "ratio": (slim or {}).get("ratio"),
        "round_to": (slim or {}).get("round_to"),
        "block_removal": {**removal.record(), "params": sum(p.numel() for p in shallow.parameters()),
                          "layers_per_block": removal.config["layers_per_block"]},
        "blocks": blocks,
    })
    return out


def _taylor_grads(unet: torch.nn.Module, loaded, cfg: PruneConfig, device: torch.device) -> float:
    from o2mcli.data import load_dataset
    from o2mcli.diffusion.schedulers import schedule_terms
    from o2mcli.models.parametrization import parametrization_of
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
                                      labels=labels, param=parametrization_of(loaded.scheduler_config))
    unet.to("cpu")
    if loss != loss:
        raise O2MError(f"{cfg.teacher}: the teacher's denoising loss is NaN on {data.source}; cannot rank channels")
    return round(loss, 6)


def _throughput(teacher, template, scheduler_config: dict, cfg: PruneConfig, batch: int,
                device: torch.device) -> dict:
    """Sampling throughput of both models, alternated in one run (best of two each, to damp noise)."""
    from o2mcli.diffusion.sampler import measure_throughput

    best = {"teacher": 0.0, "template": 0.0}
    models = {"teacher": teacher.to(device).eval(), "template": template.to(device).eval()}
    for _ in range(2):
        for name, m in models.items():
            r = measure_throughput(m, "ddim", scheduler_config, cfg.throughput_steps, batch, device,
                                   repeats=1, seed=cfg.seed)
            best[name] = max(best[name], r["images_per_s"])
    for m in models.values():
        m.to("cpu")
    return {"teacher_images_per_s": round(best["teacher"], 3), "template_images_per_s": round(best["template"], 3),
            "speedup": round(best["template"] / best["teacher"], 3), "device": str(device), "scheduler": "ddim",
            "steps": cfg.throughput_steps, "batch_size": batch}
