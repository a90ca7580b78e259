"""Writes the class-conditional section of docs/results.md from a finished recipes/digits-cond-table.sh run.

Every number is read from the run (its score report and command log); the checks are judged against the noise
measured in the same run and reported as they come out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sections
from results_md import machine, verdict

NAME = "conditional"
ROWS = {  # row name in the run -> (method, data, students)
    "teacher": ("teacher (digits-cond-teacher), sampling seed 0", "-", "1"),
    "teacher-seed1": ("teacher, sampling seed 1", "-", "1"),
    "o2okd": ("O2OKD", "labelled digits", "1"),
    "o2mkd": ("O2MKD", "labelled digits", "4"),
    "o2mkd-s1": ("O2MKD, training seed 1", "labelled digits", "4"),
    "dkdm": ("DKDM", "none", "1"),
}
KEEP = 0.90  # the bar: distilled conditional students keep at least 90% class accuracy


def noise(by: dict[tuple[str, str], dict], g: str, key: str) -> dict[str, float]:
    """Spread of ``key`` over sampling seeds (the teacher) and training seeds (O2MKD), at guidance ``g``."""
    s = abs(by[(g, "teacher")][key] - by[(g, "teacher-seed1")][key])
    t = abs(by[(g, "o2mkd")][key] - by[(g, "o2mkd-s1")][key])
    return {"sampling": s, "training": t, "gauge": max(s, t)}


def mean(by: dict, g: str, m: str, key: str) -> float:
    """A row's value, averaged with its training-seed-1 twin where the run has one."""
    vals = [by[(g, x)][key] for x in (m, m + "-s1") if (g, x) in by]
    return sum(vals) / len(vals)


def se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n samples."""
    return (p * (1 - p) / max(n, 1)) ** 0.5


def bar(acc: float, n: int) -> str:
    """The 90% bar's verdict for an accuracy on n samples, flagged when within one standard error of it."""
    word = "holds" if acc >= KEEP else "does not hold"
    near = abs(acc - KEEP) < se(KEEP, n)
    return f"**{word}** ({acc:.1%}" + (f"; within one standard error, {100 * se(KEEP, n):.1f} points, of the bar)"
                                       if near else ")")


def checks(by: dict, guides: dict[str, str]) -> list[str]:
    out = []
    for g, label in guides.items():
        fn, an = noise(by, g, "fid"), noise(by, g, "class_accuracy")
        for m in ("o2okd", "o2mkd", "o2mkd-s1", "dkdm"):
            acc = by[(g, m)]["class_accuracy"]
            out.append(f"{label}: {ROWS[m][0]} keeps at least {KEEP:.0%} class accuracy: "
                       f"{bar(acc, by[(g, m)]['n_samples'])}")
        o2o, o2m, dk = (mean(by, g, m, "fid") for m in ("o2okd", "o2mkd", "dkdm"))
        out.append(f"{label}: O2MKD (mean of 2 seeds) has a lower FID than O2OKD: "
                   f"**{verdict(o2o - o2m, fn['gauge'])}** ({o2m:.3f} vs {o2o:.3f}, gap {o2o - o2m:+.3f}; "
                   f"noise {fn['gauge']:.3f})")
        out.append(f"{label}: DKDM, with no data, has a lower FID than O2OKD on data (the DKDM paper's claim is "
                   f"a match, which a tie shows): **{verdict(o2o - dk, fn['gauge'])}** "
                   f"({dk:.3f} vs {o2o:.3f}, gap {o2o - dk:+.3f}; noise {fn['gauge']:.3f})")
        t = by[(g, "teacher")]
        for m in ("o2okd", "o2mkd", "dkdm"):
            gap = t["class_accuracy"] - mean(by, g, m, "class_accuracy")
            out.append(f"{label}: {ROWS[m][0]} loses class accuracy against the teacher: "
                       f"**{verdict(gap, an['gauge'])}** (gap {gap * 100:+.1f} points; noise {an['gauge'] * 100:.1f})")
    return out


