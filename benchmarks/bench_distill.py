"""Distillation throughput: K=1 (O2OKD) against K=4 (O2MKD) students on one engine, in one run.

For each teacher (the shipped digits teacher; the google/ddpm-cifar10-32 configuration with
random weights and random images, which is enough for speed) a ratio-0.3 template is pruned,
then the engine is timed for K=1 and K=4 at the same batch per student. Timing synchronizes
around the teacher forward and the student updates (profiling mode), so the teacher's share of
a step is measured, not estimated. "K=4 / 4 x K=1" below 1 means one K=4 run costs less than
four separate O2OKD runs: students that train on the same batch share one teacher forward, and
the distinct batches of a step go through the teacher in one call.

    python benchmarks/bench_distill.py [--device auto] [--steps 6] [--batch 32] [--only digits|cifar10]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from common import cifar10_teacher, header, machine_info, parser, template
from o2mcli.chain import BUILTIN_MODELS
from o2mcli.data import load_dataset
from o2mcli.devices import resolve_device, synchronize
from o2mcli.distill.plan import TimestepPlan, uniform_boundaries
from o2mcli.distill.sources import ImageSource
from o2mcli.runtime.dist import DistState
from o2mcli.models.io import load_model
from o2mcli.distill.build import make_distiller
from o2mcli.stages.distill import DistillConfig


def _teachers(work: Path, only: str | None) -> dict[str, tuple[Path, torch.Tensor]]:
    out = {}
    if only in (None, "digits"):
        out["digits teacher"] = (BUILTIN_MODELS["digits-teacher"], load_dataset("digits").to_model_range())
    if only in (None, "cifar10"):
        out["ddpm-cifar10-32 config"] = (cifar10_teacher(work), torch.rand(256, 3, 32, 32) * 2 - 1)
    return out


def measure(tpl: Path, teacher_path: Path, images: torch.Tensor, k: int, p_own: float, kd: str, batch: int,
            steps: int, warmup: int, device: torch.device) -> dict:
    cfg = DistillConfig(template=str(tpl), students=k, p_own=p_own, kd=kd, batch_size=batch, steps=steps)
    teacher = load_model(teacher_path, "cpu")
    plan = TimestepPlan(tuple(uniform_boundaries(teacher.num_train_timesteps, k)), p_own)
    eng = make_distiller(cfg, load_model(tpl, "cpu").unet, teacher, plan, device, DistState(),
                         lambda terms, dev: ImageSource(images, terms, dev))
    for _ in range(warmup):
        eng.step()
    eng.profile = True
    eng.timings = {key: 0.0 for key in eng.timings}
    eng.teacher_samples = 0
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    synchronize(device)
    total = time.perf_counter() - t0
    return {"K": k, "p_own": p_own, "kd": kd, "seconds_per_step": total / steps,
            "student_images_per_s": k * batch * steps / total,
            "teacher_share": eng.timings["teacher"] / total,
            "teacher_forwards_per_student_sample": eng.teacher_samples / (steps * k * batch)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, help="timed steps (default: 20 digits, 4 cifar10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="batch per student per step (default: 32 digits, 8 cifar10)")
    ap.add_argument("--p-own", type=float, default=0.5)
    ap.add_argument("--kd", default="output")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (teacher_path, images) in _teachers(work, args.only).items():
            tpl = template(teacher_path, work, name)
            small = name.startswith("digits")
            batch = args.batch or (32 if small else 8)
            steps = args.steps or (20 if small else 4)
            one = measure(tpl, teacher_path, images, 1, 0.0, args.kd, batch, steps, args.warmup, device)
            four = measure(tpl, teacher_path, images, 4, args.p_own, args.kd, batch, steps, args.warmup, device)
            for r in (one, four):
                r.update(teacher=name, batch=batch, steps=steps)
                r["vs_K_separate_O2OKD_runs"] = r["seconds_per_step"] / (r["K"] * one["seconds_per_step"])
                rows.append(r)
    info = {**machine_info(device), "kd": args.kd}
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return
    print(header(info, f"{args.warmup} warm-up steps, kd={args.kd}"))
    print("| teacher | batch/student | timed steps | K | p_own | s/step | student img/s | teacher share of step | teacher fwd / student sample "
          "| cost vs K separate O2OKD runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['teacher']} | {r['batch']} | {r['steps']} | {r['K']} | {r['p_own']} | {r['seconds_per_step']:.3f} | "
              f"{r['student_images_per_s']:.1f} | {r['teacher_share']:.1%} | "
              f"{r['teacher_forwards_per_student_sample']:.3f} | {r['vs_K_separate_O2OKD_runs']:.2f} |")


if __name__ == "__main__":
    main()
