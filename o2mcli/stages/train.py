"""``o2m train``: standard DDPM training of a teacher (Ho et al. 2020; learned variance: Nichol & Dhariwal 2021)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.data import load_dataset
from o2mcli.devices import autocast, resolve_device
from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.diffusion.losses import hybrid_loss
from o2mcli.runtime.checkpoint import (adamw_with_warmup, check_partial, load_checkpoint, load_optimizer,
                                      optimizer_tensors, save_checkpoint)
from o2mcli.runtime.ema import EMA
from o2mcli.runtime.run import JsonlLog, progress, read_jsonl, seed_everything
from o2mcli.errors import O2MError
from o2mcli.fsutil import atomic_dir, check_output_free
from o2mcli.manifest import write_manifest
from o2mcli.models.configs import scheduler_config, unet_config
from o2mcli.models.io import build_unet, model_record, save_model_file
from o2mcli.viz import line_plot


class TrainConfig(BaseModel):
    """Every setting of a teacher training run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    data: str = "digits"
    out: Path = Path("teacher")
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_warmup: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    variance: Literal["fixed", "learned"] = "fixed"
    vlb_weight: float = Field(0.001, ge=0)
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    attention_level: Optional[int] = 1
    num_train_timesteps: int = Field(1000, ge=2)
    seed: int = Field(0, ge=0, lt=2**63)  # torch.Generator takes 64-bit seeds
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    resume: bool = False
    force: bool = False

    @field_validator("block_out_channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError(f"block_out_channels must be positive, got {v}")
        return v


def run_train(cfg: TrainConfig) -> Path:
    """Train a DDPM teacher; write a ``teacher`` stage directory, or one ``.safetensors`` if ``out`` ends so."""
    # 1. Refuse bad options, then bad outputs, before any work (options first: a bad --device is not
    #    "an interrupted run is there").
    if cfg.attention_level is not None and not 0 <= cfg.attention_level < len(cfg.block_out_channels):
        raise O2MError(f"--attention-level {cfg.attention_level}: must index one of {len(cfg.block_out_channels)} levels")
    resolve_device(cfg.device)
    out = Path(cfg.out)
    check_output_free(out, cfg.force, inputs=[cfg.data])
    work = check_partial(out, cfg.resume, cfg.force)
    if work.exists() and not cfg.resume:
        shutil.rmtree(work)  # --force: start over

    # 2. Data, model, schedule, optimizer.
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    _, c, h, w = data.images.shape
    if h != w:
        raise O2MError(f"{data.source}: images are {w}x{h}; o2m trains square images")
    if h % (2 ** (len(cfg.block_out_channels) - 1)):
        raise O2MError(f"{data.source}: size {h} is not divisible by 2^{len(cfg.block_out_channels) - 1} "
                       f"(the downsamplings of {len(cfg.block_out_channels)} blocks)")
    gen = seed_everything(cfg.seed)
    try:
        ucfg = unet_config(sample_size=h, channels=c, variance=cfg.variance, block_out_channels=cfg.block_out_channels,
                           layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                           attention_level=cfg.attention_level)
    except ValueError as e:
        raise O2MError(str(e)) from e
    scfg = scheduler_config(cfg.variance, cfg.num_train_timesteps)
    model = build_unet(ucfg, None, out).to(device).train()
    ema = EMA(model, cfg.ema_decay)
    opt, sched = adamw_with_warmup(model.parameters(), cfg.lr, cfg.weight_decay, cfg.lr_warmup)
    from diffusers import DDPMScheduler
    noise_sched = DDPMScheduler.from_config({k: v for k, v in scfg.items() if not k.startswith("_")})
    terms = DiffusionTerms(noise_sched.betas)
    abar = noise_sched.alphas_cumprod.to(device)
    x_all = data.to_model_range().to(device)
    T = cfg.num_train_timesteps

    # 3. Resume.
    start = 0
    if cfg.resume:
        tensors, state = load_checkpoint(work)
        if state.get("config_fingerprint") != _fingerprint(cfg):
            raise O2MError(f"{work}: checkpoint was made with other settings; resume with the same options")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.shadow = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        ema.updates = state["ema_updates"]
        load_optimizer(opt, tensors, state["optimizer"], "opt")
        sched.load_state_dict(state["lr_sched"])
        gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        start = state["step"]
        if start > cfg.steps:
            raise O2MError(f"{work}: checkpoint is at step {start}; pass --steps {start} or more to continue")
    work.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(work / "metrics.jsonl", keep_until_step=start if cfg.resume else None)

    # 4. The loop. All randomness comes from `gen` (CPU), so runs and resumes are reproducible.
    bar = progress(range(start, cfg.steps), total=cfg.steps, initial=start, desc="train")
    t_last, seen = time.perf_counter(), 0
    for step in bar:
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        t = torch.randint(0, T, (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, c, h, w), generator=gen)
        x0, t, noise = x_all[idx.to(device)], t.to(device), noise.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(device):
            out_t = model(x_t, t).sample.float()
        v = out_t[:, c:] if cfg.variance == "learned" else None
        loss, loss_mse, loss_vlb = hybrid_loss(terms, x0, x_t, t, noise, out_t[:, :c], v, cfg.vlb_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        seen += cfg.batch_size
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            lv = float(loss.detach())  # host sync only at log points
            if not torch.isfinite(torch.tensor(lv)):
                raise O2MError(f"training diverged at step {done} (loss {lv}); the last checkpoint in {work} is kept")
            now = time.perf_counter()
            log.write({"step": done, "loss": lv, "loss_mse": float(loss_mse.detach()), "loss_vlb": float(loss_vlb.detach()),
                       "lr": sched.get_last_lr()[0], "images_per_s": seen / max(now - t_last, 1e-9)})
            t_last, seen = now, 0
            bar.set_postfix(loss=f"{lv:.4f}")
        if done % cfg.save_every == 0 and done < cfg.steps:
            _save_ckpt(work, cfg, done, model, ema, opt, sched, gen)
    log.close()

    # 5. Write the teacher: EMA weights, manifest, log and loss curve.
    ema.copy_to(model)
    model.eval().cpu()
    rows = read_jsonl(work / "metrics.jsonl")
    config = cfg.model_dump(mode="json")
    provenance = {"stage": "train", "config": config, "data": {"name": data.name, "source": data.source,
                                                                "sha256": data.sha256, "n": len(data)}}
    if out.suffix == ".safetensors":
        save_model_file(out, model, scfg, kind="teacher", provenance=provenance, force=cfg.force)
    else:
        with atomic_dir(out, force=cfg.force) as tmp:
            save_model_file(tmp / "model.safetensors", model, scfg, kind="teacher", provenance=provenance)
            shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
            line_plot({"loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}, tmp / "loss.png",
                      title=f"o2m train ({cfg.data})", logy=True)
            write_manifest(tmp, "teacher", config, models=[model_record("teacher", "model.safetensors", model, (0, T))],
                           scheduler_config=scfg,
                           summary={"final_loss": rows[-1]["loss"] if rows else None, "data": provenance["data"]})
    shutil.rmtree(work, ignore_errors=True)
    return out


def _fingerprint(cfg: TrainConfig) -> dict:
    # `steps` is left out so a resumed run can be extended (the LR is constant after warm-up).
    return cfg.model_dump(mode="json", exclude={"resume", "force", "device", "save_every", "log_every", "out", "steps"})


def _save_ckpt(work: Path, cfg: TrainConfig, step: int, model, ema: EMA, opt, sched, gen: torch.Generator) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    opt_t, opt_meta = optimizer_tensors(opt, "opt")
    tensors.update(opt_t)
    tensors["rng.gen"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_checkpoint(work, tensors, {"step": step, "ema_updates": ema.updates, "optimizer": opt_meta,
                                    "lr_sched": sched.state_dict(), "config_fingerprint": _fingerprint(cfg)})
