"""Sampling throughput, parameters and MACs: the digits teacher and the google/ddpm-cifar10-32 configuration.

Random weights for CIFAR10 (no download); the digits teacher is the shipped one. Every number
comes from this one run on this one device, so the ratios between rows are what to compare.

    python benchmarks/bench_sampling.py [--device auto] [--steps 10] [--batch 16] [--samplers ddim,ddpm,dpm++]
                                        [--only digits|cifar10] [--batches 16,64] [--modes eager,compiled]

``--samplers`` takes any ``o2m sample --scheduler`` names (ddpm, ddim, pndm, euler, euler-a, unipc, dpm++2m or its
alias dpm++, dpm++2m-karras). UNet forwards per second count the model calls a run makes: PNDM makes one more than
its steps (its second timestep twice).

Each sampler's cost per step is also given as a ratio to DDIM's on the same model, measured in the
same run: a sampler whose per-step cost regresses (DPM-Solver++ once ran 20x DDIM's on CPU) shows there.

DeepCache (``--deepcache 3`` by default, comma-separated intervals; ``--cache-branch``, the layer branch;
``--deepcache-schedule uniform|nonuniform``): with the first sampler,
each model's throughput with the cache on against the same run's plain throughput (the speed-up), beside the MACs
saved: full and partial forwards counted by ``o2mcli.models.stats``, averaged over the 1:N schedule of the
steps, and their ratio (the speed-up the MACs alone would give). DeepCache reports 1.61x at N=3 on CIFAR-10 on GPU.

Compiled sampling (``--modes eager,compiled``, at every batch of ``--batches``, default ``--batch``): with the first
sampler, each model eagerly and compiled (``o2m sample --compile``'s ``o2mcli.diffusion.compile``, on a copy),
timed alternately, best of ``--repeats`` runs; the compiling warm-up runs are not timed, their seconds reported
apart. Each row gives the MACs per second achieved (MACs of one forward x forwards / seconds) and, on CUDA, its
share of the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from common import (header, int_list, machine_info, macs_rate, modes_list, peak_bf16_tflops,
                    peak_fraction)
from o2mcli.chain import BUILTIN_MODELS
from o2mcli.devices import resolve_device
from o2mcli.diffusion.compile import compile_denoiser
from o2mcli.diffusion.deepcache import DeepCacheSpec, average_macs, scheduled_calls
from o2mcli.diffusion.sampler import measure_throughput
from o2mcli.diffusion.schedulers import SAMPLERS, make_scheduler, set_steps
from o2mcli.models import load_model
from o2mcli.models.configs import DDPM_CIFAR10_32, scheduler_config
from o2mcli.models.stats import count_deepcache_macs, count_macs, count_params

CIFAR10 = {k: v for k, v in DDPM_CIFAR10_32.items() if not k.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samplers", default="ddim,ddpm,dpm++", help="comma-separated --scheduler names (any of "
                    f"{', '.join(SAMPLERS)}); the first is the ratio's base")
    ap.add_argument("--only", choices=["digits", "cifar10"], help="one model only (default: both)")
    ap.add_argument("--deepcache", default="3", help="comma-separated DeepCache intervals N ('' for none)")
    ap.add_argument("--cache-branch", type=int, default=0, help="DeepCache's layer branch B")
    ap.add_argument("--deepcache-schedule", default="uniform", choices=("uniform", "nonuniform"))
    ap.add_argument("--batches", type=int_list, help="eager vs compiled at these batch sizes (default: --batch)")
    ap.add_argument("--modes", type=modes_list, default=["eager", "compiled"],
                    help="the compiled table's modes ('eager' alone: no compiled table)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    from diffusers import UNet2DModel

    samplers = [x.strip() for x in args.samplers.split(",") if x.strip()]
    unknown = [x for x in samplers if x not in SAMPLERS]
    if unknown or not samplers:  # stop before any model is built
        ap.error(f"--samplers {args.samplers!r}: choose from {', '.join(SAMPLERS)}")
    rows = []
    if args.only in (None, "digits"):
        teacher = load_model(BUILTIN_MODELS["digits-teacher"], device)
        rows.append(("digits teacher (shipped)", teacher.unet, teacher.scheduler_config))
    if args.only in (None, "cifar10"):
        rows.append(("ddpm-cifar10-32 config (random)", UNet2DModel(**CIFAR10).eval().to(device),
                     scheduler_config("fixed")))
    intervals = [int(x) for x in args.deepcache.split(",") if x.strip()]
    out, cached = [], []
    for name, unet, sched in rows:
        base = None
        for sampler in samplers:
            tp = measure_throughput(unet, sampler, sched, args.steps, args.batch, device, repeats=args.repeats)
            base = base or tp["images_per_s"]
            steps_taken = make_scheduler(sampler, sched)
            set_steps(steps_taken, args.steps)
            calls = len(steps_taken.timesteps)  # model calls per run (PNDM: steps + 1)
            out.append({"model": name, "sampler": sampler, "params_M": count_params(unet) / 1e6,
                        "MACs_G": count_macs(unet) / 1e9, "images_per_s": tp["images_per_s"],
                        "forwards_per_s": tp["images_per_s"] * calls / args.batch, "model_calls": calls,
                        "step_cost_vs_first": base / tp["images_per_s"], "steps": args.steps, "batch": args.batch})
        full, partial = count_macs(unet), count_deepcache_macs(unet, args.cache_branch) if intervals else 0
        if intervals:  # plain again, right before the cached runs: the speed-up compares neighbours in time
            base = measure_throughput(unet, samplers[0], sched, args.steps, args.batch, device,
                                      repeats=args.repeats)["images_per_s"]
        for n in intervals:
            spec = DeepCacheSpec(n, args.cache_branch, args.deepcache_schedule)
            tp = measure_throughput(unet, samplers[0], sched, args.steps, args.batch, device, repeats=args.repeats,
                                    deepcache=spec)
            calls = scheduled_calls(args.steps, n, args.deepcache_schedule)
            avg = average_macs(*calls, full, partial)
            cached.append({"model": name, "sampler": samplers[0], "interval": n, "branch": args.cache_branch,
                           "schedule": args.deepcache_schedule,
                           "full_calls": calls[0], "partial_calls": calls[1], "full_MACs_G": full / 1e9,
                           "partial_MACs_G": partial / 1e9, "avg_MACs_G": avg / 1e9, "MACs_saved": 1 - avg / full,
                           "MACs_ratio": full / avg, "images_per_s_plain": base,
                           "images_per_s_cached": tp["images_per_s"], "speedup": tp["images_per_s"] / base,
                           "speedup_vs_MACs_ratio": tp["images_per_s"] / base / (full / avg),
                           "steps": args.steps, "batch": args.batch})
    compiled = compiled_rows(rows, samplers[0], args, device) if "compiled" in args.modes else []
    info = {**machine_info(device), "peak_note": peak_bf16_tflops(device)[1]}
    if args.json:
        print(json.dumps({"machine": info, "rows": out, "deepcache": cached, "compiled": compiled}, indent=2))
        return
    print(header(info, f"{args.steps} sampler steps, batch {args.batch}"))
    print(f"| {'model':34s} | {'sampler':14s} | params (M) | MACs (G) | img/s   | UNet forwards/s | "
          f"step cost vs {samplers[0]} |")
    print(f"|{'-' * 36}|{'-' * 16}|-----------:|---------:|--------:|----------------:|-------------------:|")
    for r in out:
        print(f"| {r['model']:34s} | {r['sampler']:14s} | {r['params_M']:10.2f} | {r['MACs_G']:8.3f} | "
              f"{r['images_per_s']:7.2f} | {r['forwards_per_s']:15.2f} | {r['step_cost_vs_first']:17.2f}x |")

    if cached:
        print()
        print(f"DeepCache ({samplers[0]}, {args.steps} steps, batch {args.batch}; plain img/s re-measured just "
              "before the cached runs, in this same run):")
        print(f"| {'model':34s} | N | B | calls full/partial | full MACs (G) | partial MACs (G) | avg MACs (G) | "
              "MACs saved | MACs ratio | img/s plain | img/s cached | speed-up | speed-up / MACs ratio |")
        print(f"|{'-' * 36}|--:|--:|-------------------:|--------------:|-----------------:|-------------:|"
              "-----------:|-----------:|------------:|-------------:|---------:|----------------------:|")
        for r in cached:
            calls = f"{r['full_calls']}/{r['partial_calls']}"
            print(f"| {r['model']:34s} | {r['interval']} | {r['branch']} | {calls:>18s} | "
                  f"{r['full_MACs_G']:13.3f} | {r['partial_MACs_G']:16.3f} | {r['avg_MACs_G']:12.3f} | "
                  f"{r['MACs_saved']:10.1%} | {r['MACs_ratio']:9.2f}x | {r['images_per_s_plain']:11.2f} | "
                  f"{r['images_per_s_cached']:12.2f} | {r['speedup']:7.2f}x | {r['speedup_vs_MACs_ratio']:21.2f} |")

    if compiled:
        print()
        print(f"Eager vs compiled ({samplers[0]}, {args.steps} steps; alternating, best of {args.repeats}; "
              f"warm-up not timed; {info['peak_note']}):")
        print(compiled_table(compiled))


def compiled_rows(rows: list, sampler: str, args: argparse.Namespace, device) -> list[dict]:
    """Each model eagerly and compiled (a compiled copy), alternating, at every batch of the sweep."""
    peak = peak_bf16_tflops(device)[0]
    batches = args.batches or [args.batch]
    out = []
    for name, unet, sched in rows:
        nets = {"eager": unet}
        if "compiled" in args.modes:
            nets["compiled"] = copy.deepcopy(unet)
            rec = compile_denoiser(nets["compiled"], device)
        macs = count_macs(unet)
        for b in batches:
            best, warm = {}, {}
            for _ in range(args.repeats):
                for mode in args.modes:
                    tp = measure_throughput(nets[mode], sampler, sched, args.steps, b, device, repeats=1,
                                            compile=rec if mode == "compiled" else False)
                    best[mode] = max(best.get(mode, 0.0), tp["images_per_s"])
                    warm.setdefault(mode, tp["warmup_s"])
            for mode in args.modes:
                rate = macs_rate(macs, best[mode], args.steps)
                out.append({"model": name, "sampler": sampler, "mode": mode,
                            "ran": rec.ran if mode == "compiled" else "eager", "batch": b, "steps": args.steps,
                            "MACs_G": macs / 1e9, "images_per_s": best[mode], "MACs_per_s_G": rate / 1e9,
                            "peak_fraction": peak_fraction(rate, peak), "warmup_s": warm[mode],
                            "compiled_vs_eager": best["compiled"] / best["eager"]
                            if mode == "compiled" and "eager" in best else None})
    return out


def compiled_table(rows: list[dict]) -> str:
    out = ["| model | mode | batch | MACs (G) | img/s | GMACs/s | of bf16 peak | compiled / eager | warm-up (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = r["mode"] if r["ran"] == r["mode"] or r["mode"] == "eager" else f"{r['mode']} (ran {r['ran']})"
        peak = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.2f}%"
        cve = "" if r["compiled_vs_eager"] is None else f"{r['compiled_vs_eager']:.2f}x"
        out.append(f"| {r['model']} | {mode} | {r['batch']} | {r['MACs_G']:.3f} | {r['images_per_s']:.2f} | "
                   f"{r['MACs_per_s_G']:.2f} | {peak} | {cve} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
