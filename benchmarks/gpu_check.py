"""`make gpu-check`: the CUDA-only tests and the benchmarks on one GPU, written to docs/benchmarks-gpu.md.

    python benchmarks/gpu_check.py [--device cuda] [--out docs/benchmarks-gpu.md] [--budget 900]

1. ``pytest tests/gpu`` (bf16 autocast against fp32 for train, distill, the DKDM buffer and sampling; DDP
   on nccl with one GPU), one JUnit record per test with each check's measured error and bound;
2. the five benchmarks (sampling, distill, dkdm, prune, compile) with ``--device`` and ``--json``, sized for a
   short run: sampling and prune eager and compiled (``--compile``), the compile sweep over the CIFAR-10, SD 1.x and
   SDXL U-Net shapes last (its compiles of the large U-Nets take minutes);
3. the page: the device, versions and date, every test's result with its checks, every benchmark's
   rows. It states what this run measured and nothing else; a test or benchmark that failed or was
   not reached says so.

``--device cpu`` is a dry run of the same code on the CPU (the tests with CPU bf16 autocast and gloo,
the benchmarks at tiny sizes, digits only, eager; the compile sweep compiles tiny stand-ins of the three shapes),
written to ``runs/gpu-check-cpu.md`` unless ``--out``
says otherwise: it catches errors before GPU time is spent and is not a result. Needs o2m importable
(installed, or the repository root on PYTHONPATH) and pytest; no network. Exit status 0 when every
test passed and every benchmark ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# Benchmark arguments per device: on CUDA sized so the whole check takes a few minutes on one GPU (the
# CIFAR10-config templates are pruned on the CPU, about 20-30 s each; each compiled architecture and batch compiles
# once, ~30-60 s for the CIFAR10 UNet, minutes for SD 1.x's and SDXL's); on the CPU a dry run, digits only.
BENCHMARKS = {
    "cuda": [
        ("sampling", "bench_sampling.py", ["--steps", "20", "--batch", "128", "--repeats", "2",
                                           "--modes", "eager,compiled"]),
        ("distill", "bench_distill.py", ["--steps", "10", "--warmup", "2", "--batch", "64"]),
        ("dkdm", "bench_dkdm.py", ["--rounds", "2"]),
        ("prune", "bench_prune.py", ["--steps", "10", "--batches", "64", "--rounds", "2", "--modes", "eager,compiled"]),
        ("compile", "bench_compile.py", ["--shapes", "cifar10,sd15,sdxl", "--batches", "1,64", "--iters", "5",
                                         "--rounds", "2"]),
    ],
    "cpu": [
        ("sampling", "bench_sampling.py", ["--steps", "2", "--batch", "2", "--repeats", "1", "--modes", "eager"]),
        ("distill", "bench_distill.py", ["--only", "digits", "--steps", "1", "--warmup", "0", "--batch", "4"]),
        ("dkdm", "bench_dkdm.py", ["--only", "digits", "--rounds", "1", "--init-slots", "8"]),
        ("prune", "bench_prune.py", ["--only", "digits", "--steps", "2", "--batches", "2", "--rounds", "1",
                                     "--modes", "eager"]),
        ("compile", "bench_compile.py", ["--tiny", "--shapes", "cifar10,sd15,sdxl", "--batches", "1", "--iters", "1",
                                         "--rounds", "1"]),
    ],
}


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# 1. The machine ------------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _run_text(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def machine(device: str) -> dict:
    """Device, driver and versions, read in this process."""
    import torch

    import o2mcli

    info = {"device": device, "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "diffusers": _version("diffusers"), "torch_pruning": _version("torch-pruning"),
            "pydantic": _version("pydantic"), "python": platform.python_version(), "o2m": o2mcli.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    driver=_run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    head = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if os.environ.get("O2M_GPU_CHECK_SOURCE"):  # a copy without .git: the caller names the source
        info["source"] = os.environ["O2M_GPU_CHECK_SOURCE"]
    elif head:
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        info["source"] = f"git {head}" + (" with uncommitted changes" if dirty else "")
    return info


# 2. The tests ---------------------------------------------------------------------------------------------------

def parse_junit(path: Path) -> list[dict]:
    """One record per test case: name, status, seconds, message, checks (from ``check:`` properties)."""
    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "").strip()
                break
        checks, notes = [], {}
        for p in tc.iter("property"):
            name, value = p.get("name", ""), p.get("value", "")
            if name.startswith("check:"):
                checks.append({"name": name[len("check:"):], **json.loads(value)})
            elif not name.startswith("differs:"):
                notes[name] = value
        out.append({"name": tc.get("name"), "status": status, "seconds": float(tc.get("time") or 0.0),
                    "message": message, "checks": checks, "notes": notes})
    return out


def run_tests(device: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-o",
               "junit_family=legacy", f"--junitxml={junit}"]
        env = {**os.environ, "O2M_GPU_CHECK_DEVICE": device, "O2M_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
        say(f"tests: {' '.join(cmd[2:])} (O2M_GPU_CHECK_DEVICE={device}, at most {timeout:.0f} s)")
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = res.returncode, (res.stdout + res.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = None, f"timed out after {timeout:.0f} s\n" + ((e.stdout or b"").decode(errors="replace")
                                                                    if isinstance(e.stdout, bytes) else (e.stdout or ""))[-2000:]
        seconds = time.perf_counter() - t0
        cases = parse_junit(junit) if junit.exists() else []
    print(tail, flush=True)
    return {"rc": rc, "seconds": seconds, "cases": cases, "tail": tail}


# 3. The benchmarks --------------------------------------------------------------------------------------------------

def run_benchmark(script: str, args: list[str], device: str, timeout: float) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--device", device, "--json", *args]
    env = {**os.environ, "O2M_PROGRESS": "0"}
    say(f"benchmark: {script} {' '.join(args)} (at most {timeout:.0f} s)")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - t0
    start = res.stdout.find("{")
    if res.returncode != 0 or start < 0:
        return {"ok": False, "seconds": seconds, "error": f"exit {res.returncode}: {res.stderr.strip()[-1500:]}"}
    try:
        data = json.loads(res.stdout[start:])
    except json.JSONDecodeError as e:
        return {"ok": False, "seconds": seconds, "error": f"unreadable output ({e}): {res.stdout[-500:]}"}
    return {"ok": True, "seconds": seconds, "machine": data["machine"], "rows": data["rows"],
            "compiled": data.get("compiled") or []}


# 4. The page ----------------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _cell(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _mode(r: dict) -> str:
    """A row's mode, and what actually ran where a compiled row fell back to eager."""
    return r["mode"] if r["mode"] == "eager" or r["ran"] == r["mode"] else f"{r['mode']} (ran {r['ran']})"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _peak(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _compiled_table(rows: list[dict]) -> list[str]:
    """bench_sampling's eager-vs-compiled rows."""
    out = ["| model | mode | batch | MACs (G) | img/s | GMACs/s | of bf16 peak | compiled / eager | warm-up (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['model']} | {_mode(r)} | {r['batch']} | {r['MACs_G']:.3f} | {r['images_per_s']:.1f} | "
            f"{r['MACs_per_s_G']:.1f} | {_peak(r['peak_fraction'])} | {_x(r['compiled_vs_eager'])} | "
            f"{r['warmup_s']:.1f} |" for r in rows]
    return out


def _bench_table(name: str, rows: list[dict]) -> list[str]:
    if name == "sampling":
        out = ["| model | sampler | params (M) | MACs (G) | img/s | UNet forwards/s | step cost vs the first sampler |",
               "|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['model']} | {r['sampler']} | {r['params_M']:.2f} | {r['MACs_G']:.3f} | {r['images_per_s']:.1f} | "
                f"{r['forwards_per_s']:.1f} | {r['step_cost_vs_first']:.2f}x |" for r in rows]
    elif name == "prune":
        out = ["| teacher | model | mode | batch | block_out_channels | params (M) | MACs (G) | MACs ratio | img/s | "
               "speed-up | speed-up / MACs ratio | compiled / eager | GMACs/s | of bf16 peak | warm-up (s) |",
               "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['teacher']} | {r['model']} | {_mode(r)} | {r['batch']} | "
                f"{', '.join(map(str, r['block_out_channels']))} | {r['params_M']:.2f} | {r['MACs_G']:.3f} | "
                f"{r['MACs_ratio']:.2f}x | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['speedup_vs_MACs_ratio']:.2f} | {_x(r['compiled_vs_eager'])} | {r['MACs_per_s_G']:.1f} | "
                f"{_peak(r['peak_fraction'])} | {r['warmup_s']:.1f} |" for r in rows]
    elif name == "compile":
        out = ["| shape | mode | batch | MACs/sample (G) | s/forward | samples/s | GMACs/s | of bf16 peak | "
               "compiled / eager | warm-up (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['what']} | {_mode(r)} | {r['batch']} | {r['MACs_G']:.3f} | {r['seconds_per_forward']:.4f} | "
                f"{r['samples_per_s']:.2f} | {r['MACs_per_s_G']:.1f} | {_peak(r['peak_fraction'])} | "
                f"{_x(r['compiled_vs_eager'])} | {r['warmup_s']:.1f} |" for r in rows]
    elif name == "distill":
        out = ["| teacher | batch/student | timed steps | K | s/step | student img/s | teacher share | "
               "teacher forwards per student sample | cost vs K separate O2OKD runs |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['teacher']} | {r['batch']} | {r['steps']} | {r['K']} | {r['seconds_per_step']:.4f} | "
                f"{r['student_images_per_s']:.1f} | {r['teacher_share']:.1%} | "
                f"{r['teacher_forwards_per_student_sample']:.3f} | {r['vs_K_separate_O2OKD_runs']:.2f} |" for r in rows]
    elif name == "dkdm":
        out = ["| teacher | batch | data-based KD step (s) | DKDM step (s) | ratio | buffer init, exact | "
               "buffer init, DDIM jumps |", "|---|---:|---:|---:|---:|---|---|"]
        for r in rows:
            ex, dd = r["init"]["exact"], r["init"]["ddim"]
            ex_s = (f"{ex['seconds']:.2f} s" if ex.get("seconds") is not None
                    else f"not run (estimated {ex['seconds_estimated']:.1f} s from the DDIM build's s/forward)")
            out.append(f"| {r['teacher']} | {r['batch']} | {r['data_step_s']:.4f} | {r['dkdm_step_s']:.4f} | "
                       f"{r['step_ratio']:.2f} | {r['init_slots']} slots: {ex['teacher_forwards']:,} forwards, {ex_s} | "
                       f"{r['init_steps']} jumps: {dd['teacher_forwards']:,} forwards, {dd['seconds']:.2f} s |")
    else:
        raise ValueError(name)
    return out


BENCH_NOTES = {
    "sampling": "Sampling throughput of full sampling runs, one warm-up run not counted; the step cost is relative "
                "to the first sampler on the same model, in this run.",
    "distill": "The distillation engine for K=1 (O2OKD) and K=4 (O2MKD, p_own 0.5, output KD) at the same batch per "
               "student, each on a ratio-0.3 template; the teacher's share of a step comes from synchronized timers.",
    "dkdm": "One DKDM step against one data-based KD step (K=1, output KD, same batch; best of the rounds), and "
            "the buffer's initialization.",
    "prune": "Teacher and ratio-0.3/0.5 templates (magnitude pruning, on the CPU) timed alternately in one process, "
             "eager and compiled (`--compile`), best of the rounds; DDIM sampling. Speed-up is over the teacher in "
             "the same mode and batch; speed-up / MACs ratio 1.0 means as much faster as the MACs say (goal for "
             "compiled: 0.8 at batch 64). Warm-up (compiling) seconds are not in img/s.",
    "compile": "Denoiser forwards at three U-Net shapes (random weights), eager then compiled in place (`--compile`: "
               "channels-last, bf16 weights, CUDA graphs), over a batch sweep; best of the rounds, warm-up "
               "(compiling, CUDA-graph recording) timed apart. Fraction of peak: 2 x MACs/s over the dense bf16 "
               "peak.",
}


def render(info: dict, tests: dict, benches: dict, argv: list[str], total_s: float) -> str:
    dry = info["device"] != "cuda"
    lines = ["# o2m on a GPU: CUDA checks and benchmarks" if not dry else "# o2m gpu-check: dry run on the CPU", ""]
    if dry:
        lines += ["A dry run of `benchmarks/gpu_check.py` on the CPU (bf16 from CPU autocast, DDP on gloo, "
                  "tiny benchmark sizes). It checks the code runs; it is not a GPU result.", ""]
    lines += [f"Written by `make gpu-check` (`python {' '.join(argv)}`) on {info['date']}. Every number on this "
              "page was measured in that one run; nothing else is claimed.", "",
              "| | |", "|---|---|"]
    if not dry:
        lines.append(f"| device | {info['gpu']} (compute capability {info['capability']}, {info['sms']} SMs, "
                     f"{info['gpu_memory_gib']} GiB), one GPU |")
        lines.append(f"| driver / CUDA (torch build) / cuDNN | {info.get('driver') or 'not read'} / {info['cuda_build']} / "
                     f"{info['cudnn']} |")
    lines.append(f"| CPU | {info['cpu']}, {info['cpu_count']} cores |")
    lines.append(f"| versions | torch {info['torch']}, diffusers {info['diffusers']}, torch-pruning "
                 f"{info['torch_pruning']}, pydantic {info['pydantic']}, Python {info['python']}, o2m {info['o2m']} |")
    if info.get("source"):
        lines.append(f"| source | {info['source']} |")
    lines.append(f"| wall time | {total_s:.0f} s in all: tests {tests['seconds']:.0f} s, benchmarks "
                 f"{sum(b['seconds'] for b in benches.values() if b):.0f} s |")
    lines.append("")

    # Tests
    cases = tests["cases"]
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    lines += ["## CUDA tests (`tests/gpu/test_cuda.py`)", ""]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no test ran"
    if tests["rc"] is None:
        summary += f"; pytest timed out after {tests['seconds']:.0f} s"
    lines += [f"`pytest tests/gpu`: {summary} ({tests['seconds']:.0f} s). bf16 is o2m as shipped (its bf16 "
              "autocast on CUDA); fp32 is the same run with every autocast a no-op and TF32 off. Each check is "
              "the measured error against the bound the test states (the comment beside each bound in the test "
              "gives its reasoning); the last column is its short form.", "",
              "| test | result | s |", "|---|---|---:|"]
    for c in cases:
        extra = f": {_cell(c['message'])[:300]}" if c["status"] != "passed" and c["message"] else ""
        notes = "".join(f" ({k}: {v})" for k, v in c["notes"].items())
        lines.append(f"| `{c['name']}`{_cell(notes) and ' ' + _cell(notes)} | {c['status']}{extra} | {c['seconds']:.1f} |")
    lines += ["", "| check | measured | bound | within | why this bound |", "|---|---:|---:|---|---|"]
    for c in cases:
        for k in c["checks"]:
            ok = "yes" if k["value"] <= k["bound"] else "**no**"
            lines.append(f"| {_cell(k['name'])} | {k['value']:.3g} | {k['bound']:.3g} | {ok} | {_cell(k['why'])} |")
    if not cases:
        lines += ["", "No test record was written. The end of pytest's output:", "", "```", tests["tail"][-1500:], "```"]
    lines.append("")

    # Benchmarks
    lines += [f"## Benchmarks (`--device {info['device']}`)", "",
              "Each script ran once, in its own process, on the one device; compare rows within a table (they were "
              "measured in the same process), not with other machines' tables.", ""]
    for (name, script, args) in BENCHMARKS[info["device"]]:
        b = benches.get(name)
        lines += [f"### {name}: `python benchmarks/{script} --device {info['device']} {' '.join(args)}`", ""]
        if b is None:
            lines += ["Not run: the time budget of this check was spent.", ""]
            continue
        if not b["ok"]:
            lines += [f"Failed after {b['seconds']:.0f} s:", "", "```", b["error"], "```", ""]
            continue
        m = b["machine"]
        lines += [f"{BENCH_NOTES[name]} {b['seconds']:.0f} s; torch threads {m.get('threads')}.", ""]
        lines += _bench_table(name, b["rows"]) + [""]
        if b.get("compiled"):
            lines += ["Eager against compiled (`--compile`), first sampler; warm-up not in img/s:", ""]
            lines += _compiled_table(b["compiled"]) + [""]
        if m.get("peak_note"):
            lines += [f"Peak: {m['peak_note']}.", ""]
        if m.get("skipped"):
            lines += [f"Left out: {'; '.join(m['skipped'])}.", ""]
    return "\n".join(lines)


# 5. Main ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (the check) or cpu (a dry run of the same code)")
    ap.add_argument("--out", type=Path, help="the page (default: docs/benchmarks-gpu.md; runs/gpu-check-cpu.md for cpu)")
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds for the whole check: a benchmark is not started without 45 s left")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-benchmarks", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or (ROOT / ("docs/benchmarks-gpu.md" if args.device == "cuda" else "runs/gpu-check-cpu.md"))
    t_start = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: CUDA is not available here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    info = machine(args.device)
    say(f"device: {info.get('gpu') or info['cpu']}; torch {info['torch']}, CUDA {info['cuda_build']}, "
        f"diffusers {info['diffusers']}")

    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    tests = {"rc": 0, "seconds": 0.0, "cases": [], "tail": "not run (--skip-tests)"}
    if not args.skip_tests:
        tests = run_tests(args.device, max(60.0, min(300.0, left() - 60)))
    benches: dict[str, dict | None] = {}
    if not args.skip_benchmarks:
        for name, script, bargs in BENCHMARKS[args.device]:
            if left() < 45:
                say(f"benchmark {name}: not started, {left():.0f} s of the budget left")
                benches[name] = None
                continue
            b = run_benchmark(script, bargs, args.device, left() - 10)
            say(f"benchmark {name}: {'ok' if b['ok'] else 'FAILED: ' + b['error'][-300:]} ({b['seconds']:.0f} s)")
            benches[name] = b
    prog = [str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
            else "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    page = render(info, tests, benches, prog, time.perf_counter() - t_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page + "\n")
    # A skipped test is a check that did not run: on CUDA nothing in tests/gpu should skip.
    failed = [c["name"] for c in tests["cases"] if c["status"] != "passed"]
    bad_bench = [n for n, b in benches.items() if b is None or not b["ok"]]
    ok = not failed and tests["rc"] == 0 and not bad_bench
    say(f"wrote {out}; tests {'passed' if not failed and tests['rc'] == 0 else 'FAILED: ' + ', '.join(failed)}; "
        f"benchmarks {'all ran' if not bad_bench else 'not all ran: ' + ', '.join(bad_bench)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
