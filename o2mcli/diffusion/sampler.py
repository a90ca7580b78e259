"""The sampling loop over diffusers schedulers; works for one UNet or a K-student group."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from o2mcli.devices import autocast, synchronize
from o2mcli.diffusion.schedulers import make_scheduler, set_steps, uses_learned_variance
from o2mcli.models.denoise import input_shape, predict
from o2mcli.runtime.run import progress


def guided(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float,
           null_class: int | None, channels: int) -> torch.Tensor:
    """The model's prediction for ``labels``; with guidance w != 1, classifier-free guidance
    eps = eps(null) + w (eps(labels) - eps(null)) (Ho & Salimans 2022, Eq. 6), variance channels from the
    conditional branch."""
    if labels is None or guidance == 1.0:
        return predict(unet, x, t, labels)
    both = predict(unet, torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, null_class)]))
    cond, uncond = both.chunk(2)
    eps = uncond[:, :channels] + guidance * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], 1)


@torch.no_grad()
def denoise(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int,
            noise: torch.Tensor, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
            guidance: float = 1.0, null_class: int | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` with ``steps`` sampler steps; returns x_0 in [-1, 1].

    ``labels`` (class-conditional models) and ``guidance`` w: see :func:`guided`.
    """
    # Near-clean samples and tiny eps outputs produce denormal floats, which slow CPU kernels 2x to 70x
    # (measured on the digits teacher, whichever sampler hit them); flushing them changes nothing visible.
    torch.set_flush_denormal(True)
    sched = make_scheduler(scheduler_name, scheduler_config)
    set_steps(sched, steps)
    c = noise.shape[1]
    keep_var = uses_learned_variance(scheduler_name, scheduler_config)
    device = noise.device
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        with autocast(device):
            out = guided(unet, model_in, t.to(device), labels, guidance, null_class, c)
        out = out.float()
        if not keep_var:
            out = out[:, :c]  # learned-variance channels are used by the DDPM sampler only
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x.clamp(-1.0, 1.0)


def sample_images(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int, n: int,
                  batch_size: int, seed: int, device: torch.device, show_progress: bool = True,
                  labels: torch.Tensor | None = None, guidance: float = 1.0,
                  null_class: int | None = None) -> np.ndarray:
    """``n`` images as float32 in [0, 1], (N, C, H, W); batch ``i`` draws from a generator seeded ``seed + i``,

    so the same seed gives the same images whatever else ran before, on CPU bit-for-bit. ``labels`` (N,)
    ask a class-conditional model for those classes, guided with weight ``guidance``.
    """
    shape = input_shape(unet)
    out = []
    batches = range(0, n, batch_size)
    for i, start in enumerate(progress(batches, desc="sample") if show_progress else batches):
        b = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn((b, *shape), generator=g).to(device)
        lab = None if labels is None else labels[start:start + b].to(device)
        x = denoise(unet, scheduler_name, scheduler_config, steps, noise, generator=g, labels=lab, guidance=guidance,
                    null_class=null_class)
        out.append(((x + 1.0) / 2.0).float().cpu().numpy())
    return np.concatenate(out, 0)


def measure_throughput(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int,
                       batch_size: int, device: torch.device, repeats: int = 2, seed: int = 0) -> dict[str, float]:
    """Images per second of full sampling runs at ``batch_size`` (one warm-up run not counted)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, *input_shape(unet)), generator=g).to(device)
    denoise(unet, scheduler_name, scheduler_config, min(steps, 3), noise, generator=g)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        denoise(unet, scheduler_name, scheduler_config, steps, noise, generator=g)
    synchronize(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": batch_size * repeats / dt, "seconds_per_batch": dt / repeats,
            "batch_size": batch_size, "steps": steps, "scheduler": scheduler_name, "device": str(device)}
