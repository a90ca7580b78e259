"""Eager against compiled denoiser forwards over a batch sweep, at three U-Net shapes: CIFAR-10, SD 1.x and SDXL.

Shapes (random weights, no download; speed does not depend on the weights):

* ``cifar10``: google/ddpm-cifar10-32's UNet2DModel (3x32x32 pixels);
* ``sd15``: Stable Diffusion 1.5's UNet2DConditionModel config (64x64 latents, 77 tokens of 768-wide text; ~3.4 GB
  of float32 weights, built on the device);
* ``sdxl``: SDXL base 1.0's U-Net (``bench_sdxl``'s ``SDXL_BASE_CONFIG`` and ``sdxl_call``: 128x128 latents, 77
  tokens, pooled text and size ids; ~10 GB of float32 weights).

Each shape is timed eagerly at every batch of ``--batches``, then compiled in place (``o2m sample --compile``'s
``o2mcli.diffusion.compile``: channels-last, static shapes, on CUDA bf16 weights and CUDA graphs) and timed again
(in place, not on a copy: SDXL twice over would not fit a CPU's memory). The first calls of each batch (compiling,
CUDA-graph recording) are the warm-up, timed apart and reported; then the best of ``--rounds`` runs of ``--iters``
forwards, synchronized only around each run. Each row reports samples per second, the MACs per second achieved
(MACs of one sample's forward, counted on the meta device by ``o2mcli.models.stats``' counter, x samples per
second) and, on CUDA, that as a share of the device's dense bf16 peak (``common.PEAK_BF16_TFLOPS``).

Batches above a shape's cap on this device (the CPU: SD 1.x 2, SDXL 1) are left out and named. The default is a CPU
run of a few minutes (``cifar10`` at batches 1 and 8); ``--shapes cifar10,sd15,sdxl`` adds the large U-Nets (SDXL on
the CPU needs ~10 GB free and minutes per compile). ``--tiny``: tiny stand-ins of the three shapes (a smoke test).

    python benchmarks/bench_compile.py [--device auto] [--shapes cifar10] [--batches 1,8] [--modes eager,compiled]
                                       [--iters 3] [--rounds 2] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bench_sdxl import TINY_CONFIG as SDXL_TINY_CONFIG
from bench_sdxl import sdxl_call
from common import header, int_list, machine_info, macs_rate, modes_list, peak_bf16_tflops, peak_fraction
from o2mcli.devices import autocast, resolve_device, synchronize
from o2mcli.diffusion.compile import compile_denoiser
from o2mcli.models.configs import DDPM_CIFAR10_32
from o2mcli.models.stats import _count_blocks
from o2mcli.pruning.pruners.sdxl_blocks import SDXL_BASE_CONFIG

TOKENS = 77  # CLIP's context length

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), as diffusers reads it.
SD15_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}

SD15_TINY_CONFIG: dict[str, Any] = {
    **SD15_CONFIG, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 4, "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}

CIFAR10_TINY_CONFIG: dict[str, Any] = {
    **DDPM_CIFAR10_32, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _pixel_call(unet: nn.Module, batch: int, size: int) -> Callable[[], Any]:
    p = next(unet.parameters())
    x = torch.randn(batch, unet.config.in_channels, size, size, device=p.device, dtype=p.dtype)
    t = torch.tensor(500, device=p.device)
    return lambda: unet(x, t)


def _text_call(unet: nn.Module, batch: int, size: int) -> Callable[[], Any]:
    p = next(unet.parameters())
    x = torch.randn(batch, unet.config.in_channels, size, size, device=p.device, dtype=p.dtype)
    t = torch.tensor(500, device=p.device)
    text = torch.randn(batch, TOKENS, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    return lambda: unet(x, t, encoder_hidden_states=text)


@dataclass(frozen=True)
class Shape:
    """One U-Net shape: its diffusers class and config (full and tiny), how to call it, its batch caps."""

    what: str
    cls: str  # diffusers class name
    config: dict[str, Any]
    tiny: dict[str, Any]
    call: Callable[[nn.Module, int, int], Callable[[], Any]]
    cpu_max_batch: int
    cuda_max_batch: int

    def size(self, tiny: bool) -> int:
        return int((self.tiny if tiny else self.config)["sample_size"])

    def build(self, tiny: bool, device: torch.device | str) -> nn.Module:
        import diffusers

        with torch.device(device):
            return getattr(diffusers, self.cls).from_config(_plain(self.tiny if tiny else self.config)).eval()


SHAPES: dict[str, Shape] = {
    "cifar10": Shape("ddpm-cifar10-32 UNet2DModel, 3x32x32 pixels", "UNet2DModel", DDPM_CIFAR10_32,
                     CIFAR10_TINY_CONFIG, _pixel_call, cpu_max_batch=512, cuda_max_batch=1024),
    "sd15": Shape("SD 1.5 UNet2DConditionModel, 4x64x64 latents, 77 tokens", "UNet2DConditionModel", SD15_CONFIG,
                  SD15_TINY_CONFIG, _text_call, cpu_max_batch=2, cuda_max_batch=64),
    "sdxl": Shape("SDXL base U-Net, 4x128x128 latents, 77 tokens", "UNet2DConditionModel", SDXL_BASE_CONFIG,
                  SDXL_TINY_CONFIG, sdxl_call, cpu_max_batch=1, cuda_max_batch=16),
}


@torch.no_grad()
def macs_per_sample(shape: Shape, tiny: bool) -> int:
    """Conv and linear MACs of one sample's forward, counted on the meta device (no memory, no compute)."""
    unet = shape.build(tiny, "meta")
    return sum(_count_blocks(unet, shape.call(unet, 1, shape.size(tiny))).values())


