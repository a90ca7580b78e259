"""``o2m score``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import Device, Force, seed_option, stage_out


@app.command()
@handles_errors
def score(
    samples: Optional[List[Path]] = typer.Argument(
        None, help="Samples directories (o2m sample outputs); default: the newest one here."),
    ref: str = typer.Option("digits", "--ref", help="Reference images: 'digits' (bundled) or a folder of images."),
    features: str = typer.Option("auto", "--features",
                                 help="digits (shipped classifier, 1x8x8), inception (clean-fid), or auto."),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", help="Local inception-2015-12-05.pt (clean-fid's file; never downloaded)."),
    clip_weights: Optional[Path] = typer.Option(
        None, "--clip-weights",
        help="Local CLIP directory, never downloaded: a transformers CLIPModel (config.json, model.safetensors) or "
             "an OpenCLIP one (open_clip_config.json, open_clip_model.safetensors), with tokenizer files. Adds the "
             "CLIP score (torchmetrics: max(100 x mean cos, 0)) and the raw mean cosine of each image against its "
             "prompt (text-conditioned samples)."),
    throughput_batch: int = typer.Option(64, "--throughput-batch", help="Batch size of the timed sampling runs."),
    throughput_steps: Optional[int] = typer.Option(
        None, "--throughput-steps", help="Sampler steps of the timed runs; default: the samples' steps."),
    throughput_repeats: int = typer.Option(2, "--throughput-repeats", help="Timed runs after one warm-up."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="KID subsets (mean and std are over these)."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="Largest KID subset."),
    seed: Annotated[int, seed_option("Seed of the KID subsets and the throughput noise.")] = 0,
    device: Device = "auto",
    out: Annotated[Optional[Path], stage_out("scores")] = None,
    force: Force = False,
) -> None:
    """FID/KID (clean-fid), CLIP score, params, MACs and throughput of sampled models, as a Table-1-style report."""
    import json

    from o2mcli.chain import find_newest_samples
    from o2mcli.outputs import default_output
    from o2mcli.scoring.report import markdown_table
    from o2mcli.stages.score import ScoreConfig, run_score

    dirs = list(samples) if samples else [find_newest_samples(Path("."))]
    cfg = ScoreConfig(samples=dirs, ref=ref, features=features, inception_weights=inception_weights,
                      clip_weights=clip_weights,
                      throughput_batch=throughput_batch, throughput_steps=throughput_steps,
                      throughput_repeats=throughput_repeats, kid_subsets=kid_subsets,
                      kid_subset_size=kid_subset_size, seed=seed, device=device,
                      out=out if out is not None else default_output(Path("."), "scores"), force=force)
    path = run_score(cfg)
    report = json.loads((path / "report.json").read_text())
    typer.echo(markdown_table(report["rows"]))
    typer.echo(f"wrote {path}")
