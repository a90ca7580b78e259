"""``o2m prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Device, Force, seed_option, stage_out

@app.command()
@handles_errors
def prune(
    teacher: Optional[str] = typer.Argument(None, help="Teacher model file or directory, or digits-teacher; "
                                                      "default: the newest teacher in the current directory."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of channels removed from every block, in (0, 1); "
                                                     "MACs fall about as (1-R)^2. Default 0.3 (none with --blocks)."),
    target_macs: Optional[str] = typer.Option(None, "--target-macs", help="Instead of --ratio: the least pruning "
                                              "whose template costs at most this many MACs per forward (e.g. 3.4G)."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Stable Diffusion UNets: remove blocks as BK-SDM does "
                                         "(bk-base: second resnet+attention pair of each stage; bk-small: also the "
                                         "mid block; bk-tiny: also the innermost stage); with --ratio, then slim."),
    drop_blocks: Optional[int] = typer.Option(None, "--drop-blocks", help="DiT: remove N evenly spaced middle "
                                              "transformer blocks (the first and last stay); with --ratio, then "
                                              "remove heads."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="Channel counts become multiples of N; default "
                                           "the GroupNorm group count (times the attention head size if fixed)."),
    importance: str = typer.Option("magnitude", help="magnitude, random or taylor (needs --data)."),
    data: Optional[str] = typer.Option(None, "--data", help="Images for Taylor importance: 'digits' or a folder."),
    taylor_batches: int = typer.Option(8, "--taylor-batches", help="Batches of denoising loss for Taylor."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Batch size of the Taylor batches."),
    students: Optional[int] = typer.Option(None, "--students", help="K students to come: they all start from this "
                                           "one template, so nothing extra is written."),
    seed: Annotated[int, seed_option("Seeds the Taylor batches and random importance.")] = 0,
    device: Device = "auto",
    no_throughput: bool = typer.Option(False, "--no-throughput", help="Skip the throughput measurement."),
    out: Annotated[Optional[Path], stage_out("template")] = None,
    force: Force = False,
) -> None:
    """Channel-slim a teacher (or remove blocks of a Stable Diffusion UNet) into a student template that plain
    diffusers loads."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.stages.prune import PruneConfig, run_prune

    teacher = teacher if teacher is not None else str(find_newest_model(Path("."), kinds=("teacher",)))
    out = out if out is not None else default_output(Path("."), "template")
    cfg = PruneConfig(teacher=teacher, ratio=ratio, blocks=blocks, drop_blocks=drop_blocks, target_macs=target_macs,
                      round_to=round_to, importance=importance, data=data, taylor_batches=taylor_batches,
                      batch_size=batch_size, students=students, seed=seed, device=device,
                      throughput=not no_throughput, out=out, force=force)
    path = run_prune(cfg)
    typer.echo(report_text(read_manifest(path, verify=False).summary, path))


def report_text(s: dict, path: Path) -> str:
    """The command's report: totals, per-block table, throughput."""
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
    if "block_out_channels" in t:
        lines.append(f"  block_out_channels {t['block_out_channels']} -> {m['block_out_channels']}")
    else:  # a DiT: heads (and with them the width and MLP), and depth
        lines.append(f"  heads {t['num_attention_heads']} -> {m['num_attention_heads']}, width {t['width']} -> "
                     f"{m['width']}, MLP {t['mlp_width']} -> {m['mlp_width']}, blocks {t['num_layers']} -> "
                     f"{m['num_layers']}")
    lines.append(f"  params {t['params'] / 1e6:.3f}M -> {m['params'] / 1e6:.3f}M ({s['params_ratio']:.1%}),  "
                 f"MACs {t['macs'] / 1e9:.4f}G -> {m['macs'] / 1e9:.4f}G ({s['macs_ratio']:.1%})")
    names = [b["block"] if "student_block" not in b or b.get("student_block") == b["block"]
             else f"{b['block']}>{b.get('student_block') or '-'}" for b in s["blocks"]]
    w = max([16] + [len(n) + 1 for n in names])  # DiT's transformer_blocks.N>transformer_blocks.M are long
    lines.append(f"  {'block':<{w}}{'channels' if 'block_out_channels' in t else 'heads':>12}{'params kept':>13}"
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
