"""The sampling loop over diffusers schedulers; works for one UNet or a K-student group."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from o2mcli.devices import autocast, synchronize
from o2mcli.diffusion.schedulers import make_scheduler, set_steps, uses_learned_variance
from o2mcli.errors import O2MError
from o2mcli.models.condition import Condition, rows, stack
from o2mcli.models.denoise import input_shape, predict
from o2mcli.runtime.run import progress

if TYPE_CHECKING:
    from o2mcli.diffusion.compile import CompileRecord
    from o2mcli.diffusion.deepcache import DeepCacheCounts, DeepCacheSpec

# The unconditional branch's condition: a Condition or tensor, a null class index, or None (no guidance).
Uncond = Union[Condition, torch.Tensor, int, None]


def guided(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float,
           uncond: Uncond, channels: int, call: Callable[..., torch.Tensor] = predict) -> torch.Tensor:
    """The model's prediction for condition ``cond``; with guidance w > 1, classifier-free guidance
    eps = eps(uncond) + w (eps(cond) - eps(uncond)) (Ho & Salimans 2022, Eq. 6), variance channels from the
    conditional branch. At or below 1 there is no guidance, as in diffusers (``do_classifier_free_guidance =
    guidance_scale > 1``): one forward on ``cond`` alone, no unconditional branch.

    ``cond`` is any condition the model's family takes, one row per sample: a ``Condition`` (class labels; text
    tokens, pooled text, time ids) or a bare tensor the family reads as its primary field. ``uncond`` is the
    unconditional branch's, of the same form: one row (broadcast over the batch) or ``cond``'s batch (the null class's
    labels, the negative prompt's embeddings), or a class index (the null class). Both branches go through one
    ``call`` (``predict``, or a DeepCache state whose cache then holds both halves).
    """
    if cond is None or guidance <= 1.0:
        return call(unet, x, t, cond)
    if uncond is None:
        raise O2MError(f"guidance {guidance} needs the unconditional branch's condition (a null class or prompt)")
    if not torch.is_tensor(uncond) and not isinstance(uncond, Condition):  # the null class for every sample
        labels = cond.labels if isinstance(cond, Condition) else cond
        uncond = torch.full_like(labels, int(uncond))
        uncond = Condition(labels=uncond) if isinstance(cond, Condition) else uncond
    if isinstance(uncond, Condition):
        uncond = uncond.to(device=cond.device)
    else:
        uncond = uncond.to(device=cond.device, dtype=cond.dtype)
    if rows(uncond) != rows(cond):  # one row (e.g. the negative prompt) for all
        uncond = uncond.expand(rows(cond)) if isinstance(uncond, Condition) else uncond.expand(
            cond.shape[0], *uncond.shape[1:])
    both = call(unet, torch.cat([x, x]), t, stack(cond, uncond))
    c, u = both.chunk(2)
    eps = u[:, :channels] + guidance * (c[:, :channels] - u[:, :channels])
    return torch.cat([eps, c[:, channels:]], 1)


@torch.no_grad()
def denoise(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int,
            noise: torch.Tensor, generator: torch.Generator | None = None, cond: torch.Tensor | None = None,
            guidance: float = 1.0, uncond: Uncond = None, clamp: bool = True,
            deepcache: Optional["DeepCacheSpec"] = None, counts: Optional["DeepCacheCounts"] = None,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` with ``steps`` sampler steps; returns x_0, clamped to the pixel range
    [-1, 1] unless ``clamp`` is off (latents: the VAE's latent space is not bounded by [-1, 1]).

    ``cond`` (class labels, text embeddings), ``guidance`` w and ``uncond``: see :func:`guided`. ``deepcache``: run
    the steps with DeepCache (a fresh cache for this trajectory), adding its full and partial calls to ``counts``.
    ``on_step(n)`` is called after every step with the number of steps this run takes (a progress bar's tick).
    """
    # Near-clean samples and tiny eps outputs produce denormal floats, which slow CPU kernels 2x to 70x
    # (measured on the digits teacher, whichever sampler hit them); flushing them changes nothing visible.
    torch.set_flush_denormal(True)
    sched = make_scheduler(scheduler_name, scheduler_config)
    try:
        set_steps(sched, steps)
    except (NotImplementedError, ValueError) as e:  # a config field this scheduler reads only when it sets its steps
        raise O2MError(f"--scheduler {scheduler_name}: the model's scheduler config does not fit it ({e}); "
                       "try --scheduler ddpm") from e
    call: Callable[..., torch.Tensor] = predict
    if deepcache is not None:
        from o2mcli.diffusion.deepcache import CachedDenoiser

        call = CachedDenoiser(deepcache, counts, steps=len(sched.timesteps))
    c = noise.shape[1]
    keep_var = uses_learned_variance(scheduler_name, scheduler_config)
    device = noise.device
    # The generator goes to the schedulers that draw noise in their step (DDPM, Euler ancestral) and only to those
    # that take it (PNDM and UniPC do not), as diffusers' pipelines pass it.
    extra = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        with autocast(device):
            out = guided(unet, model_in, t.to(device), cond, guidance, uncond, c, call=call)
        out = out.float()
        if not keep_var:
            out = out[:, :c]  # learned-variance channels are used by the DDPM sampler only
        x = sched.step(out, t, x, **extra).prev_sample
        if on_step is not None:
            on_step(len(sched.timesteps))
    return x.clamp(-1.0, 1.0) if clamp else x


def sample_images(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int, n: int,
                  batch_size: int, seed: int, device: torch.device, show_progress: bool = True,
                  cond: torch.Tensor | None = None, guidance: float = 1.0, uncond: Uncond = None,
                  cond_table: torch.Tensor | None = None,
                  unpack: Callable[[torch.Tensor], Any] | None = None,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  deepcache: Optional["DeepCacheSpec"] = None,
                  counts: Optional["DeepCacheCounts"] = None,
                  shape: Optional[tuple[int, int, int]] = None) -> np.ndarray:
    """``n`` images as float32 in [0, 1], (N, C, H, W); batch ``i`` draws from a generator seeded ``seed + i``,

    so the same seed gives the same images whatever else ran before, on CPU bit-for-bit.

    ``cond`` (N, ...) is each image's condition (class labels), or with ``cond_table`` (P, ...) each image's row of
    it (the packed embeddings of P distinct prompts, so N images need not hold N copies), each batch's rows made the
    models' Condition by ``unpack`` (class labels too, where given); guided with weight ``guidance``
    against ``uncond`` (see :func:`guided`). ``decode`` maps a batch of final samples to images in [0, 1] (a latent
    model's VAE decoder); the samples are then left unclamped. Without it they are pixels in [-1, 1].
    ``deepcache``: sample with DeepCache, one fresh cache per batch, its calls counted into ``counts``. ``shape``:
    (C, H, W) of one sample (default: the model's input shape; a UNet also takes other sizes).
    """
    shape = tuple(shape) if shape is not None else input_shape(unet)
    out = []
    batches = range(0, n, batch_size)
    # The bar counts denoising steps over all batches: a batch of 256 images under 1000 DDPM steps is one
    # long batch, and a bar over batches would sit at 0/1 for all of it. The postfix says how many images are done.
    bar = progress(total=len(batches) * steps, desc="sample", unit="step") if show_progress else _quiet_bar()

    def tick(taken: int) -> None:
        # A scheduler may take fewer steps than asked (set_steps drops repeated timesteps): fix the total once.
        if bar.total != len(batches) * taken:
            bar.total = len(batches) * taken
            bar.refresh()
        bar.update(1)

    for i, start in enumerate(batches):
        b = min(batch_size, n - start)
        bar.set_postfix_str(f"{start}/{n} img", refresh=False)
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn((b, *shape), generator=g).to(device)
        c = None if cond is None else cond[start:start + b]
        if c is not None and cond_table is not None:
            c = cond_table[c.to(cond_table.device)]
        if c is not None and unpack is not None:
            c = unpack(c)
        c = None if c is None else c.to(device)
        x = denoise(unet, scheduler_name, scheduler_config, steps, noise, generator=g, cond=c, guidance=guidance,
                    uncond=uncond, clamp=decode is None, deepcache=deepcache, counts=counts, on_step=tick)
        images = ((x + 1.0) / 2.0) if decode is None else decode(x)
        out.append(images.float().cpu().numpy())
        bar.set_postfix_str(f"{start + b}/{n} img")
    bar.close()
    return np.concatenate(out, 0)


def _quiet_bar():
    """A disabled tqdm: the same calls as a shown bar, no output."""
    from tqdm.auto import tqdm

    return tqdm(disable=True)


def measure_throughput(unet: nn.Module, scheduler_name: str, scheduler_config: dict[str, Any], steps: int,
                       batch_size: int, device: torch.device, repeats: int = 2, seed: int = 0,
                       deepcache: Optional["DeepCacheSpec"] = None,
                       compile: Union[bool, "CompileRecord"] = False) -> dict[str, Any]:
    """Images per second of full sampling runs at ``batch_size`` (one warm-up run not counted, its seconds reported
    as ``warmup_s``), with DeepCache when ``deepcache`` is given (the same schedule the samples used).

    ``compile``: compile ``unet`` in place first (:func:`o2mcli.diffusion.compile.compile_denoiser`); the compile
    happens in the warm-up run, and the record's ``compile`` says how it ran (compiled, or eager after a failure)
    and the compiling calls' seconds. A model compiled before (a ``CompileRecord`` passed as ``compile``) is timed as
    it is. Not with DeepCache (its partial forwards are not compiled).
    """
    record = None
    if compile:
        if deepcache is not None:
            raise O2MError("compiled sampling does not combine with DeepCache yet (its partial forwards are not "
                           "compiled): time one or the other")
        from o2mcli.diffusion.compile import CompileRecord, compile_denoiser

        record = compile if isinstance(compile, CompileRecord) else compile_denoiser(unet, device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, *input_shape(unet)), generator=g).to(device)
    # Warm-up, with DeepCache on as timed (a partial step runs in it too unless N > 3); a compiled model compiles here.
    synchronize(device)
    t0 = time.perf_counter()
    denoise(unet, scheduler_name, scheduler_config, min(steps, 3), noise, generator=g, deepcache=deepcache)
    synchronize(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        denoise(unet, scheduler_name, scheduler_config, steps, noise, generator=g, deepcache=deepcache)
    synchronize(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": batch_size * repeats / dt, "seconds_per_batch": dt / repeats,
            "batch_size": batch_size, "steps": steps, "scheduler": scheduler_name, "device": str(device),
            "warmup_s": warmup,
            **({"compile": record.summary()} if record is not None else {}),
            **({"deepcache": deepcache.record()} if deepcache else {})}
