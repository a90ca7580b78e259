"""Writes docs/results.md from a finished recipes/digits-table.sh run (its scores and command log).

Everything in the page is read from the run: the score report, the wall time of every command,
the machine. The paper's expectations are checked against the measured numbers and reported as
they come out, agreeing or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import sections

METHODS = {  # samples-dir suffix -> (method, data, students)
    "nokd": ("no KD (plain training)", "digits", "1"),
    "o2okd": ("O2OKD", "digits", "1"),
    "o2okd-4x": ("O2OKD, 4x steps (a K=4 run's total compute)", "digits", "1"),
    "o2mkd": ("O2MKD", "digits", "4"),
    "o2mkd-merged": ("O2MKD, merged", "digits", "4 -> 1"),
    "dkdm": ("DKDM", "none", "1"),
    "dfo2mkd": ("data-free O2MKD", "none", "4"),
    "dfo2mkd-merged": ("data-free O2MKD, merged", "none", "4 -> 1"),
    "synth": ("synthetic-data baseline (DKDM paper): plain training on teacher samples", "teacher samples", "1"),
}
SEED_SUFFIX = "-s1"  # the second training seed of a row (ratio 0.5's decisive rows)
DC_SUFFIX = "-dc3"  # a row sampled with DeepCache (`o2m sample --deepcache 3`)


def parse_name(name: str) -> tuple[str, str]:
    """``samples-r0.3-o2mkd-merged`` -> ("0.3", "o2mkd-merged"); the teacher -> ("-", "teacher").

    A DDPM-sampled row (``samples-ddpm-...``) keeps its ``ddpm-`` prefix on the ratio's method:
    ``samples-ddpm-r0.5-dkdm`` -> ("0.5", "ddpm-dkdm"); ``samples-ddpm-teacher`` -> ("-", "ddpm-teacher").
    """
    rest = name.removeprefix("samples-")
    prefix = ""
    if rest.startswith("ddpm-"):
        prefix, rest = "ddpm-", rest.removeprefix("ddpm-")
    if rest.startswith("teacher"):
        return "-", prefix + rest
    ratio, _, method = rest.partition("-")
    return ratio.removeprefix("r"), prefix + method


def method_label(method: str) -> tuple[str, str, str]:
    """(method, data, students) for a table row; ``-s1`` rows are the second training seed, ``-dc3`` rows were
    sampled with DeepCache."""
    base = method.removeprefix("ddpm-")
    extra = ""
    if base.endswith(DC_SUFFIX):
        base, extra = base.removesuffix(DC_SUFFIX), " + DeepCache N=3"
    if base.endswith(SEED_SUFFIX):
        base, extra = base.removesuffix(SEED_SUFFIX), ", training seed 1"
    name, data, k = METHODS[base]
    return name + extra, data, k


def step_macs(row: dict) -> float | None:
    """MACs per denoising step: with DeepCache, the average over the full and partial steps the sampler made;
    None where the row was scored without its model."""
    dc = row.get("deepcache")
    macs = dc["macs"] if dc else row.get("macs")
    return None if macs is None else float(macs)


def mmacs(row: dict) -> str:
    """MACs per step in millions, two decimals, or 'unavailable'."""
    return sections.measured(step_macs(row), 1e6, ".2f")


def verdict(gap: float, noise: float) -> str:
    """A claim "FID a > FID b" from gap = FID a - FID b: beyond the noise either way, or a tie."""
    if gap > noise:
        return "holds"
    if gap < -noise:
        return "does not hold"
    return "tie (within noise)"


def noise_levels(by: dict[tuple[str, str], dict]) -> dict[str, float]:
    """The noise measured in the run: FID's spread over sampling seeds (the teacher, seeds 0 and 1) and over
    training seeds (each ``-s1`` row against its seed-0 twin); ``gauge`` is the larger, used for every verdict."""
    out: dict[str, float] = {}
    a, b = by.get(("-", "teacher")), by.get(("-", "teacher-seed1"))
    out["sampling"] = abs(a["fid"] - b["fid"]) if a and b else 0.0
    spreads = [abs(row["fid"] - by[(r, m.removesuffix(SEED_SUFFIX))]["fid"])
               for (r, m), row in by.items() if m.endswith(SEED_SUFFIX) and (r, m.removesuffix(SEED_SUFFIX)) in by]
    out["training"] = max(spreads) if spreads else 0.0
    out["gauge"] = max(out["sampling"], out["training"])
    return out


def mean_fid(by: dict[tuple[str, str], dict], ratio: str, method: str) -> float | None:
    """A row's FID, averaged with its second training seed where the run has one."""
    vals = [by[(ratio, m)]["fid"] for m in (method, method + SEED_SUFFIX) if (ratio, m) in by]
    return sum(vals) / len(vals) if vals else None


