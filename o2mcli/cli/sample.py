"""``o2m sample``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from o2mcli.cli.app import app, handles_errors
from o2mcli.errors import O2MError, OptionError
from o2mcli.cli.options import Device, Force, seed_option, stage_out


@contextmanager
def _named_as_typed(class_: Optional[str]) -> Iterator[None]:
    """``--class K`` travels as the config's ``classes``: a refusal of it names ``--class``, the flag typed."""
    from pydantic import ValidationError

    try:
        yield
    except OptionError as e:
        if class_ is None or e.field != "classes":
            raise
        raise OptionError("class", class_ if class_.strip().lower() == "null" else e.value, e.reason) from e
    except ValidationError as e:
        err = e.errors()[0]
        if class_ is None or tuple(err["loc"][:1]) != ("classes",):
            raise
        raise OptionError("class", class_, err["msg"].removeprefix("Value error, ")) from e


def _note_deepcache(deepcache: Optional[int], steps: int) -> None:
    """``--deepcache N`` with N at or above the steps: the 1:N schedule's only full step is step 0 (a group's change
    of student aside), so the cache is never refreshed; with one step nothing is partial and caching does nothing."""
    from o2mcli.outputs import notice

    if deepcache is None or deepcache <= 1 or steps < 1 or deepcache < steps:
        return
    if steps <= 1:
        notice(f"--deepcache {deepcache}: with {steps} step no step is partial, so DeepCache does nothing")
        return
    notice(f"--deepcache {deepcache} is not below --steps {steps}: step 0 is the only full step of the schedule (a "
           "student group adds one per change of student) and every later step is partial, reusing the deep "
           "features of the first, noisiest step (the cache is never refreshed); "
           "DeepCache's paper uses N of 2 to 10 or so")


@app.command()
@handles_errors
def sample(
    model: Optional[str] = typer.Argument(None, help="Model file or directory, or digits-teacher; "
                                                    "default: the newest model in the current directory."),
    scheduler: str = typer.Option("ddim", help="ddpm, ddim or dpm++."),
    steps: int = typer.Option(50, help="Sampler steps (1..T)."),
    n: int = typer.Option(500, "-n", "--n", help="Number of images."),
    batch_size: int = typer.Option(256, "--batch-size", "-b"),
    seed: Annotated[int, seed_option("Batch i draws its noise from a generator seeded seed+i.")] = 0,
    device: Device = "auto",
    out: Annotated[Optional[Path], stage_out("samples")] = None,
    force: Force = False,
    no_png: bool = typer.Option(False, "--no-png", help="Skip the individual PNGs (samples.npz and grid.png only)."),
    class_: Optional[str] = typer.Option(None, "--class", metavar="K|null",
                                         help="Class-conditional models: sample this class; null: the null class "
                                         "(the unconditional branch), with no labels saved."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class-conditional models: these classes in turn, "
                                          "e.g. 0,1,2 (default: every class, balanced)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance weight w (at most 1: "
                                             "no guidance, one forward on the condition alone, as diffusers; "
                                             "larger: more typical of the class or prompt; at most 100). Default: "
                                             "7.5 for a text model, 1 for a class model."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", metavar="TEXT",
                                               help="Text models: a prompt (repeat for several; the images take "
                                               "them in turn)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text models: a file of prompts, one a line "
                                           "(blank lines ignored), taken in turn."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Text models: the prompt of guidance's "
                                        "unconditional branch (default: the empty prompt)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Text models: the Stable Diffusion pipeline "
                                            "whose VAE, text encoder and tokenizer to use (default: the one the "
                                            "model records; checked by sha256)."),
    deepcache: Optional[int] = typer.Option(None, "--deepcache", metavar="N",
                                            help="DeepCache: every N-th step (step 0 included) is a full forward "
                                            "that refreshes the cache of the UNet's deep features; the steps "
                                            "between recompute only the shallow branch. With a group of students, "
                                            "a step served by a different student than the one that filled the "
                                            "cache is a full step. N=1: no caching. UNets only."),
    cache_branch: Optional[int] = typer.Option(None, "--cache-branch", metavar="B",
                                               help="DeepCache's branch: partial steps recompute down blocks 0..B "
                                               "and their paired up blocks around the cached deeper features "
                                               "(default 0: the first block only, the cheapest)."),
    height: Optional[int] = typer.Option(None, "--height", help="Latent text-to-image models: the images' height "
                                         "in pixels, a multiple of the VAE's factor (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Latent text-to-image models: the images' width in "
                                        "pixels (default: the model's)."),
) -> None:
    """Sample images from a model (one UNet or a group of students) into a samples directory.

    A Stable Diffusion model samples from --prompt/--prompts, guided against --negative-prompt, decoded by its
    pipeline's VAE."""
    import json

    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.stages.sample import SampleConfig, run_sample

    model = model if model is not None else str(find_newest_model(Path(".")))
    out = out if out is not None else default_output(Path("."), "samples")
    if class_ is not None and classes is not None:
        raise O2MError(f"--class {class_} and --classes {classes}: give one")
    if class_ is not None and "," in class_:
        raise OptionError("class", class_, "one class; use --classes for several")
    _note_deepcache(deepcache, steps)
    with _named_as_typed(class_):
        cfg = SampleConfig(model=model, scheduler=scheduler, steps=steps, n=n, batch_size=batch_size, seed=seed,
                           device=device, out=out, force=force, png=not no_png, guidance=guidance,
                           classes=class_ if class_ is not None else classes,
                           prompt=tuple(prompt) if prompt else None, prompts=prompts,
                           negative_prompt=negative_prompt, pipeline=pipeline, deepcache=deepcache,
                           cache_branch=cache_branch, height=height, width=width)
        path = run_sample(cfg)
    s = read_manifest(path, verify=False).summary
    extra = f", served {json.dumps(s['served'])}" if "served" in s else ""
    if "deepcache" in s:
        dc = s["deepcache"]
        extra += f", DeepCache N={dc['interval']} B={dc['branch']}: {dc['full_calls']} full, " \
                 f"{dc['partial_calls']} partial calls"
    typer.echo(f"wrote {path}: {s['n']} images {'x'.join(map(str, s['image_shape']))} from {model} "
               f"in {s['seconds']:.1f} s ({s['images_per_s']:.1f} img/s{extra})")