def budget(work: Path) -> str:
    """The training budget, read from the O2MKD and DKDM runs' manifests."""
    o, d = (json.loads((work / n / "manifest.json").read_text())["config"] for n in ("o2mkd", "dkdm"))
    how = f"{d['init_steps']}-step DDIM jumps" if d.get("init_steps") else "exact shuffle denoise"
    return (f"{o['steps']} steps x batch {o['batch_size']} per student, lr {o['lr']:g}, EMA {o['ema_decay']:g}, "
            f"seed {o['seed']}; DKDM with rho {d['rho']:g}, its buffer built by {how}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True, help="The digits-cond-table run directory.")
    ap.add_argument("--docs", type=Path, required=True, help="Where results.md is.")
    ap.add_argument("--seconds", type=int, required=True, help="Wall time of the whole recipe.")
    ap.add_argument("--guidance", type=float, required=True, help="The larger guidance scale the recipe used.")
    a = ap.parse_args()

    report, commands = sections.read_run(a.work)
    took = {cmd.split(" -o ")[-1].split()[0]: int(ms) / 1000 for ms, cmd in commands if " -o " in cmd}
    by = {tuple(r["name"].split("-", 1)): r for r in report["rows"]}  # ("g1", "o2mkd")
    first = {g: by[(g, "teacher")] for g in ("g1", "g2")}
    guides = {"g1": f"guidance 1 ({first['g1']['scheduler'].upper()} {first['g1']['steps']})",
              "g2": f"guidance {a.guidance:g} ({first['g2']['scheduler'].upper()} {first['g2']['steps']})"}

    lines = ["| Method | Data | Students | Params (M) | MACs/forward (M) | Train (s) | "
             + " | ".join(f"FID, {guides[g]} | Class acc., {guides[g]}" for g in guides) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|---:|" * len(guides)]
    for m, (method, data, k) in ROWS.items():
        r = by[("g1", m)]
        train = f"{took[m]:.0f}" if m in took else "-"
        cells = " | ".join(f"{by[(g, m)]['fid']:.3f} | {by[(g, m)]['class_accuracy']:.1%}" for g in guides)
        lines.append(f"| {method} | {data} | {k} | {sections.measured(r['params'], 1e6, '.3f')} | "
                     f"{sections.measured(r['macs'], 1e6, '.2f')} | {train} | "
                     f"{cells} |")
    one = {"c3ddim": "DDIM 50", "c3ddpm": "DDPM 50"}
    one_lines = ["| Model | " + " | ".join(f"Read as 3, {v}" for v in one.values()) + " |",
                 "|---|" + "---:|" * len(one)]
    for m, (method, _, _) in ROWS.items():
        if ("c3ddim", m) in by:
            one_lines.append(f"| {method.split(',')[0] if m == 'teacher' else method} | "
                             + " | ".join(f"{by[(c, m)]['class_accuracy']:.1%}" for c in one) + " |")
    one_checks = [f"`--class 3 -n 200`, {v}: {ROWS[m][0]} keeps at least {KEEP:.0%}: "
                  f"{bar(by[(c, m)]['class_accuracy'], by[(c, m)]['n_samples'])} "
                  f"(the teacher {by[(c, 'teacher')]['class_accuracy']:.1%})"
                  for c, v in one.items() for m in ("o2okd", "o2mkd", "o2mkd-s1", "dkdm") if (c, m) in by]
    n_one = by[("c3ddim", "teacher")]["n_samples"]
    nf = {g: noise(by, g, "fid") for g in guides}
    na = {g: noise(by, g, "class_accuracy") for g in guides}
    mach = machine(a.work)
    tpl = json.loads((a.work / "template" / "manifest.json").read_text())["summary"]
    body = [
        "## Class-conditional distillation (digits, ratio 0.5)",
        "",
        f"Produced by `recipes/digits-cond-table.sh` (`make table-cond`) in {a.seconds / 60:.1f} minutes (wall "
        f"time, whole recipe; commit {mach['commit']}). The shipped class-conditional teacher `digits-cond-teacher` "
        f"(10 classes and a null class, trained with label dropout 0.1) pruned at ratio 0.5 "
        f"({tpl['teacher']['block_out_channels']} -> {tpl['template']['block_out_channels']} channels, its class "
        f"embedding narrowed with the time embedding), then distilled: {budget(a.work)}. Each batch's "
        "labels go to teacher and students alike and are dropped to the null class with the teacher's own "
        "dropout (0.1); DKDM keeps a label per buffer slot, which the teacher's reverse steps use.",
        "",
        "\n".join(lines),
        "",
        f"- Every model sampled twice with seed 0, {first['g1']['n_samples']} images balanced over the 10 classes: "
        f"{guides['g1']} and {guides['g2']}. Guidance runs the model twice per step (conditional and null "
        "branches), so a guided step costs twice the MACs shown. DDPM is used for the guided column because DDIM "
        "with guidance degrades this teacher (README: DDIM at guidance 2, FID 14.1).",
        f"- FID against the {first['g1']['n_reference']} bundled digits in the {report['features']['name']} feature "
        "space; class accuracy: the share of samples the independent digits classifier reads as the class asked for.",
        "- Noise, measured in this run: "
        + "; ".join(f"{guides[g]}: FID {nf[g]['sampling']:.3f} between sampling seeds and {nf[g]['training']:.3f} "
                    f"between O2MKD training seeds, class accuracy {na[g]['sampling'] * 100:.1f} and "
                    f"{na[g]['training'] * 100:.1f} points" for g in guides)
        + ". Each verdict uses the larger of the two at its guidance.",
        "- Train (s): wall time of the `o2m distill` command (buffer build included for DKDM); two lanes of "
        "commands ran at once, so each shared the 2 cores with another.",
        "",
        "### One class: `o2m sample MODEL --class 3 -n 200` (guidance 1, seed 0)",
        "",
        f"The issue's check, as a user types it: the share of {n_one} samples asked to be a 3 that the digits "
        "classifier reads as 3, with the default sampler (DDIM 50) and with DDPM 50. With "
        f"{n_one} samples an accuracy near {KEEP:.0%} has a standard error of about "
        f"{100 * se(KEEP, n_one):.1f} points; a result closer than that to the bar is marked so.",
        "",
        "\n".join(one_lines),
        "",
        "### Checks",
        "",
        *[f"- {c}" for c in checks(by, guides) + one_checks],
        "",
        *sections.commands_block(commands),
    ]
    sections.write(a.docs, NAME, "\n".join(body), a.work / "scores" / "report.json", "results-conditional-report.json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