def machine(work: Path) -> dict[str, str]:
    """What the run was measured on (and the o2m commit it ran, recorded by the recipe at its start)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2 ** 20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = (work / "commit.txt").read_text().strip() if (work / "commit.txt").is_file() else "unknown"
    from importlib.metadata import version

    return {"cpu": cpu, "cores": str(cores), "memory": mem, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": version("diffusers"),
            "o2m": version("o2m"), "commit": commit, **lanes(work)}


def lanes(work: Path) -> dict[str, str]:
    """How the recipe's commands shared the machine (its parallel.txt), else this process's torch threads."""
    import torch

    f = work / "parallel.txt"
    if f.is_file():
        return {"processes": f.read_text().strip()}
    return {"torch threads": str(torch.get_num_threads())}


def checks(by: dict[tuple[str, str], dict]) -> list[str]:
    """The papers' expectations, each judged against the noise measured in the same run."""
    out = []
    gauge = noise_levels(by)["gauge"]
    for ratio in sorted({r for r, _ in by if r != "-"}):
        def claim(a: str, b: str, text: str, matches: bool = False) -> None:
            fa, fb = mean_fid(by, ratio, a), mean_fid(by, ratio, b)
            if fa is None or fb is None:
                return
            seeds = " (means over 2 training seeds)" if (ratio, a + SEED_SUFFIX) in by else ""
            v = verdict(fa - fb, gauge)
            if matches:  # "a matches b": a tie is what the claim predicts
                v = {"tie (within noise)": "holds (a tie, within noise)", "holds": "does not hold (worse)",
                     "does not hold": "holds (better)"}[v]
            out.append(f"ratio {ratio}: {text}: FID {fa:.3f} vs {fb:.3f}{seeds}, gap {fa - fb:+.3f}, noise "
                       f"{gauge:.3f}: **{v}**")

        claim("nokd", "o2okd", "KD helps (FID no KD > FID O2OKD)")
        claim("o2okd", "o2mkd", "more students help (FID O2OKD > FID O2MKD K=4)")
        claim("o2okd-4x", "o2mkd", "more students help at equal total compute (FID O2OKD 4x steps > FID O2MKD K=4)")
        claim("o2mkd-merged", "o2mkd", "merged matches unmerged (FID merged = FID O2MKD K=4)", matches=True)
        claim("dkdm", "o2okd", "DKDM matches data-based KD (FID DKDM = FID O2OKD)", matches=True)
        claim("dfo2mkd", "o2mkd", "data-free O2MKD matches data-based O2MKD", matches=True)
        claim("dkdm", "dfo2mkd", "more students help without data too (FID DKDM > FID data-free O2MKD)")
        claim("synth", "dkdm", "DKDM beats the synthetic-data baseline, DDIM 50 (FID baseline > FID DKDM)")
        claim("ddpm-synth", "ddpm-dkdm", "DKDM beats the synthetic-data baseline, DDPM 50 (FID baseline > FID DKDM)")
        claim("ddpm-dkdm", "ddpm-dfo2mkd", "more students help without data, DDPM 50 (FID DKDM > FID data-free O2MKD)")
        dc, st, o2m = by.get(("-", "teacher" + DC_SUFFIX)), by.get((ratio, "o2mkd" + DC_SUFFIX)), by.get((ratio, "o2mkd"))
        if st and o2m:  # the same students (training seed 0), sampled with and without the cache
            v = {"tie (within noise)": "holds (a tie, within noise)", "holds": "does not hold (worse)",
                 "does not hold": "holds (better)"}[verdict(st["fid"] - o2m["fid"], gauge)]
            out.append(f"ratio {ratio}: DeepCache N=3 keeps the O2MKD students' quality (FID O2MKD + DeepCache = "
                       f"FID O2MKD, training seed 0) at {mmacs(st)} vs {mmacs(o2m)} M "
                       f"MACs/step: FID {st['fid']:.3f} vs {o2m['fid']:.3f}, gap {st['fid'] - o2m['fid']:+.3f}, "
                       f"noise {gauge:.3f}: **{v}**")
        if dc and st:  # the O2MKD paper's row: DeepCache + O2MKD against DeepCache alone, at fewer MACs
            v = verdict(dc["fid"] - st["fid"], gauge)
            out.append(f"ratio {ratio}: DeepCache + O2MKD beats DeepCache alone on the teacher (FID teacher + "
                       f"DeepCache > FID O2MKD + DeepCache, at {mmacs(st)} vs {mmacs(dc)} "
                       f"M MACs/step): FID {dc['fid']:.3f} vs {st['fid']:.3f}, gap {dc['fid'] - st['fid']:+.3f}, "
                       f"noise {gauge:.3f}: **{v}**")
    a, b = by.get(("-", "teacher" + DC_SUFFIX)), by.get(("-", "teacher"))
    if a and b:
        v = {"tie (within noise)": "holds (a tie, within noise)", "holds": "does not hold (worse)",
             "does not hold": "holds (better)"}[verdict(a["fid"] - b["fid"], gauge)]
        out.insert(0, f"DeepCache N=3 keeps the teacher's quality (FID teacher + DeepCache = FID teacher) at "
                      f"{mmacs(a)} vs {mmacs(b)} M MACs/step: FID {a['fid']:.3f} vs "
                      f"{b['fid']:.3f}, gap {a['fid'] - b['fid']:+.3f}, noise {gauge:.3f}: **{v}**")
    return out


