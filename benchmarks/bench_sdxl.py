"""SDXL block-removal templates (KOALA-1B/700M, SSD-1B, Segmind-Vega) against the SDXL U-Net: params, MACs, CPU speed.

The teacher is SDXL base 1.0's U-Net config (``o2mcli.pruning.pruners.sdxl_blocks.SDXL_BASE_CONFIG``) with random weights
(no download: cost and speed do not depend on the weights); each template is ``remove_sdxl_blocks``' student of it.
Parameters and MACs are counted on the meta device (no memory): MACs are those of the convolutions and linear layers
of one forward at ``--size`` latents (128: 1024 px), text of 77 tokens, as ``o2mcli.models.stats`` counts them
(attention-score matmuls not counted); "with CFG" is the batch-2 forward classifier-free guidance makes per step.
Throughput is measured on the CPU in one run: each template (real weights, float32) is timed against the teacher,
alternately, ``--repeats`` batch-1 forwards each at ``--throughput-size`` latents after one uncounted warm-up forward
of each, the best kept; its speedup is the teacher's time over its own from that pair. Only ratios within one run are
meaningful. The real teacher needs ~10 GB of memory, plus up to ~5 GB for a template.

    python benchmarks/bench_sdxl.py [--size 128] [--throughput-size 32] [--repeats 2] [--no-throughput] [--tiny]
                                    [--json]

``--tiny`` swaps in a tiny SDXL-shaped U-Net (widths 32/64/128, transformer depths 1/2/8) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch
from torch import nn

from o2mcli.models.stats import _count_blocks
from o2mcli.pruning.pruners.sdxl_blocks import (PUBLISHED_PARAMS, SDXL_BASE_CONFIG, SDXL_VARIANTS, remove_sdxl_blocks,
                                        sdxl_removal_config)

TOKENS = 77  # CLIP's context length

# SDXL's structure at tiny widths; its innermost stacks (8) are deeper than every pattern keeps, so each one cuts.
TINY_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG, "sample_size": 8, "block_out_channels": [32, 64, 128], "transformer_layers_per_block": [1, 2, 8],
    "attention_head_dim": [1, 2, 4], "cross_attention_dim": 32, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8, "norm_num_groups": 8}


def build(cfg: dict[str, Any], device: str) -> nn.Module:
    """A plain diffusers UNet2DConditionModel of ``cfg`` on ``device`` ("meta": shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def sdxl_call(unet: nn.Module, batch: int, size: int) -> Callable[[], Any]:
    """One SDXL U-Net forward on zeros (latents, timestep, text, pooled text and size/crop ids) on its device."""
    cfg = unet.config
    p = next(unet.parameters())
    kw = {"device": p.device, "dtype": p.dtype}
    cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.zeros(batch, cfg.in_channels, size, size, **kw)
    t = torch.full((batch,), 500, device=p.device)
    text = torch.zeros(batch, TOKENS, cross, **kw)
    added = {"text_embeds": torch.zeros(batch, pooled, **kw), "time_ids": torch.zeros(batch, 6, **kw)}
    return lambda: unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)


@torch.no_grad()
def macs(unet: nn.Module, batch: int, size: int) -> int:
    """Conv and linear MACs of one forward of ``batch`` samples (works on the meta device)."""
    return sum(_count_blocks(unet, sdxl_call(unet, batch, size)).values())


@torch.no_grad()
def timed_pair(teacher: nn.Module, student: nn.Module, size: int, repeats: int) -> tuple[float, float]:
    """Best seconds per batch-1 forward of teacher and student, timed alternately ``repeats`` times each after one
    uncounted warm-up forward of each (alternating spreads any drift of the machine over both)."""
    calls = [sdxl_call(teacher, 1, size), sdxl_call(student, 1, size)]
    for call in calls:
        call()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, help="latent side for MACs (default 128 = 1024 px; 8 with --tiny)")
    ap.add_argument("--throughput-size", type=int, help="latent side for CPU timing (default 32; 8 with --tiny)")
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards per model (best kept)")
    ap.add_argument("--no-throughput", action="store_true", help="params and MACs only (meta device, seconds)")
    ap.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped U-Net instead of SDXL's (smoke test)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args()
    cfg = TINY_CONFIG if args.tiny else SDXL_BASE_CONFIG
    size = args.size or (8 if args.tiny else 128)
    tsize = args.throughput_size or (8 if args.tiny else 32)

    configs = {"sdxl": cfg, **{v: sdxl_removal_config(cfg, v, "sdxl-base").config for v in SDXL_VARIANTS}}
    rows = []
    for name, c in configs.items():
        meta = build(c, "meta")
        n = sum(p.numel() for p in meta.parameters())
        rows.append({"model": name, "params": n, "params_M": n / 1e6,
                     "published_params_M": None if args.tiny else PUBLISHED_PARAMS[name] / 1e6,
                     "params_vs_published": None if args.tiny else n / PUBLISHED_PARAMS[name],
                     "MACs_G": macs(meta, 1, size) / 1e9, "MACs_cfg_G": macs(meta, 2, size) / 1e9,
                     "transformer_layers_per_block": c["transformer_layers_per_block"],
                     "reverse_transformer_layers_per_block": c.get("reverse_transformer_layers_per_block"),
                     "layers_per_block": c["layers_per_block"], "mid_block_type": c.get("mid_block_type")})
    base = rows[0]
    for r in rows:
        r["teacher_MACs_ratio"] = base["MACs_G"] / r["MACs_G"]
        r["params_ratio"] = r["params"] / base["params"]

    if not args.no_throughput:
        torch.manual_seed(0)
        teacher = build(cfg, "cpu")
        secs: dict[str, float] = {}
        speedup = {"sdxl": 1.0}
        for v in SDXL_VARIANTS:  # one template in memory at a time, timed against the teacher beside it
            student, _ = remove_sdxl_blocks(teacher, v, "sdxl-base")
            t_sec, secs[v] = timed_pair(teacher, student, tsize, args.repeats)
            secs["sdxl"] = min(secs.get("sdxl", t_sec), t_sec)
            speedup[v] = t_sec / secs[v]  # against the teacher's time of the same pair
            del student
        for r in rows:
            r["seconds_per_call"] = secs[r["model"]]
            r["speedup"] = speedup[r["model"]]

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "config": "tiny" if args.tiny else "sdxl-base",
            "macs_latent_size": size, "throughput_latent_size": None if args.no_throughput else tsize,
            "repeats": None if args.no_throughput else args.repeats}
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return
    print(f"{info['config']} U-Net, MACs at {size}x{size} latents (77 tokens); CPU {info['cpu']}, "
          f"{info['threads']} threads, torch {info['torch']}"
          + ("" if args.no_throughput else f"; timing at {tsize}x{tsize}, best of {args.repeats}"))
    print("| model | params (M) | published (M) | MACs/call (G) | MACs with CFG (G) | teacher/model MACs | "
          "s/call | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pub = "-" if r["published_params_M"] is None else f"{r['published_params_M']:.0f}"
        sec = f"{r['seconds_per_call']:.3f}" if "seconds_per_call" in r else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"| {r['model']} | {r['params_M']:.1f} | {pub} | {r['MACs_G']:.1f} | {r['MACs_cfg_G']:.1f} | "
              f"{r['teacher_MACs_ratio']:.2f}x | {sec} | {sp} |")


if __name__ == "__main__":
    main()
