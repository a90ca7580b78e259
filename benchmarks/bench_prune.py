"""Pruned templates against their teacher: params, MACs and measured sampling throughput in one run, eager and compiled.

Teachers: the google/ddpm-cifar10-32 configuration with random weights (no download; pruning
cost and speed do not depend on the weights) and the shipped digits teacher. Each is pruned by
``o2m prune``'s library call at ratios 0.3 and 0.5 (magnitude importance); then teacher and
templates are timed alternately in the same process, best of ``--rounds`` full DDIM sampling runs
each, so only the ratios between rows of one run are meaningful.

``--modes eager,compiled``: each model is timed eagerly and compiled (``o2m sample --compile``'s
``o2mcli.diffusion.compile``, on a copy of it), alternately with the others, at every batch of
``--batches`` (a sweep). Warm-up (compiling) runs are not timed; their seconds are reported apart.
Each row reports the MACs per second it achieved (MACs of one forward x forwards / seconds), on
CUDA also the share of the device's bf16 peak, and for a template its speed-up over the teacher in
the same mode and batch beside its MACs ratio, and the ratio of the two (1.0: the template is as
much faster as its MACs say; the goal for compiled sampling is 0.8 at batch 64).

    python benchmarks/bench_prune.py [--device auto] [--steps 5] [--batches 16] [--modes eager,compiled]
                                     [--rounds 2] [--only cifar10] [--json]
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path


from common import (cifar10_teacher, header, int_list, machine_info, macs_rate, modes_list, parser, peak_bf16_tflops,
                    peak_fraction)
from o2mcli.chain import BUILTIN_MODELS
from o2mcli.devices import resolve_device
from o2mcli.diffusion.compile import compile_denoiser
from o2mcli.diffusion.sampler import measure_throughput
from o2mcli.models.io import load_model
from o2mcli.models.stats import count_macs, count_params
from o2mcli.stages.prune import PruneConfig, run_prune

RATIOS = (0.3, 0.5)


def _teachers(work: Path, only: str | None) -> dict[str, Path]:
    out = {}
    if only in (None, "cifar10"):
        out["ddpm-cifar10-32 config"] = cifar10_teacher(work)
    if only in (None, "digits"):
        out["digits teacher"] = BUILTIN_MODELS["digits-teacher"]
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps per sampling run")
    ap.add_argument("--batches", type=int_list, default=[16], help="comma-separated batch sizes (a sweep)")
    ap.add_argument("--modes", type=modes_list, default=["eager", "compiled"], help="eager and/or compiled")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; the best of each is kept")
    args = ap.parse_args()
    device = resolve_device(args.device)
    peak, peak_note = peak_bf16_tflops(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, teacher_path in _teachers(work, args.only).items():
            models = {"teacher": load_model(teacher_path, device)}
            prune_s = {}
            for r in RATIOS:
                t0 = time.perf_counter()
                out = run_prune(PruneConfig(teacher=str(teacher_path), ratio=r, throughput=False, device="cpu",
                                            out=work / f"{name}-{r}".replace(" ", "_")))
                prune_s[r] = time.perf_counter() - t0
                models[f"ratio {r}"] = load_model(out, device)
            # The compiled copies: compiled once each, in place; each batch shape compiles in its first warm-up.
            nets = {("eager", k): m.unet for k, m in models.items()} if "eager" in args.modes else {}
            records = {}
            if "compiled" in args.modes:
                for k, m in models.items():
                    nets[("compiled", k)] = copy.deepcopy(m.unet)
                    records[k] = compile_denoiser(nets[("compiled", k)], device)
            best: dict[tuple, float] = {}
            warmup: dict[tuple, float] = {}
            for _ in range(args.rounds):
                for b in args.batches:
                    for k, m in models.items():  # teacher and templates in turn, each mode in turn
                        for mode in args.modes:
                            tp = measure_throughput(nets[(mode, k)], "ddim", m.scheduler_config, args.steps, b, device,
                                                    repeats=1, compile=records.get(k) if mode == "compiled" else False)
                            key = (mode, k, b)
                            best[key] = max(best.get(key, 0.0), tp["images_per_s"])
                            warmup.setdefault(key, tp["warmup_s"])  # the first round's: the one that compiled
                            print(f"bench_prune: {name} {k} {mode} batch {b}: {tp['images_per_s']:.3f} img/s, "
                                  f"warm-up {tp['warmup_s']:.1f} s", file=sys.stderr, flush=True)
            base = models["teacher"].unet
            teacher_macs = count_macs(base)
            for b in args.batches:
                for k, m in models.items():
                    u = m.unet
                    macs = count_macs(u)
                    for mode in args.modes:
                        ips = best[(mode, k, b)]
                        rate = macs_rate(macs, ips, args.steps)
                        speedup = ips / best[(mode, "teacher", b)]
                        results.append({
                            "teacher": name, "model": k, "mode": mode, "batch": b,
                            "ran": records[k].ran if mode == "compiled" else "eager",
                            "block_out_channels": list(u.config.block_out_channels),
                            "params_M": count_params(u) / 1e6, "MACs_G": macs / 1e9,
                            "MACs_ratio": teacher_macs / macs, "images_per_s": ips, "speedup": speedup,
                            "speedup_vs_MACs_ratio": speedup / (teacher_macs / macs),
                            "compiled_vs_eager": (best[("compiled", k, b)] / best[("eager", k, b)]
                                                  if mode == "compiled" and "eager" in args.modes else None),
                            "MACs_per_s_G": rate / 1e9, "peak_fraction": peak_fraction(rate, peak),
                            "warmup_s": warmup[(mode, k, b)],
                            "prune_seconds": prune_s.get(float(k.split()[-1])) if k != "teacher" else None})
    info = {**machine_info(device), "steps": args.steps, "batches": args.batches, "modes": args.modes,
            "rounds": args.rounds, "peak_bf16_tflops": peak, "peak_note": peak_note}
    if args.json:
        print(json.dumps({"machine": info, "rows": results}, indent=2))
        return
    print(header(info, f"DDIM {args.steps} steps, best of {args.rounds} alternating rounds; {peak_note}"))
    print(table(results))


def table(rows: list[dict]) -> str:
    """The rows as markdown: one per teacher, model, mode and batch."""
    out = ["| teacher | model | mode | batch | block_out_channels | params (M) | MACs (G) | teacher/model MACs | "
           "img/s | speed-up | speed-up / MACs ratio | compiled / eager | GMACs/s | of bf16 peak | warm-up (s) |",
           "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = r["mode"] if r["ran"] == r["mode"] or r["mode"] == "eager" else f"{r['mode']} (ran {r['ran']})"
        cve = "" if r["compiled_vs_eager"] is None else f"{r['compiled_vs_eager']:.2f}x"
        peak = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.2f}%"
        out.append(f"| {r['teacher']} | {r['model']} | {mode} | {r['batch']} | {r['block_out_channels']} | "
                   f"{r['params_M']:.2f} | {r['MACs_G']:.3f} | {r['MACs_ratio']:.2f}x | {r['images_per_s']:.2f} | "
                   f"{r['speedup']:.2f}x | {r['speedup_vs_MACs_ratio']:.2f} | {cve} | {r['MACs_per_s_G']:.1f} | "
                   f"{peak} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