def noise(by: dict[tuple[str, str], dict]) -> str:
    """How far FID moves with the sampling seed alone, and with the training seed."""
    a, b = by.get(("-", "teacher")), by.get(("-", "teacher-seed1"))
    if not (a and b):
        return "the run has no second teacher seed to gauge its noise."
    lv = noise_levels(by)
    text = (f"as a gauge of its noise at this n, the same teacher scores {a['fid']:.3f} with sampling seed "
            f"{a['seed']} and {b['fid']:.3f} with seed {b['seed']} (a {lv['sampling']:.3f} difference from the seed "
            "alone)")
    if lv["training"]:
        text += (f"; a second training seed moves a row's FID by up to {lv['training']:.3f} (see the training-seed "
                 "table)")
    return text + (f". Every verdict below calls a gap smaller than {lv['gauge']:.3f}, the larger of the two, a tie.")


def seed_table(by: dict[tuple[str, str], dict]) -> list[str]:
    """Rows trained with two seeds: FID per seed, mean and spread."""
    lines = ["| Template | Method | FID seed 0 | FID seed 1 | mean | spread |", "|---|---|---:|---:|---:|---:|"]
    for (r, m), row in by.items():
        if m.endswith(SEED_SUFFIX) and (r, m.removesuffix(SEED_SUFFIX)) in by:
            f0, f1 = by[(r, m.removesuffix(SEED_SUFFIX))]["fid"], row["fid"]
            lines.append(f"| {r} | {METHODS[m.removesuffix(SEED_SUFFIX)][0]} | {f0:.3f} | {f1:.3f} | "
                         f"{(f0 + f1) / 2:.3f} | {abs(f0 - f1):.3f} |")
    return lines if len(lines) > 2 else []


