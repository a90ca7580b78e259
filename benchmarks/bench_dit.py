"""DiT templates against their teacher and the DDPM CIFAR10 UNet: params, MACs and sampling throughput in one run.

The teacher is a DiT-S/2-shaped ``DiTTransformer2DModel`` (12 blocks, width 384, 6 heads of 64, patch 2) in pixel
space at 32x32x3 with 10 classes, random weights (pruning cost and speed do not depend on them). Rows: the teacher;
``o2m prune``'s library call at ratio 0.5 (3 heads: width 192, MLP 768; magnitude importance); ``--drop-blocks 6``
(first and last kept, 6 blocks); both; and the google/ddpm-cifar10-32 UNet configuration (also random) for scale.
Models are timed alternately (full DDIM runs, best of ``--rounds``); only ratios within one run are meaningful.

    python benchmarks/bench_dit.py [--device auto] [--steps 5] [--batch 16] [--rounds 2] [--tiny] [--out P] [--json]

``--tiny`` swaps in a small DiT (smoke test in seconds); ``--out P`` writes P.json and P.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import header, machine_info, write_outputs
from o2mcli.devices import resolve_device
from o2mcli.diffusion.sampler import measure_throughput
from o2mcli.models.configs import DDPM_CIFAR10_32, scheduler_config
from o2mcli.models.families.dit import DiT
from o2mcli.models.io import build_unet
from o2mcli.models.stats import count_macs, count_params
from o2mcli.stages.prune import make_template

# DiT-S/2 (Peebles & Xie 2023, table 1) in pixel space: 32x32x3 images, 16x16 = 256 tokens, 10 classes.
DIT_S2 = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 6, "attention_head_dim": 64,
          "in_channels": 3, "out_channels": 3, "num_layers": 12, "sample_size": 32, "patch_size": 2,
          "num_embeds_ada_norm": 10, "norm_num_groups": 32}
TINY_DIT = {**DIT_S2, "num_attention_heads": 4, "attention_head_dim": 8, "num_layers": 4, "sample_size": 8}
TINY_UNET = {**DDPM_CIFAR10_32, "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "sample_size": 8,
             "layers_per_block": 1}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps per timed sampling run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; the best of each is kept")
    ap.add_argument("--tiny", action="store_true", help="a small DiT and UNet instead of DiT-S/2 (smoke test)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return ap


def _row(name: str, model: torch.nn.Module, prune_s: float | None) -> dict:
    c = model.config
    if hasattr(c, "num_attention_heads") and "num_layers" in c:
        shape = f"{c.num_layers} blocks, {c.num_attention_heads}x{c.attention_head_dim} heads"
    else:
        shape = f"UNet {list(c.block_out_channels)}"
    with torch.no_grad():
        macs = count_macs(model.eval())
    return {"model": name, "shape": shape, "params": count_params(model), "macs": macs,
            "prune_seconds": None if prune_s is None else round(prune_s, 2)}


def run(args: argparse.Namespace) -> dict:
    """Every row of the table, and what it was measured on."""
    device = resolve_device(args.device)
    cfg, ucfg = (TINY_DIT, TINY_UNET) if args.tiny else (DIT_S2, DDPM_CIFAR10_32)
    torch.manual_seed(0)
    where = Path("dit-s2")
    teacher = DiT().build(cfg, None, where)
    models: dict[str, torch.nn.Module] = {"DiT teacher": teacher}
    rows = [_row("DiT teacher", teacher, None)]
    drop = cfg["num_layers"] // 2
    for name, kw in (("DiT ratio 0.5", {"ratio": 0.5}), ("DiT drop-blocks", {"drop_blocks": drop}),
                     ("DiT drop-blocks + ratio 0.5", {"drop_blocks": drop, "ratio": 0.5})):
        t0 = time.perf_counter()
        models[name], _ = make_template(teacher, **kw, where=where)
        rows.append(_row(name, models[name], time.perf_counter() - t0))
    torch.manual_seed(0)
    models["DDPM UNet (cifar10-32 config)"] = build_unet(ucfg, None, Path("ddpm-cifar10-32"))
    rows.append(_row("DDPM UNet (cifar10-32 config)", models["DDPM UNet (cifar10-32 config)"], None))
    sched = scheduler_config("fixed")
    best = {k: 0.0 for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            r = measure_throughput(m.to(device).eval(), "ddim", sched, args.steps, args.batch, device, repeats=1)
            best[k] = max(best[k], r["images_per_s"])
    base = rows[0]
    for r in rows:
        r["params_M"] = round(r["params"] / 1e6, 3)
        r["params_ratio"] = round(r["params"] / base["params"], 4)
        r["macs_G"] = round(r["macs"] / 1e9, 4)
        r["macs_ratio"] = round(r["macs"] / base["macs"], 4)
        r["images_per_s"] = round(best[r["model"]], 3)
        r["speedup"] = round(best[r["model"]] / best["DiT teacher"], 3)
    info = {**machine_info(device), "config": "tiny" if args.tiny else "DiT-S/2 pixel 32x32x3",
            "steps": args.steps, "batch": args.batch, "rounds": args.rounds}
    return {"machine": info, "rows": rows}


def markdown(res: dict) -> str:
    """The table, under a line naming the machine and the sampling settings."""
    info = res["machine"]
    what = (f"{info['config']}; DDIM {info['steps']} steps, batch {info['batch']}, best of {info['rounds']} "
            "alternating rounds; ratios against the DiT teacher")
    lines = [header(info, what), "",
             "| model | shape | params (M) | params vs teacher | MACs (G) | MACs vs teacher | img/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['shape']} | {r['params_M']:.2f} | {r['params_ratio']:.1%} | "
                     f"{r['macs_G']:.3f} | {r['macs_ratio']:.1%} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    args = _parser().parse_args()
    if args.tiny:
        args.steps, args.batch, args.rounds = min(args.steps, 2), min(args.batch, 2), 1
    res = run(args)
    write_outputs(res, markdown(res), args.out, args.json)


if __name__ == "__main__":
    main()
