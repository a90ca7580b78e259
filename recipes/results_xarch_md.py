"""Writes the cross-architecture section of docs/results.md from a finished recipes/digits-xarch-table.sh run.

Every number is read from the run (its score report, command log and the students' manifests); the checks are
judged against the noise measured in the same run, per direction, and reported as they come out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sections
from results_md import machine, verdict

NAME = "cross-architecture"
DIRECTIONS = {  # run prefix -> (title, teacher name, student family)
    "u2d": ("UNet teacher -> DiT student", "digits-cond-teacher", "DiT"),
    "d2u": ("DiT teacher -> UNet student", "digits-dit-teacher", "UNet"),
}
ROWS = {  # row suffix -> (method, data)
    "teacher": ("teacher, sampling seed 0", "-"),
    "teacher-seed1": ("teacher, sampling seed 1", "-"),
    "dkdm": ("DKDM", "none"),
    "dkdm-s1": ("DKDM, training seed 1", "none"),
    "kd": ("data KD (O2OKD, output KD)", "labelled digits"),
    "none": ("no KD (plain training)", "labelled digits"),
}


def noise(by: dict[str, dict], p: str, key: str) -> dict[str, float]:
    """Spread of ``key`` over the teacher's sampling seeds and DKDM's training seeds, in direction ``p``."""
    s = abs(by[f"{p}-teacher"][key] - by[f"{p}-teacher-seed1"][key])
    t = abs(by[f"{p}-dkdm"][key] - by[f"{p}-dkdm-s1"][key])
    return {"sampling": s, "training": t, "gauge": max(s, t)}


def dkdm(by: dict[str, dict], p: str, key: str) -> float:
    """DKDM's value in direction ``p``, the mean of its two training seeds."""
    return (by[f"{p}-dkdm"][key] + by[f"{p}-dkdm-s1"][key]) / 2


def lower_fid(by: dict[str, dict], p: str, a: str, b: str, claim: str) -> str:
    """The check "a has a lower FID than b" in direction ``p`` (DKDM as the mean of its seeds)."""
    fa = dkdm(by, p, "fid") if a == "dkdm" else by[f"{p}-{a}"]["fid"]
    fb = dkdm(by, p, "fid") if b == "dkdm" else by[f"{p}-{b}"]["fid"]
    n = noise(by, p, "fid")["gauge"]
    return (f"{DIRECTIONS[p][0]}: {claim}: **{verdict(fb - fa, n)}** ({fa:.3f} vs {fb:.3f}, gap {fb - fa:+.3f}; "
            f"noise {n:.3f})")


def checks(by: dict[str, dict]) -> list[str]:
    out = []
    for p in DIRECTIONS:
        out.append(lower_fid(by, p, "dkdm", "kd", "DKDM, with no data, has a lower FID than data KD (the DKDM "
                                                  "paper's claim is a match, which a tie shows)"))
        out.append(lower_fid(by, p, "dkdm", "none", "DKDM, with no data, has a lower FID than plain training on "
                                                    "the data"))
        out.append(lower_fid(by, p, "kd", "none", "data KD has a lower FID than plain training on the data"))
        n = noise(by, p, "class_accuracy")["gauge"]
        gap = by[f"{p}-teacher"]["class_accuracy"] - dkdm(by, p, "class_accuracy")
        out.append(f"{DIRECTIONS[p][0]}: DKDM loses class accuracy against the teacher: **{verdict(gap, n)}** "
                   f"(gap {gap * 100:+.1f} points; noise {n * 100:.1f})")
    # The paper: CNN students compress better than ViT students. Here: the DKDM student's FID above its own teacher's.
    rise = {p: dkdm(by, p, "fid") - by[f"{p}-teacher"]["fid"] for p in DIRECTIONS}
    n = max(noise(by, p, "fid")["gauge"] for p in DIRECTIONS)
    out.append("The UNet student stays closer to its teacher than the DiT student (DKDM, FID above the student's own "
               f"teacher; the DKDM paper's \"CNN students compress better than ViT students\"): "
               f"**{verdict(rise['u2d'] - rise['d2u'], n)}** (UNet student {rise['d2u']:+.3f}, DiT student "
               f"{rise['u2d']:+.3f}; noise {n:.3f}, the larger direction's)")
    return out