def fid_plot(by: dict[tuple[str, str], dict], path: Path) -> None:
    """FID against MACs per step, one line per method across the two templates (Figure 6 style)."""
    from o2mcli.viz import line_plot

    series = {}
    for key in ["teacher", *METHODS, "teacher" + DC_SUFFIX, "o2mkd" + DC_SUFFIX]:  # (not the seed-1, DDPM rows)
        pts = sorted((step_macs(row) / 1e6, row["fid"]) for (r, m), row in by.items()
                     if m == key and step_macs(row) is not None)
        if pts:
            series[key] = ([p[0] for p in pts], [p[1] for p in pts])
    line_plot(series, path, title="digits: FID vs MACs per denoising step", xlabel="MMACs per step",
              ylabel="FID (log)", logy=True, size=(720, 440))


def budget_line(work: Path) -> str:
    """The training budgets, read from the runs' own manifests."""
    def cfg(name: str) -> dict:
        return json.loads((work / name / "manifest.json").read_text())["config"]

    o, d = cfg("r0.3-o2okd"), cfg("r0.3-dkdm")
    slots = json.loads((work / "r0.3-dkdm" / "manifest.json").read_text())["summary"]["buffer"]["slots"]
    return (f"- Budgets, the same for every trained row but the 4x-steps one: {o['steps']} optimizer steps x batch "
            f"{o['batch_size']} per "
            f"student, AdamW lr {o['lr']:g} with {o['lr_warmup']} warm-up steps, EMA {o['ema_decay']} (the EMA "
            f"weights are sampled), seed {o['seed']}. K=4 runs give each student that budget (the papers' "
            "per-student comparison), so they cost more in total: see the Train column. On data: L_diff + "
            f"{o['alpha']:g} x output KD ||eps_T - eps_S||^2 (no KD: L_diff alone, the teacher never runs); "
            f"O2MKD p_own {cfg('r0.3-o2mkd')['p_own']}. Without data: DKDM's ||eps_T - eps_S||^2 (+ KL when both "
            f"variances are learned), buffer rho {d['rho']} ({slots} slots) built by {d['init_steps']}-step DDIM "
            "jumps.")


