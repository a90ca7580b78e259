"""Pruned templates against their teacher: params, MACs and measured sampling throughput in one run.

Teachers: the google/ddpm-cifar10-32 configuration with random weights (no download; pruning
cost and speed do not depend on the weights) and the shipped digits teacher. Each is pruned by
``o2m prune``'s library call at ratios 0.3 and 0.5 (magnitude importance); then teacher and
templates are timed alternately in the same process, best of ``--rounds`` full DDIM sampling runs
each, so only the ratios between rows of one run are meaningful.

    python benchmarks/bench_prune.py [--device auto] [--steps 5] [--batch 16] [--rounds 2] [--only cifar10]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


from common import cifar10_teacher, header, machine_info, parser
from o2mcli.chain import BUILTIN_MODELS
from o2mcli.devices import resolve_device
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
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; the best of each is kept")
    args = ap.parse_args()
    device = resolve_device(args.device)
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
            best = {k: 0.0 for k in models}
            for _ in range(args.rounds):
                for k, m in models.items():
                    tp = measure_throughput(m.unet, "ddim", m.scheduler_config, args.steps, args.batch, device,
                                            repeats=1)
                    best[k] = max(best[k], tp["images_per_s"])
            base = models["teacher"].unet
            for k, m in models.items():
                u = m.unet
                results.append({
                    "teacher": name, "model": k, "block_out_channels": list(u.config.block_out_channels),
                    "params_M": count_params(u) / 1e6, "MACs_G": count_macs(u) / 1e9,
                    "MACs_ratio": count_macs(base) / count_macs(u), "images_per_s": best[k],
                    "speedup": best[k] / best["teacher"],
                    "prune_seconds": prune_s.get(float(k.split()[-1])) if k != "teacher" else None})
    info = {**machine_info(device), "steps": args.steps, "batch": args.batch, "rounds": args.rounds}
    if args.json:
        print(json.dumps({"machine": info, "rows": results}, indent=2))
        return
    print(header(info, f"DDIM {args.steps} steps, batch {args.batch}, best of {args.rounds} alternating rounds"))
    print("| teacher | model | block_out_channels | params (M) | MACs (G) | teacher/model MACs | img/s | speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['teacher']} | {r['model']} | {r['block_out_channels']} | {r['params_M']:.2f} | {r['MACs_G']:.3f} | "
              f"{r['MACs_ratio']:.2f}x | {r['images_per_s']:.2f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
