"""Distillation throughput: K=1 (O2OKD) against K=4 (O2MKD) students on one engine, in one run.

For each teacher (the shipped digits teacher; the google/ddpm-cifar10-32 configuration with
random weights and random images, which is enough for speed) a ratio-0.3 template is pruned,
then the engine is timed for K=1 and K=4 at the same batch per student. Timing synchronizes
around the teacher forward and the student updates (profiling mode), so the teacher's share of
a step is measured, not estimated. "K=4 / 4 x K=1" below 1 means one K=4 run costs less than
four separate O2OKD runs: students that train on the same batch share one teacher forward.

With ``--parallel``, student-parallel distillation instead: ``o2m distill -k 4`` on the digits teacher run
end to end as 1 process with 1 thread, as 1 process with 2 threads, and as ``torchrun --nproc_per_node 2``
with 1 thread per rank (the same 2 cores; the ratio is against 1 process with 2 threads), the wall time of the whole command and of the training loop (the manifest's
``seconds``), and every process's peak memory (ru_maxrss): 1 process holding 4 students against ranks
holding 2 each. The 1-thread runs on 1 and 2 processes write the same weights (checked here too).

    python benchmarks/bench_distill.py [--device auto] [--steps 6] [--batch 32] [--only digits|cifar10]
    python benchmarks/bench_distill.py --parallel [--steps 40] [--batch 32]
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


def parallel(steps: int, batch: int) -> dict:
    """K=4 on 1 process (2 threads) and on 2 torchrun processes (1 thread each): wall time, loop time, peak RSS."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from o2mcli.manifest import read_manifest

    here = Path(__file__).resolve().parent
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        raise SystemExit("torchrun is not installed beside this python")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tpl = template(BUILTIN_MODELS["digits-teacher"], work, "digits")
        args = ["distill", str(tpl), "-k", "4", "--steps", str(steps), "--batch-size", str(batch), "--device", "cpu",
                "--save-every", str(steps * 10), "--log-every", str(steps)]
        outs = {}
        for nproc, threads in ((1, 1), (1, 2), (2, 1)):
            env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
            rss, out = work / f"rss{nproc}_{threads}.jsonl", work / f"out{nproc}_{threads}"
            script = [str(here / "distill_rank.py"), str(rss), *args, "-o", str(out)]
            if nproc == 1:
                cmd = [sys.executable, *script]
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                       str(port), *script]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            peaks = [json.loads(x) for x in rss.read_text().splitlines()]
            loop = read_manifest(out).summary["seconds"]
            rows.append({"processes": nproc, "threads_per_process": threads, "students_per_process": 4 // nproc,
                         "steps": steps, "batch": batch, "wall_s": wall, "loop_s": loop,
                         "max_rss_mib_per_rank": [p["max_rss_mib"] for p in sorted(peaks, key=lambda p: p["rank"])]})
            outs[(nproc, threads)] = out
        # bitwise at equal threads per process (a thread count changes a CPU kernel's sum order)
        ref, par = outs[(1, 1)], outs[(2, 1)]
        same = all(torch.equal(a[n], b[n])
                   for m in read_manifest(ref).models
                   for a, b in [(load_file(str(ref / m.artifact)), load_file(str(par / m.artifact)))]
                   for n in a)
    one, two = rows[1], rows[2]
    return {"rows": rows, "same_weights": same, "wall_ratio": two["wall_s"] / one["wall_s"],
            "loop_ratio": two["loop_s"] / one["loop_s"]}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, help="timed steps (default: 20 digits, 4 cifar10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="batch per student per step (default: 32 digits, 8 cifar10)")
    ap.add_argument("--p-own", type=float, default=0.5)
    ap.add_argument("--kd", default="output")
    ap.add_argument("--parallel", action="store_true",
                    help="student-parallel: K=4 on 1 process against 2 torchrun processes (CPU)")
    args = ap.parse_args()
    if args.parallel:
        res = parallel(args.steps or 40, args.batch or 32)
        if args.json:
            print(json.dumps(res, indent=2))
            return
        print(f"o2m distill -k 4 on the digits teacher, CPU, torch {torch.__version__}; same weights: "
              f"{res['same_weights']}")
        print("| processes | threads each | students each | steps | batch | wall s (whole command) | loop s "
              "| peak RSS per process (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in res["rows"]:
            print(f"| {r['processes']} | {r['threads_per_process']} | {r['students_per_process']} | {r['steps']} | "
                  f"{r['batch']} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | "
                  f"{', '.join(f'{m:.0f}' for m in r['max_rss_mib_per_rank'])} |")
        print(f"\n2 processes / 1 process with 2 threads: wall {res['wall_ratio']:.2f}x, training loop {res['loop_ratio']:.2f}x")
        return
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