def synthetic_line(work: Path) -> str:
    """The synthetic-data baseline's budget, read from the run (the recipe writes synthetic.json)."""
    f = work / "synthetic.json"
    if not f.is_file():
        return ""
    d = json.loads(f.read_text())
    return (f"- Synthetic-data baseline (the DKDM paper's): {d['images']} images sampled from the teacher with DDPM "
            f"{d['steps']} steps ({d['teacher_forwards']:,} teacher forwards, the same as the ratio-0.3 DKDM run's "
            f"{d['dkdm_forwards']:,}: buffer build + one forward per training sample), then plain training "
            "(`--kd none`) of the template on them with the same budget as every other row.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True, help="The digits-table run directory.")
    ap.add_argument("--docs", type=Path, required=True, help="Where results.md and the plot go.")
    ap.add_argument("--seconds", type=int, required=True, help="Wall time of the whole recipe.")
    a = ap.parse_args()

    report, commands = sections.read_run(a.work)
    took = {cmd: int(ms) / 1000 for ms, cmd in commands}
    by = {parse_name(r["name"]): r for r in report["rows"]}

    def output_of(cmd: str) -> str:
        words = cmd.split()
        return words[words.index("-o") + 1] if "-o" in words[:-1] else ""

    def train_seconds(ratio: str, method: str) -> str:
        merged = method.removeprefix("ddpm-").removesuffix(DC_SUFFIX)  # a DeepCache row: its model's training
        base = merged.removesuffix("-merged")
        s = [v for c, v in took.items() if c.startswith("o2m distill") and output_of(c) == f"r{ratio}-{base}"]
        m = [v for c, v in took.items() if c.startswith("o2m merge") and output_of(c) == f"r{ratio}-{merged}.safetensors"]
        return (f"{s[0]:.0f}" if s else "-") + (f" + {m[0]:.0f}" if m else "")

    def table(rows: list[dict]) -> str:
        lines = ["| Template | Method | Data | Students | Params (M) | MACs/step (M) | Throughput (img/s) | "
                 "Train (s) | FID | KID x1e3 | n |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            ratio, m = parse_name(row["name"])
            if m.removeprefix("ddpm-").startswith("teacher"):
                method, data, k = f"teacher (shipped), sampling seed {row['seed']}", "-", "1"
                if m.endswith(DC_SUFFIX):
                    method += " + DeepCache N=3"
            else:
                method, data, k = method_label(m)
            train = "-" if "teacher" in m else train_seconds(ratio, m)
            lines.append(f"| {ratio} | {method} | {data} | {k} | {sections.measured(row['params'], 1e6, '.3f')} | "
                         f"{mmacs(row)} | {sections.measured(sections.images_per_s(row), 1, '.1f')} | {train} | "
                         f"{row['fid']:.3f} | {row['kid_mean'] * 1e3:.2f} ± {row['kid_std'] * 1e3:.2f} | "
                         f"{row['n_samples']} |")
        return "\n".join(lines)

    # 1. The tables: DDIM-sampled rows (every method), DDPM-sampled rows (the DKDM paper's sampler).
    ddim_rows = [r for r in report["rows"] if r["scheduler"] != "ddpm"]
    ddpm_rows = [r for r in report["rows"] if r["scheduler"] == "ddpm"]
    table_ddim = table(ddim_rows)
    table_ddpm = table(ddpm_rows) if ddpm_rows else ""
    synth_note = synthetic_line(a.work)

    # 2. The page.
    a.docs.mkdir(parents=True, exist_ok=True)
    plot = a.docs / "results-fid-vs-macs.png"
    fid_plot(by, plot)
    mach = machine(a.work)
    scores_man = a.work / "scores" / "manifest.json"
    finished = (json.loads(scores_man.read_text())["created_at"][:16].replace("T", " ") if scores_man.is_file()
                else f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}")
    first = ddim_rows[0]
    timed = [r["throughput"] for r in ddim_rows if r.get("throughput")]  # none for rows scored without a model
    tp = timed[0] if timed else None
    seeds = seed_table(by)
    page = [
        "# Results on the embedded default (digits)",
        "",
        f"Produced by `recipes/digits-table.sh`, scored {finished} UTC, in "
        f"{a.seconds / 60:.1f} minutes (wall time, whole recipe). Every number below is read from that run; "
        "rerun the recipe (`make table`) to regenerate this page.",
        "",
        "## Table",
        "",
        table_ddim,
        "",
        f"- Every row: sampled with {first['scheduler'].upper()} {first['steps']} steps, seed {first['seed']}, "
        f"{first['n_samples']} images; FID and KID against the {first['n_reference']} bundled digits in the "
        f"{report['features']['name']} feature space ({report['features']['description']}). KID is mean ± std over "
        f"{report['kid']['subsets']} subsets drawn from both sets (half the smaller set each). FID has no error "
        f"bar; {noise(by)}",
        (f"- Throughput: images/s of full sampling runs ({tp['scheduler']}, {tp['steps']} steps, batch "
         f"{tp['batch_size']}, {tp['repeats']} timed run{'s' if tp['repeats'] != 1 else ''} after a warm-up), all measured in the one `o2m score` run "
         f"on {report['device']}. A K=4 group costs one student per step, so its throughput is a single student's."
         if tp else "- Throughput: not measured (the rows were scored without their models)."),
        "- Params: all the weights a model holds (a K=4 group: its four students together). MACs: conv + linear "
        "multiply-accumulates of one denoising step (for a group, one student's: one student serves each step). "
        "DeepCache rows (`o2m sample --deepcache 3`: every third step a full forward, the steps between only the "
        "first down block and its up block on cached deep features; a step whose student differs from the cache's "
        "owner is full) show the MACs averaged over the full and partial steps the sampler made, and their "
        "throughput was timed with the cache on.",
        "- Train (s): wall time of the `o2m distill` command (+ the `o2m merge`), buffer build included for the "
        "data-free rows" + ("; the recipe ran two lanes of commands at once (see Machine), so each shared the "
                            "machine with another." if "processes" in lanes(a.work) else "."),
        budget_line(a.work),
        *([synth_note] if synth_note else []),
        "",
        f"![FID against MACs per step]({plot.name})",
        "",
        *(["## Training-seed noise", "", "The decisive rows trained again with seed 1 (same data, budget and "
           "sampling seed); the verdicts use their means.", "", *seeds, ""] if seeds else []),
        *(["## Sampled with DDPM (the DKDM paper's sampler)", "",
           f"Ancestral DDPM respaced to {ddpm_rows[0]['steps']} steps, seed {ddpm_rows[0]['seed']}, "
           f"{ddpm_rows[0]['n_samples']} images: it uses the learned variance that DKDM's KL trains (DDIM ignores "
           "it). FIDs compare only within this table.", "", table_ddpm, ""] if ddpm_rows else []),
        "## The papers' expectations, checked",
        "",
        "Stated as the papers state them and compared with the numbers above; nothing was tuned toward them. "
        "A verdict is **holds** or **does not hold** only when the gap is larger than the noise measured in this "
        "run; a smaller gap is a **tie (within noise)**. For a claim that two rows match, a tie is what the claim "
        "predicts.",
        "",
        *[f"- {c}" for c in checks(by)],
        "",
        "## What this does and does not show",
        "",
        "- One budget and 8x8 digits scored by a small classifier's features. Only the decisive ratio-0.5 rows "
        "were trained with a second seed; every other row is one training seed, judged against the largest "
        "seed-to-seed spread measured. It shows that every stage runs end to end and how the methods compare at "
        "an equal per-student budget on this data; it does not reproduce the papers' CIFAR-10 or ImageNet "
        "numbers (those need the real teachers and Inception features, see the README).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        "",
        "## Commands, in order, with wall time" + (" (lane A, then lane B, which ran at the same time, then "
                                                    "the score)" if "processes" in lanes(a.work) else ""),
        "",
        "```",
        *[f"{int(ms) / 1000:8.1f} s  {cmd}" for ms, cmd in commands],
        "```",
        "",
    ]
    notes = list(report.get("notes", [])) + [f"{r['name']}: {w}" for r in report["rows"] for w in r.get("warnings", [])]
    if notes:
        page[-1:-1] = ["## Notes from o2m score", "", *[f"- {n}" for n in notes], ""]
    text = "\n".join(page)
    old_page = a.docs / "results.md"
    old_text = old_page.read_text() if old_page.is_file() else ""
    for name in sections.names(old_text):  # the other recipes' sections (conditional, ...) survive a rerun
        kept = sections.extract(old_text, name)
        text = sections.splice(text, name, kept.split("\n", 1)[1].rsplit("\n", 1)[0])
    tmp = a.docs / ".results.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, a.docs / "results.md")
    shutil.copyfile(a.work / "scores" / "report.json", a.docs / ".results-report.json.tmp")
    os.replace(a.docs / ".results-report.json.tmp", a.docs / "results-report.json")
    print(table_ddim)


if __name__ == "__main__":
    main()