@torch.no_grad()
def time_calls(call: Callable[[], Any], device: torch.device, warm: int, iters: int, rounds: int
               ) -> tuple[float, float]:
    """(seconds of ``warm`` warm-up calls, best seconds per call over ``rounds`` runs of ``iters`` calls); the device
    is synchronized around each run only, never between calls."""
    with autocast(device):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(warm):
            call()
        synchronize(device)
        warmup = time.perf_counter() - t0
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            synchronize(device)
            best = min(best, (time.perf_counter() - t0) / iters)
    return warmup, best


def run_shape(name: str, shape: Shape, batches: list[int], modes: list[str], device: torch.device, tiny: bool,
              iters: int, rounds: int, peak: float | None) -> tuple[list[dict], list[str]]:
    """One shape's rows (eager at every batch, then compiled at every batch) and the batches left out."""
    cap = shape.cuda_max_batch if device.type == "cuda" else shape.cpu_max_batch
    keep = [b for b in batches if b <= cap]
    skipped = [f"{name} batch {b}: above this device's cap of {cap} for the shape" for b in batches if b > cap]
    if not keep:
        return [], skipped
    macs = macs_per_sample(shape, tiny)
    size = shape.size(tiny)
    torch.manual_seed(0)
    unet = shape.build(tiny, device)
    rows, eager_speed, rec = [], {}, None
    for mode in modes:
        warm = 1
        if mode == "compiled":
            rec = compile_denoiser(unet, device)
            warm = rec.warm_calls + 1  # compile (and CUDA-graph recording), then one more before timing
        for b in keep:
            warmup, sec = time_calls(shape.call(unet, b, size), device, warm, iters, rounds)
            sps = b / sec
            rate = macs_rate(macs, sps)
            if mode == "eager":
                eager_speed[b] = sps
            what = shape.what + (f" (tiny stand-in at {size}x{size})" if tiny else "")
            rows.append({"shape": name, "what": what, "mode": mode,
                         "ran": rec.ran if mode == "compiled" else "eager", "batch": b, "latent": size,
                         "MACs_G": macs / 1e9, "seconds_per_forward": sec, "samples_per_s": sps,
                         "MACs_per_s_G": rate / 1e9, "peak_fraction": peak_fraction(rate, peak), "warmup_s": warmup,
                         "compiled_vs_eager": sps / eager_speed[b] if mode == "compiled" and b in eager_speed
                         else None})
    del unet
    return rows, skipped


def table(rows: list[dict]) -> str:
    out = ["| shape | mode | batch | MACs/sample (G) | s/forward | samples/s | GMACs/s | of bf16 peak | "
           "compiled / eager | warm-up (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = r["mode"] if r["ran"] == r["mode"] or r["mode"] == "eager" else f"{r['mode']} (ran {r['ran']})"
        peak = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.2f}%"
        cve = "" if r["compiled_vs_eager"] is None else f"{r['compiled_vs_eager']:.2f}x"
        out.append(f"| {r['what']} | {mode} | {r['batch']} | {r['MACs_G']:.3f} | {r['seconds_per_forward']:.4f} | "
                   f"{r['samples_per_s']:.2f} | {r['MACs_per_s_G']:.1f} | {peak} | {cve} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="cifar10", help="comma-separated: cifar10, sd15, sdxl")
    ap.add_argument("--batches", type=int_list, default=[1, 8], help="comma-separated batch sizes (a sweep)")
    ap.add_argument("--modes", type=modes_list, default=["eager", "compiled"], help="eager and/or compiled")
    ap.add_argument("--iters", type=int, default=3, help="forwards per timed run")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per row; the best is kept")
    ap.add_argument("--tiny", action="store_true", help="tiny stand-ins of the shapes (a smoke test)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args()
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in names if s not in SHAPES]
    if bad or not names:
        raise SystemExit(f"--shapes {args.shapes!r}: expected some of {', '.join(SHAPES)}")
    device = resolve_device(args.device)
    peak, peak_note = peak_bf16_tflops(device)
    rows, skipped = [], []
    for name in names:
        r, s = run_shape(name, SHAPES[name], args.batches, args.modes, device, args.tiny, args.iters, args.rounds,
                         peak)
        rows += r
        skipped += s
    info = {**machine_info(device), "shapes": names, "batches": args.batches, "modes": args.modes,
            "iters": args.iters, "rounds": args.rounds, "tiny": args.tiny, "peak_bf16_tflops": peak,
            "peak_note": peak_note, "skipped": skipped}
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return
    print(header(info, f"best of {args.rounds} runs of {args.iters} forwards; {peak_note}"))
    print(table(rows))
    for s in skipped:
        print(f"- left out: {s}")


if __name__ == "__main__":
    main()
