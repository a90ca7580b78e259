"""``o2m prune``: its options are PruneConfig's fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.stages.prune import PruneConfig

ORDER = ("teacher", "ratio", "target_macs")  # --help's order; the rest follow in field order


@app.command()
@handles_errors
@options(PruneConfig, order=ORDER)
def prune(**given: Any) -> None:
    """Channel-slim a teacher (or remove blocks of a Stable Diffusion UNet) into a student template that plain
    diffusers loads."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.pruning.pruners import pruner_for
    from o2mcli.stages.prune import run_prune

    values = config_values(PruneConfig, given)
    if "teacher" not in values:
        values["teacher"] = str(find_newest_model(Path("."), kinds=("teacher",)))
    if "out" not in values:
        values["out"] = default_output(Path("."), "template")
    path = run_prune(PruneConfig(**values))
    man = read_manifest(path, verify=False)
    typer.echo(report_text(man.summary, path, pruner_for(man.models[0].denoiser_config, path)))


def report_text(s: dict, path: Path, pruner: Any) -> str:
    """The command's report: totals, per-block table (widths as the family's pruner counts them), throughput."""
    t, m = s["teacher"], s["template"]
    lines = [f"wrote {path}: " + ", ".join(
        ([f"blocks {s['block_removal']['variant']}"] if "block_removal" in s else [])
        + ([f"ratio {s['ratio']}" + (f" (channels rounded to multiples of {s['round_to']})" if s["round_to"]
                                       else "")] if s["ratio"] is not None
           else []))]
    if "block_removal" in s:
        removed = s["block_removal"]["removed"]
        lines.append(f"  removed {len(removed)} teacher layers or blocks: {', '.join(removed[:4])}"
                     + (f", ... ({len(removed) - 4} more; all in the manifest)" if len(removed) > 4 else ""))
    lines.append(f"  {pruner.widths_line(t, m)}")
    lines.append(f"  params {t['params'] / 1e6:.3f}M -> {m['params'] / 1e6:.3f}M ({s['params_ratio']:.1%}),  "
                 f"MACs {t['macs'] / 1e9:.4f}G -> {m['macs'] / 1e9:.4f}G ({s['macs_ratio']:.1%})")
    names = [b["block"] if "student_block" not in b or b.get("student_block") == b["block"]
             else f"{b['block']}>{b.get('student_block') or '-'}" for b in s["blocks"]]
    w = max([16] + [len(n) + 1 for n in names])  # DiT's transformer_blocks.N>transformer_blocks.M are long
    lines.append(f"  {'block':<{w}}{pruner.width_unit:>12}{'params kept':>13}"
                 f"{'MACs kept':>11}")
    for name, b in zip(names, s["blocks"]):
        ch = b.get("channels", b.get("heads", [None]))
        ch = "" if ch is None or ch[0] is None else f"{ch[0]}->{ch[1]}"
        mk = "" if b["macs_kept"] is None else f"{b['macs_kept']:.1%}"
        lines.append(f"  {name:<{w}}{ch:>12}{b['params_kept']:>13.1%}{mk:>11}")
    if "throughput" in s:
        tp = s["throughput"]
        lines.append(f"  throughput on {tp['device']} (DDIM {tp['steps']} steps, batch {tp['batch_size']}): teacher "
                     f"{tp['teacher_images_per_s']:.2f} img/s, template {tp['template_images_per_s']:.2f} img/s, "
                     f"speedup {tp['speedup']:.2f}x")
    if "students" in s:
        lines.append(f"  {s['students']}")
    return "\n".join(lines)
