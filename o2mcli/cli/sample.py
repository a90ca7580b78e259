"""``o2m sample``: its options are SampleConfig's fields, and ``--class``."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from pydantic import BaseModel, Field

from o2mcli.cli.app import app, handles_errors
from o2mcli.cli.options import config_values, options
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import cli
from o2mcli.stages.sample import SampleConfig


class ClassOption(BaseModel):
    """``--class K``: one class, which travels as the config's ``classes``."""

    class_: Optional[str] = Field(None, json_schema_extra=cli("--class", metavar="K|null"), description="Class-"
                                  "conditional models: sample this class; null: the null class (the unconditional "
                                  "branch), with no labels saved.")


ORDER = ("model", "scheduler", "steps", "n", "batch_size", "seed", "device", "out", "force", "png", "class_")


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


@app.command()
@handles_errors
@options(SampleConfig, ClassOption, order=ORDER)
def sample(**given: Any) -> None:
    """Sample images from a model (one UNet or a group of students) into a samples directory.

    A Stable Diffusion model samples from --prompt/--prompts, guided against --negative-prompt, decoded by its
    pipeline's VAE."""
    from o2mcli.chain import find_newest_model
    from o2mcli.outputs import default_output
    from o2mcli.manifest import read_manifest
    from o2mcli.stages.sample import run_sample

    values, class_ = config_values(SampleConfig, given), given["class_"]
    if "model" not in values:
        values["model"] = str(find_newest_model(Path(".")))
    if "out" not in values:
        values["out"] = default_output(Path("."), "samples")
    if class_ is not None and values["classes"] is not None:
        raise O2MError(f"--class {class_} and --classes {values['classes']}: give one")
    if class_ is not None and "," in class_:
        raise OptionError("class", class_, "one class; use --classes for several")
    with _named_as_typed(class_):
        cfg = SampleConfig(**{**values, "classes": class_ if class_ is not None else values["classes"]})
        path = run_sample(cfg)
    s = read_manifest(path, verify=False).summary
    extra = f", served {json.dumps(s['served'])}" if "served" in s else ""
    if "deepcache" in s:
        dc = s["deepcache"]
        extra += f", DeepCache N={dc['interval']} B={dc['branch']} {dc.get('schedule', 'uniform')}: " \
                 f"{dc['full_calls']} full, " \
                 f"{dc['partial_calls']} partial calls"
    typer.echo(f"wrote {path}: {s['n']} images {'x'.join(map(str, s['image_shape']))} from {cfg.model} "
               f"in {s['seconds']:.1f} s ({s['images_per_s']:.1f} img/s{extra})")
