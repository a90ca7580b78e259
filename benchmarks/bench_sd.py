"""Stable Diffusion UNet templates against their teacher: params, MACs and sampling throughput in one run.

Teacher: the UNet of SD 1.4/1.5 (diffusers' ``unet/config.json``, written out below) with random
weights (no download; size and speed do not depend on the weights). Templates, made in memory by
``o2m prune``'s own code (``stages.prune.make_template``, magnitude importance): uniform slimming at
ratios 0.3 and 0.5, and BK-SDM's block removal bk-base, bk-small and bk-tiny. BK-SDM reports U-Nets
of 0.58 B / 0.49 B / 0.33 B params against SD-v1.4's 0.86 B.

MACs: one UNet call on one 64x64 latent with 77 text tokens (convolutions and linear layers, as
``o2m score`` counts them; attention matmuls not included); classifier-free guidance runs the UNet
twice per step, so a guided step costs the x2 column. Throughput: full DDIM sampling runs of
``--steps`` steps at batch ``--batch``, unguided (one UNet call a step; zero text embeddings, whose values do
not change the cost), on
CUDA under o2m's bf16 autocast; the teacher is timed first and last and its best is the baseline,
so only the ratios within one run are meaningful. Models are made and timed one at a time to bound
memory (the fp32 teacher alone is 3.4 GB).

    python benchmarks/bench_sd.py [--device auto] [--steps 2] [--batch 1] [--no-throughput] [--tiny]
                                  [--out runs/bench_sd] [--json]

``--tiny`` swaps in a small SD-shaped config (a smoke test in seconds); ``--out P`` writes P.json and P.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from common import header, machine_info, write_outputs
from o2mcli.devices import resolve_device
from o2mcli.diffusion.sampler import measure_throughput
from o2mcli.models.io import build_unet, unet_config_of
from o2mcli.models.stats import count_macs, count_params
from o2mcli.pruning.widths import reference_unet
from o2mcli.stages.prune import make_template

# diffusers' CompVis/stable-diffusion-v1-4 (and v1-5) unet/config.json.
SD_V1_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# The same shape, small: three stages so that bk-tiny applies (its two innermost widths equal, as SD's).
TINY_UNET = {**SD_V1_UNET, "block_out_channels": [32, 64, 64], "cross_attention_dim": 32, "sample_size": 16,
             "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
# SD 1.x's scheduler (scaled-linear betas, T = 1000).
SD_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                "steps_offset": 1, "prediction_type": "epsilon"}
VARIANTS = (("ratio 0.3", {"ratio": 0.3}), ("ratio 0.5", {"ratio": 0.5}), ("bk-base", {"blocks": "bk-base"}),
            ("bk-small", {"blocks": "bk-small"}), ("bk-tiny", {"blocks": "bk-tiny"}))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps per timed sampling run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-throughput", action="store_true", help="params and MACs only")
    ap.add_argument("--tiny", action="store_true", help="a small SD-shaped config instead of SD 1.x's (smoke test)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return ap


def _macs(unet: torch.nn.Module) -> int:
    """MACs of one batch-1 call, counted on the meta device (no memory, no compute)."""
    return count_macs(reference_unet(unet_config_of(unet)))


def _speed(unet: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    unet.to(device).eval()
    r = measure_throughput(unet, "ddim", SD_SCHEDULER, args.steps, args.batch, device, repeats=1)
    unet.to("cpu")
    return r["images_per_s"]


def run(args: argparse.Namespace) -> dict:
    """Every row of the table, and what it was measured on."""
    device = resolve_device(args.device)
    cfg = TINY_UNET if args.tiny else SD_V1_UNET
    torch.manual_seed(0)
    teacher = build_unet(cfg, None, Path("sd-v1-unet"))
    rows = [{"model": "teacher", "params": count_params(teacher), "macs": _macs(teacher),
             "block_out_channels": list(cfg["block_out_channels"]), "layers_per_block": 2, "mid_block": True,
             "prune_seconds": None}]
    speed = {}
    if not args.no_throughput:
        speed["teacher"] = _speed(teacher, args, device)
    for name, kw in VARIANTS:
        t0 = time.perf_counter()
        template, _ = make_template(teacher, **kw, where=Path("sd-v1-unet"))
        rows.append({"model": name, "params": count_params(template), "macs": _macs(template),
                     "block_out_channels": list(template.config.block_out_channels),
                     "layers_per_block": template.config.layers_per_block,
                     "mid_block": template.mid_block is not None,
                     "prune_seconds": round(time.perf_counter() - t0, 2)})
        if not args.no_throughput:
            speed[name] = _speed(template, args, device)
        del template
        gc.collect()
    if not args.no_throughput:
        speed["teacher"] = max(speed["teacher"], _speed(teacher, args, device))  # first and last: damp drift
    base = rows[0]
    for r in rows:
        r["params_B"] = round(r["params"] / 1e9, 4)
        r["params_ratio"] = round(r["params"] / base["params"], 4)
        r["macs_G"] = round(r["macs"] / 1e9, 3)
        r["macs_G_cfg"] = round(2 * r["macs"] / 1e9, 3)  # classifier-free guidance: two UNet calls a step
        r["macs_ratio"] = round(r["macs"] / base["macs"], 4)
        if speed:
            r["images_per_s"] = round(speed[r["model"]], 4)
            r["speedup"] = round(speed[r["model"]] / speed["teacher"], 3)
    info = {**machine_info(device), "config": "tiny" if args.tiny else "SD 1.x UNet", "latent": cfg["sample_size"],
            "steps": None if args.no_throughput else args.steps, "batch": None if args.no_throughput else args.batch}
    return {"machine": info, "rows": rows}


def markdown(res: dict) -> str:
    """The table, under a line naming the machine and the sampling settings."""
    info, rows = res["machine"], res["rows"]
    timed = "images_per_s" in rows[0]
    what = (f"{info['config']}, {info['latent']}x{info['latent']} latents; " +
            (f"DDIM {info['steps']} steps, batch {info['batch']}" if timed else "no throughput measured"))
    lines = [header(info, what), "",
             "| model | block_out_channels | layers/block | mid block | params (M) | params vs teacher | "
             "MACs/call (G) | MACs/step with CFG (G) | MACs vs teacher |" + (" img/s | speedup |" if timed else ""),
             "|---|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else "")]
    for r in rows:
        line = (f"| {r['model']} | {r['block_out_channels']} | {r['layers_per_block']} | "
                f"{'yes' if r['mid_block'] else 'no'} | {r['params'] / 1e6:.1f} | {r['params_ratio']:.1%} | "
                f"{r['macs_G']:.2f} | {r['macs_G_cfg']:.2f} | {r['macs_ratio']:.1%} |")
        if timed:
            line += f" {r['images_per_s']:.3f} | {r['speedup']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    args = _parser().parse_args()
    res = run(args)
    write_outputs(res, markdown(res), args.out, args.json)


if __name__ == "__main__":
    main()
