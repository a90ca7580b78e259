"""DKDM costs: one data-free training step against one data-based KD step, and the buffer's initialization.

For each teacher (the shipped digits teacher; the google/ddpm-cifar10-32 configuration with random
weights) and its ratio-0.3 template, in one run on one device:

1. step ratio: seconds per DKDM step (buffer draw + teacher forward + reverse-step write-back +
   student update) over seconds per data-based KD step (images + teacher forward + student
   update), K=1, output KD, same batch. The paper's claim is O(b) per step, like data-based KD;
   o2m's target is a ratio within 1.15.
2. initialization: teacher sample-forwards and seconds to build a buffer exactly (shuffle
   denoise: T-1-t ancestral steps per slot) and with an S-step DDIM jump (``--init-steps``).
   The exact build is timed in full for digits; for CIFAR10 (hours on a CPU) its cost is the
   exact forward count times the measured seconds per teacher sample-forward.

    python benchmarks/bench_dkdm.py [--device auto] [--only digits|cifar10] [--rounds 3] [--init-slots N]
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
from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.distill.plan import TimestepPlan
from o2mcli.distill.sources import ImageSource
from o2mcli.distill.sources.buffer import DynamicBuffer
from o2mcli.runtime.dist import DistState
from o2mcli.models.io import load_model
from o2mcli.models.configs import is_learned_variance
from o2mcli.diffusion.schedulers import teacher_reverse_settings
from o2mcli.distill.build import make_distiller
from o2mcli.stages.distill import DistillConfig


def _setups(work: Path, only: str | None) -> list[dict]:
    out = []
    if only in (None, "digits"):
        out.append({"name": "digits teacher", "teacher": BUILTIN_MODELS["digits-teacher"],
                    "images": load_dataset("digits").to_model_range(), "batch": 64, "steps": 20,
                    "init_slots": 512, "exact": True})
    if only in (None, "cifar10"):
        out.append({"name": "ddpm-cifar10-32 config", "teacher": cifar10_teacher(work), "images": torch.rand(256, 3, 32, 32) * 2 - 1,
                    "batch": 8, "steps": 3, "init_slots": 16, "exact": False})
    return out


def _buffer(teacher, slots: int, terms: DiffusionTerms, device: torch.device) -> DynamicBuffer:
    c, s = int(teacher.unet.config.in_channels), int(teacher.unet.config.sample_size)
    variance, clip = teacher_reverse_settings(teacher.scheduler_config, teacher.source)
    return DynamicBuffer((c, s, s), slots, terms, device, variance, learned=is_learned_variance(teacher.unet.config), clip=clip)


def _time_steps(eng, steps: int, device: torch.device) -> float:
    eng.step()  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--init-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (best kept)")
    ap.add_argument("--init-slots", type=int, help="buffer slots of the initialization timings (default: 512 digits, "
                    "16 cifar10)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for su in _setups(work, args.only):
            su["init_slots"] = args.init_slots or su["init_slots"]
            tpl = template(su["teacher"], work, su["name"])
            teacher = load_model(su["teacher"], "cpu")
            T = teacher.num_train_timesteps
            plan = TimestepPlan((0, T), 0.0)
            b = su["batch"]
            engines = {}
            for mode in ("o2mkd", "dkdm"):
                cfg = DistillConfig(template=str(tpl), mode=mode, students=1, batch_size=b)
                if mode == "o2mkd":
                    def src(terms, dev, im=su["images"]):
                        return ImageSource(im, terms, dev)
                else:
                    def src(terms, dev, t=teacher, n=max(4 * b, 64)):
                        return _buffer(t, n, terms, dev)
                eng = make_distiller(cfg, load_model(tpl, "cpu").unet, load_model(su["teacher"], "cpu"), plan,
                                     device, DistState(), src)
                if mode == "dkdm":
                    eng.source.initialize(eng.teacher, eng.gen_data, 1, 1024)
                engines[mode] = eng
            best = {m: float("inf") for m in engines}
            for _ in range(args.rounds):
                for m, eng in engines.items():
                    best[m] = min(best[m], _time_steps(eng, su["steps"], device))
            # Initialization: exact (digits: timed in full) and S-step DDIM, on a buffer of init_slots.
            terms = engines["dkdm"].terms
            tnet = engines["dkdm"].teacher
            init = {}
            for label, steps in (("ddim", args.init_steps), ("exact", None)):
                buf = _buffer(teacher, su["init_slots"], terms, device)
                g = torch.Generator().manual_seed(0)
                if steps is None and not su["exact"]:
                    target = torch.randint(0, T, (su["init_slots"],), generator=g)
                    init[label] = {"teacher_forwards": int((T - 1 - target).sum()), "seconds": None}
                    continue
                synchronize(device)
                t0 = time.perf_counter()
                buf.initialize(tnet, g, steps, 1024)
                synchronize(device)
                init[label] = {"teacher_forwards": buf.init_forwards, "seconds": time.perf_counter() - t0}
            per_forward = init["ddim"]["seconds"] / max(1, init["ddim"]["teacher_forwards"])
            if init["exact"]["seconds"] is None:
                init["exact"]["seconds_estimated"] = init["exact"]["teacher_forwards"] * per_forward
            rows.append({"teacher": su["name"], "batch": b, "T": T, "data_step_s": best["o2mkd"],
                         "dkdm_step_s": best["dkdm"], "step_ratio": best["dkdm"] / best["o2mkd"],
                         "init_slots": su["init_slots"], "init_steps": args.init_steps, "init": init,
                         "paper_buffer_slots_rho0.4": int(0.4 * T * b)})
    info = machine_info(device)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return
    print(header(info))
    print("| teacher | batch | data-based KD step (s) | DKDM step (s) | ratio | init slots | exact: forwards, s "
          f"| DDIM {args.init_steps}: forwards, s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ex, dd = r["init"]["exact"], r["init"]["ddim"]
        ex_s = f"{ex['seconds']:.1f}" if ex.get("seconds") is not None else f"~{ex['seconds_estimated']:.0f} (est.)"
        print(f"| {r['teacher']} | {r['batch']} | {r['data_step_s']:.3f} | {r['dkdm_step_s']:.3f} | "
              f"{r['step_ratio']:.3f} | {r['init_slots']} | {ex['teacher_forwards']}, {ex_s} | "
              f"{dd['teacher_forwards']}, {dd['seconds']:.1f} |")


if __name__ == "__main__":
    main()