def budget(work: Path) -> str:
    """The training budget, read from the DKDM run's manifest."""
    d = json.loads((work / "u2d-dkdm" / "manifest.json").read_text())["config"]
    how = f"{d['init_steps']}-step DDIM jumps" if d.get("init_steps") else "exact shuffle denoise"
    return (f"{d['steps']} steps x batch {d['batch_size']} per student, lr {d['lr']:g}, EMA {d['ema_decay']:g}, "
            f"seed {d['seed']}, every student from random weights; DKDM with rho {d['rho']:g}, its buffer built by "
            f"{how}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True, help="The digits-xarch-table run directory.")
    ap.add_argument("--docs", type=Path, required=True, help="Where results.md is.")
    ap.add_argument("--seconds", type=int, required=True, help="Wall time of the whole recipe.")
    a = ap.parse_args()

    report, commands = sections.read_run(a.work)
    took = {cmd.split(" -o ")[-1].split()[0]: int(ms) / 1000 for ms, cmd in commands if " -o " in cmd}
    by = {r["name"].split("-", 1)[1]: r for r in report["rows"]}  # "u2d-dkdm"
    first = by["u2d-teacher"]
    sampler = f"{first['scheduler'].upper()} {first['steps']}"

    lines = ["| Direction | Method | Data | Student | Params (M) | MACs/forward (M) | Train (s) | "
             f"FID ({sampler}) | Class acc. |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for p, (title, teacher, family) in DIRECTIONS.items():
        for m, (method, data) in ROWS.items():
            r = by[f"{p}-{m}"]
            who = f"teacher ({teacher})" if m == "teacher" else method
            student = "-" if m.startswith("teacher") else family
            train = f"{took[f'{p}-{m}']:.0f}" if f"{p}-{m}" in took else "-"
            lines.append(f"| {title} | {who} | {data} | {student} | {sections.measured(r['params'], 1e6, '.3f')} | "
                         f"{sections.measured(r['macs'], 1e6, '.2f')} | {train} | {r['fid']:.3f} | "
                         f"{r['class_accuracy']:.1%} |")
    nf = {p: noise(by, p, "fid") for p in DIRECTIONS}
    na = {p: noise(by, p, "class_accuracy") for p in DIRECTIONS}
    mach = machine(a.work)
    body = [
        "## Across architectures (digits, DKDM's Table 3 in small)",
        "",
        f"Produced by `recipes/digits-xarch-table.sh` (`make table-xarch`) in {a.seconds / 60:.1f} minutes (wall "
        f"time, whole recipe; commit {mach['commit']}). Two class-conditional teachers shipped with o2m, each "
        "distilled into a fresh student of the other architecture: the UNet `digits-cond-teacher` into a DiT "
        "(`recipes/configs/dit-student.json`: 4 blocks, 4 heads x 16, patch 2) and the DiT `digits-dit-teacher` "
        "(`recipes/configs/dit-teacher.json`, trained by `recipes/digits-dit-teacher.sh`) into a UNet "
        "(`recipes/configs/unet-student.json`: the UNet teacher's blocks at half width). Each direction trains "
        "DKDM (no data: the teacher's own noisy samples), data KD (O2OKD with output KD on the labelled digits) and "
        f"plain training on the labelled digits (`--kd none`), on one budget: {budget(a.work)}. Each batch's labels "
        "are dropped to the null class with the teacher's own dropout (0.1).",
        "",
        "\n".join(lines),
        "",
        f"- Every model sampled with seed 0 (the teachers also with seed 1), {first['n_samples']} images balanced "
        f"over the 10 classes, guidance 1, {sampler}.",
        f"- FID against the {first['n_reference']} bundled digits in the {report['features']['name']} feature "
        "space; class accuracy: the share of samples the independent digits classifier reads as the class asked for.",
        "- Noise, measured in this run, per direction: "
        + "; ".join(f"{DIRECTIONS[p][0]}: FID {nf[p]['sampling']:.3f} between the teacher's sampling seeds and "
                    f"{nf[p]['training']:.3f} between DKDM's training seeds, class accuracy "
                    f"{na[p]['sampling'] * 100:.1f} and {na[p]['training'] * 100:.1f} points" for p in DIRECTIONS)
        + ". Each verdict uses the larger of the two in its direction; DKDM enters the checks as the mean of its "
        "two seeds.",
        "- Train (s): wall time of the `o2m distill` command (buffer build included for DKDM); two lanes of "
        "commands ran at once, so each shared the 2 cores with another. Plain training never runs the teacher.",
        "",
        "### Checks",
        "",
        *[f"- {c}" for c in checks(by)],
        "",
        *sections.commands_block(commands),
    ]
    sections.write(a.docs, NAME, "\n".join(body), a.work / "scores" / "report.json", "results-xarch-report.json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
