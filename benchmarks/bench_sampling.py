"""Sampling throughput, parameters and MACs: the digits teacher and the google/ddpm-cifar10-32 configuration.

Random weights for CIFAR10 (no download); the digits teacher is the shipped one. Every number
comes from this one run on this one device, so the ratios between rows are what to compare.

    python benchmarks/bench_sampling.py [--device auto] [--steps 10] [--batch 16] [--samplers ddim,ddpm,dpm++]

Each sampler's cost per step is also given as a ratio to DDIM's on the same model, measured in the
same run: a sampler whose per-step cost regresses (DPM-Solver++ once ran 20x DDIM's on CPU) shows there.
"""

from __future__ import annotations

import argparse
import json

import torch

from common import header, machine_info
from o2mcli.chain import BUILTIN_MODELS
from o2mcli.devices import resolve_device
from o2mcli.diffusion.sampler import measure_throughput
from o2mcli.models import load_model
from o2mcli.models.configs import DDPM_CIFAR10_32, scheduler_config
from o2mcli.models.stats import count_macs, count_params

CIFAR10 = {k: v for k, v in DDPM_CIFAR10_32.items() if not k.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samplers", default="ddim,ddpm,dpm++", help="comma-separated; the first is the ratio's base")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    from diffusers import UNet2DModel

    teacher = load_model(BUILTIN_MODELS["digits-teacher"], device)
    rows = [("digits teacher (shipped)", teacher.unet, teacher.scheduler_config),
            ("ddpm-cifar10-32 config (random)", UNet2DModel(**CIFAR10).eval().to(device), scheduler_config("fixed"))]
    samplers = [x.strip() for x in args.samplers.split(",") if x.strip()]
    out = []
    for name, unet, sched in rows:
        base = None
        for sampler in samplers:
            tp = measure_throughput(unet, sampler, sched, args.steps, args.batch, device, repeats=args.repeats)
            base = base or tp["images_per_s"]
            out.append({"model": name, "sampler": sampler, "params_M": count_params(unet) / 1e6,
                        "MACs_G": count_macs(unet) / 1e9, "images_per_s": tp["images_per_s"],
                        "forwards_per_s": tp["images_per_s"] * args.steps / args.batch,
                        "step_cost_vs_first": base / tp["images_per_s"], "steps": args.steps, "batch": args.batch})
    info = machine_info(device)
    if args.json:
        print(json.dumps({"machine": info, "rows": out}, indent=2))
        return
    print(header(info, f"{args.steps} sampler steps, batch {args.batch}"))
    print(f"| {'model':34s} | sampler | params (M) | MACs (G) | img/s   | UNet forwards/s | step cost vs {samplers[0]} |")
    print(f"|{'-' * 36}|---------|-----------:|---------:|--------:|----------------:|-------------------:|")
    for r in out:
        print(f"| {r['model']:34s} | {r['sampler']:7s} | {r['params_M']:10.2f} | {r['MACs_G']:8.3f} | "
              f"{r['images_per_s']:7.2f} | {r['forwards_per_s']:15.2f} | {r['step_cost_vs_first']:17.2f}x |")


if __name__ == "__main__":
    main()
