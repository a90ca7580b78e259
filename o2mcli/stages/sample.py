"""``o2m sample``: draw images from any model input (one UNet or a K-student group) with a diffusers sampler.

The output is a ``samples`` stage directory:

* ``samples.npz`` with key ``images``: uint8 (N, H, W, C), what ``o2m score`` reads; beside it ``labels`` (the
  classes a class-conditional model was asked for) or ``prompts`` (a text model's prompt of each image, unicode);
* ``png/000000.png`` ...: one PNG per image (unless ``png`` is off);
* ``grid.png``: the first 64 images, upscaled so a person can see them;
* ``manifest.json``: the full config (``model`` resolved to an absolute path), the model as
  ``parents[0]``, and a summary (shape, timing, and for a student group how many
  sample-evaluations each student served; for a conditional model the guidance weight used, and for a text
  model the prompt count, negative prompt and the pipeline whose VAE and text encoder were used, with hashes;
  with DeepCache its interval N, branch B and the full and partial model calls made; with ``compile`` how the
  denoiser ran, compiled or eager after a failure, and the seconds of compiling, which ``seconds`` excludes).

DeepCache (``deepcache`` N, ``cache_branch`` B; Ma et al. 2024): every N-th step a full forward refreshes the cache
of the UNet's deep features, the steps between recompute only the shallow branch B; with a student group a step
served by another student than the cache's owner is full. N=1 is plain sampling.

A prompt-conditioned latent model (Stable Diffusion) samples latents, guided by classifier-free guidance against the
negative prompt (default "", weight 7.5), decoded to pixels by its codec (the pipeline's VAE) batch by batch.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.chain import resolve_model_spec
from o2mcli.data.prompts import read_prompts
from o2mcli.data.samples import SAMPLES_FILE
from o2mcli.devices import resolve_device
from o2mcli.diffusion.schedulers import SAMPLER_HELP
from o2mcli.errors import O2MError, OptionError
from o2mcli.fsutil import atomic_write_bytes
from o2mcli.outputs import atomic_dir, ensure_space, notice, reserve_output, run_scope
from o2mcli.manifest import parent_ref, write_manifest
from o2mcli.models.codec import PIXELS, Codec
from o2mcli.models.condition import Condition as ModelCondition
from o2mcli.models.conditioning import takes_prompts
from o2mcli.parsing import cli, int_list
from o2mcli.stages import fields
from o2mcli.viz import grid_image, save_png, to_uint8

GRID_IMAGES = 64
GRID_MIN_CELL = 64  # an 8x8 digit becomes 64x64 pixels in grid.png


TEXT_GUIDANCE = 7.5  # Stable Diffusion's usual classifier-free guidance weight
CLASS_GUIDANCE = 1.0  # plain conditional sampling: class models were guided only when asked
MAX_GUIDANCE = 100.0  # far beyond any weight in use; above it eps_u + w (eps_c - eps_u) only overflows or saturates


class SampleConfig(BaseModel):
    """Every setting of a sampling run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str = Field(json_schema_extra=cli(argument=True, unset=True), description="Model file or directory, or "
                       "digits-teacher; default: the newest model in the current directory.")
    # every name in o2mcli.diffusion.schedulers.SAMPLERS (a test checks they agree)
    scheduler: Literal["ddpm", "ddim", "pndm", "euler", "euler-a", "unipc", "dpm++2m", "dpm++", "dpm++2m-karras"] = \
        Field("ddim", description=SAMPLER_HELP)
    steps: int = Field(50, ge=1, description="Sampler steps (1..T).")
    n: int = Field(500, ge=1, json_schema_extra=cli("-n", "--n"), description="Number of images.")
    batch_size: int = Field(256, ge=1, json_schema_extra=cli("--batch-size", "-b"))
    seed: int = fields.seed("Batch i draws its noise from a generator seeded seed+i.")
    device: str = fields.device()
    out: Path = fields.stage_out("samples")
    force: bool = fields.force()
    png: bool = Field(True, json_schema_extra=cli("--no-png", negate=True),
                      description="Skip the individual PNGs (samples.npz and grid.png only).")
    # class-conditional models: the classes asked for, in turn ("0,1,2"), or "null": the null class (the
    # unconditional branch) for every image (`o2m sample --class K` is one class)
    classes: Optional[Union[Literal["null"], tuple[int, ...]]] = Field(
        None, description="Class-conditional models: these classes in turn, e.g. 0,1,2 (default: every class, "
        "balanced).")
    # Classifier-free guidance weight w (at or below 1: none, the conditional prediction alone, as diffusers).
    # None: the model's default, 7.5 for a text model (Stable Diffusion's), 1 otherwise; the weight used is
    # recorded in the manifest summary.
    guidance: Optional[float] = Field(None, ge=0, description="Classifier-free guidance weight w (at most 1: no "
                                      "guidance, one forward on the condition alone, as diffusers; larger: more "
                                      "typical of the class or prompt; at most 100). Default: 7.5 for a text model, 1 "
                                      "for a class model.")
    # text models: the prompts, given to the images in turn
    prompt: Optional[tuple[str, ...]] = Field(None, json_schema_extra=cli(metavar="TEXT"), description="Text models: "
                                              "a prompt (repeat for several; the images take them in turn).")
    # text models: a file of prompts, one a line (instead of ``prompt``)
    prompts: Optional[Path] = Field(None, description="Text models: a file of prompts, one a line (blank lines "
                                    "ignored), taken in turn.")
    negative_prompt: str = Field("", description="Text models: the prompt of guidance's unconditional branch "
                                 "(default: the empty prompt).")
    # text models: where the VAE, text encoder and tokenizer come from
    pipeline: Optional[Path] = Field(None, description="Text models: the Stable Diffusion pipeline whose VAE, text "
                                     "encoder and tokenizer to use (default: the one the model records; checked by "
                                     "sha256).")
    # DeepCache interval N: every N-th step full (1: no caching)
    deepcache: Optional[int] = Field(None, ge=1, json_schema_extra=cli(metavar="N"), description="DeepCache 1:N: "
                                     "one step in N (uniform schedule: every N-th, step 0 included) is a full forward "
                                     "that refreshes the cache of the UNet's deep features; the steps between "
                                     "recompute only the shallow layer branch. With "
                                     "a group of students, a step served by a different student than the one that "
                                     "filled the cache is a full step. N=1: no caching. UNets only.")
    # DeepCache's layer branch B (skip feature B: 0 is conv_in's); None: 0
    cache_branch: Optional[int] = Field(None, ge=0, json_schema_extra=cli(metavar="B"), description="DeepCache's "
                                        "layer branch: number the UNet's skip features from conv_in's (0) down; "
                                        "partial steps recompute conv_in, the down layers making skips 1..B, the "
                                        "up layers consuming skips B..0 (from the cached deeper feature) and the "
                                        "output head (default 0, the paper's setting and the cheapest).")
    # DeepCache's schedule of full steps; None: uniform
    deepcache_schedule: Optional[Literal["uniform", "nonuniform"]] = Field(
        None, description="DeepCache's schedule of full steps: uniform (every N-th step) or nonuniform (the paper's "
        "non-uniform 1:N: as many full steps, dense around a center step by a power law; default uniform).")
    # torch.compile each denoiser (o2mcli.diffusion.compile): warm-up timed apart, eager fallback on failure
    compile: bool = Field(False, description="Compile the denoiser (each student of a group) with torch.compile: "
                          "channels-last, static shapes, on CUDA bf16 weights and CUDA graphs. Compiling takes "
                          "seconds to minutes, recorded apart from the sampling time; if it fails, sampling continues "
                          "eagerly with a note. Not with --deepcache.")
    # latent models: the images' size in pixels (a multiple of the VAE's factor); None: the model's sample size
    height: Optional[int] = Field(None, ge=1, le=16384, description="Latent text-to-image models: the images' height "
                                  "in pixels, a multiple of the VAE's factor (default: the model's).")
    width: Optional[int] = Field(None, ge=1, le=16384, description="Latent text-to-image models: the images' width "
                                 "in pixels (default: the model's).")
    _parse_classes = field_validator("classes", mode="before")(classmethod(lambda cls, v: _classes_value(v)))

    @field_validator("guidance")
    @classmethod
    def _guidance_bounded(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and v > MAX_GUIDANCE:
            raise ValueError(f"at most {MAX_GUIDANCE:g}: classifier-free guidance weights in use are about 1 to 20 "
                             "(Stable Diffusion: 7.5); larger ones overflow or saturate every sample")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return (v,) if isinstance(v, str) else v


@dataclass
class Condition:
    """What the sampler is asked for beyond noise: each image's condition, the guidance, and the model's codec."""

    cond: Any = None  # (N,) class labels or indices into ``table``
    table: Any = None  # (P, ...) the codec's embeddings of the P prompts
    uncond: Any = None  # the null class, or the negative prompt's Condition (one row)
    guidance: float = 1.0
    codec: Codec = PIXELS  # a latent codec decodes the final samples to images in [0, 1]

    @property
    def decode(self) -> Optional[Callable]:
        return self.codec.decode if self.codec.latent else None

    @property
    def unpack(self) -> Callable:
        """Each batch's rows (labels, or rows of ``table``) as the models' Condition."""
        return self.codec.unpack if self.table is not None else (lambda labels: ModelCondition(labels=labels))
    npz: dict = field(default_factory=dict)  # arrays saved beside ``images``
    summary: dict = field(default_factory=dict)


@run_scope
def run_sample(cfg: SampleConfig) -> Path:
    """Sample ``cfg.n`` images from ``cfg.model``; write a ``samples`` stage directory at ``cfg.out``."""
    from o2mcli.diffusion.sampler import sample_images
    from o2mcli.models.denoise import input_shape
    from o2mcli.models.group import StudentGroup
    from o2mcli.models.io import load_model

    # 1. Refuse bad outputs and inputs before any work.
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=[cfg.model, cfg.prompts, cfg.pipeline])
    if cfg.prompt is not None and cfg.prompts is not None:
        raise OptionError("prompts", str(cfg.prompts), "give --prompt or --prompts, not both")
    prompts = list(cfg.prompt) if cfg.prompt is not None else (
        read_prompts(cfg.prompts) if cfg.prompts is not None else None)
    if prompts is not None and not prompts:
        raise OptionError("prompt", "", "give at least one prompt")
    model_path = resolve_model_spec(cfg.model)
    if not model_path.exists():
        raise O2MError(f"{model_path}: no such model file or directory")
    device = resolve_device(cfg.device)
    if cfg.cache_branch is not None and cfg.deepcache is None:
        raise OptionError("cache_branch", cfg.cache_branch, "is DeepCache's branch; give --deepcache N too")
    if cfg.deepcache_schedule is not None and cfg.deepcache is None:
        raise OptionError("deepcache_schedule", cfg.deepcache_schedule, "is DeepCache's schedule; give --deepcache N "
                          "too")
    if cfg.compile and cfg.deepcache is not None:
        # DeepCache's partial forwards run the UNet's blocks one by one, outside the compiled forward.
        raise OptionError("compile", True, "does not combine with --deepcache yet (DeepCache's partial forwards are "
                          "not compiled); drop one")

    # 2. Load the model (one UNet, a diffusers dir/pipeline, or a stage dir, maybe a student group).
    loaded = load_model(model_path, device)
    T = loaded.num_train_timesteps
    if cfg.steps > T:
        raise O2MError(f"--steps {cfg.steps}: more than the model's {T} training timesteps")
    unet = loaded.denoiser.eval()
    group = unet if isinstance(unet, StudentGroup) else None
    if group is not None:
        group.served = [0] * len(group.students)
    parent = parent_ref(model_path)
    spec = counts = None
    if cfg.deepcache is not None:
        from o2mcli.diffusion.deepcache import DeepCacheCounts, DeepCacheSpec, check_deepcache

        spec = DeepCacheSpec(cfg.deepcache, cfg.cache_branch or 0, cfg.deepcache_schedule or "uniform")
        try:
            check_deepcache(unet, spec)
        except OptionError as e:
            raise OptionError(e.field, e.value, f"{model_path}: {e.reason}") from e
        except O2MError as e:
            raise O2MError(f"{model_path}: {e}") from e
        counts = DeepCacheCounts()

    conditioning = loaded.conditioning
    if takes_prompts(conditioning):
        condition = text_condition(loaded, cfg, prompts, model_path, device)
    else:
        for name, value in (("prompt", cfg.prompt), ("prompts", cfg.prompts), ("pipeline", cfg.pipeline),
                            ("negative_prompt", cfg.negative_prompt or None)):
            if value is not None:
                raise OptionError(name, _as_typed(value),
                                  f"{model_path} is not text-conditioned (prompts are for Stable Diffusion models)")
        condition = class_condition(conditioning, cfg, model_path)

    # 3. Sample, once the output's file system has room for the images (a latent codec decodes to larger images;
    #    the PNGs roughly double the bytes).
    shape = sample_shape(input_shape(unet), condition.codec, cfg, model_path)
    pixels = int(np.prod(condition.codec.image_shape(shape)))
    ensure_space(out, cfg.n * pixels * (2 if cfg.png else 1))
    note_deepcache(cfg.deepcache, cfg.steps)
    compiled = None
    if cfg.compile:
        from o2mcli.diffusion.compile import compile_denoiser

        compiled = compile_denoiser(unet, device)
    t0 = time.perf_counter()
    images01 = sample_images(unet, cfg.scheduler, loaded.scheduler_config, cfg.steps, cfg.n, cfg.batch_size,
                             cfg.seed, device, cond=condition.cond, guidance=condition.guidance,
                             uncond=condition.uncond, cond_table=condition.table, unpack=condition.unpack,
                             decode=condition.decode, shape=shape,
                             deepcache=spec, counts=counts)
    # Compiling (the first calls of each input shape) is reported apart, not as sampling time.
    seconds = time.perf_counter() - t0 - (compiled.warmup_s if compiled is not None else 0.0)
    if not np.isfinite(images01).all():
        if condition.guidance > 1.0:  # eps_u + w (eps_c - eps_u) grows with w: blame the weight before the model
            raise OptionError("guidance", condition.guidance, f"sampling {model_path} produced non-finite values; "
                              "guidance this strong is the likely cause (Stable Diffusion uses 7.5): use a smaller "
                              "--guidance")
        raise O2MError(f"{model_path}: sampling produced non-finite values; the model is broken")
    images = to_uint8(images01)  # (N, H, W, C)
    _, h, w, c = images.shape

    # 4. Write the stage directory atomically.
    config = cfg.model_dump(mode="json")
    config["model"] = str(model_path.resolve())
    for key in ("prompts", "pipeline"):
        if config[key] is not None:
            config[key] = str(Path(config[key]).resolve())
    summary = {
        "n": int(images.shape[0]),
        "image_shape": [int(h), int(w), int(c)],
        "seconds": round(seconds, 4),
        "images_per_s": round(images.shape[0] / max(seconds, 1e-9), 3),
        "device": str(device),
        "model_form": loaded.form,
        "model_sha256": loaded.sha256,
        "num_train_timesteps": T,
        "ranges": [list(r) for r in loaded.ranges],
    }
    if group is not None:
        summary["served"] = [int(s) for s in group.served]
    if compiled is not None:
        summary["compile"] = compiled.summary()
    if spec is not None:
        summary["deepcache"] = {**spec.record(), "full_calls": counts.full, "partial_calls": counts.partial}
    summary.update(condition.summary)
    if loaded.notes:
        summary["notes"] = list(loaded.notes)
    with atomic_dir(out, force=cfg.force) as tmp:
        buf = io.BytesIO()
        np.savez(buf, images=images, **condition.npz)
        atomic_write_bytes(tmp / SAMPLES_FILE, buf.getvalue())
        if cfg.png:
            _write_pngs(images, tmp / "png")
        save_png(grid_image(images[:GRID_IMAGES], min_cell=GRID_MIN_CELL), tmp / "grid.png")
        write_manifest(tmp, "samples", config, parents=[parent], summary=summary)
    return out


def note_deepcache(deepcache: Optional[int], steps: int) -> None:
    """``--deepcache N`` with N at or above the steps: the 1:N schedule's only full step is step 0 (a group's change
    of student aside), so the cache is never refreshed; with one step nothing is partial and caching does nothing.
    Said once every input is checked, just before sampling (a refused run says only why)."""
    if deepcache is None or deepcache <= 1 or steps < 1 or deepcache < steps:
        return
    if steps <= 1:
        notice(f"--deepcache {deepcache}: with {steps} step no step is partial, so DeepCache does nothing")
        return
    notice(f"--deepcache {deepcache} is not below --steps {steps}: step 0 is the only full step of the schedule (a "
           "student group adds one per change of student) and every later step is partial, reusing the deep "
           "features of the first, noisiest step (the cache is never refreshed); "
           "DeepCache's paper uses N of 2 to 10 or so")


def sample_shape(model_shape: tuple[int, int, int], codec: Codec, cfg: SampleConfig, model_path: Path
                 ) -> tuple[int, int, int]:
    """(C, H, W) of the denoiser's samples: the model's, or for a latent model asked for ``height``/``width`` pixels
    the latents that decode to them (each a multiple of the codec's factor, as diffusers requires)."""
    if cfg.height is None and cfg.width is None:
        return model_shape
    if not codec.latent:
        name, value = ("height", cfg.height) if cfg.height is not None else ("width", cfg.width)
        raise OptionError(name, value, f"{model_path} is a pixel model: it samples at its own size "
                          f"{model_shape[1]}x{model_shape[2]}")
    c, h, w = model_shape
    f = codec.factor
    size = {"height": cfg.height or h * f, "width": cfg.width or w * f}
    for name, value in size.items():
        if value % f:
            raise OptionError(name, value, f"must be a multiple of {f} (the VAE's factor)")
    return c, size["height"] // f, size["width"] // f


def _classes_value(v: Any) -> Any:
    """``"null"`` (any case) stays the null class's name; ``"0,1,2"`` -> (0, 1, 2)."""
    if isinstance(v, str) and v.strip().lower() == "null":
        return "null"
    return int_list(v)


def _as_typed(value: Any) -> Any:
    """An option's value as the user typed it, for an error: one repeated option's single value unwrapped."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return value[0]
    return value if isinstance(value, (str, tuple, list)) else str(value)


def class_condition(conditioning: dict | None, cfg: SampleConfig, model_path: Path) -> Condition:
    """A class-conditional (or unconditional) model's labels, null class and guidance (default 1)."""
    guidance = CLASS_GUIDANCE if cfg.guidance is None else cfg.guidance
    labels, null_class = class_labels(conditioning, cfg, model_path, guidance)
    if labels is None:
        return Condition(guidance=guidance)
    if cfg.classes == "null":
        # The unconditional branch for every image: no class was asked for, so no labels are saved (score reports
        # no class accuracy for them), and there is nothing to guide.
        return Condition(cond=labels, uncond=null_class, guidance=1.0,
                         summary={"classes": {"null": int(cfg.n)}, "guidance": 1.0})
    names = conditioning["classes"]
    summary = {"classes": {names[k]: int((labels == k).sum()) for k in sorted(set(labels.tolist()))},
               "guidance": guidance}
    return Condition(cond=labels, uncond=null_class, guidance=guidance, summary=summary,
                     npz={"labels": labels.numpy().astype(np.int64)})


def class_labels(conditioning: dict | None, cfg: SampleConfig, model_path: Path, guidance: float = CLASS_GUIDANCE):
    """(labels for the ``cfg.n`` images or None, the null class for guidance): the classes asked for in turn,
    or all classes balanced; refusals for an unconditional model, an unknown class, guidance without a null class."""
    import torch

    if conditioning is None:
        if cfg.classes is not None:
            raise OptionError("classes", cfg.classes, f"{model_path} is not class-conditional")
        if guidance != 1.0:
            raise OptionError("guidance", guidance, f"{model_path} is not class-conditional (guidance needs "
                              "a class-conditional model)")
        return None, None
    null = conditioning["null_class"]
    k = null if null is not None else len(conditioning["classes"])
    if cfg.classes == "null":
        if null is None:
            raise OptionError("classes", "null", f"{model_path} has no null class recorded (it was not trained by "
                              "o2m with label dropout)")
        if guidance > 1.0:
            raise OptionError("guidance", guidance, "the null class is the unconditional branch itself: there is "
                              "nothing to guide; drop --guidance")
        return torch.full((cfg.n,), int(null), dtype=torch.int64), null
    wanted = list(cfg.classes) if cfg.classes is not None else list(range(k))
    bad = [c for c in wanted if not 0 <= c < k]
    if bad or not wanted:
        raise OptionError("classes", cfg.classes, f"{model_path} has classes 0..{k - 1} "
                          f"({', '.join(conditioning['classes'][:k])})")
    if guidance > 1.0 and null is None:  # at or below 1 there is no unconditional branch to run
        raise OptionError("guidance", guidance, f"{model_path} has no null class recorded (it was not trained "
                          "by o2m with label dropout), so it cannot be guided; use --guidance 1")
    labels = torch.tensor(wanted, dtype=torch.int64)[torch.arange(cfg.n) % len(wanted)]
    return labels, null


def text_condition(loaded: Any, cfg: SampleConfig, prompts: list[str] | None, model_path: Path,
                   device) -> Condition:
    """A prompt-conditioned (latent) model's prompts in turn, embedded by its codec's text encoder(s) (once, or in
    fixed chunks as the images use them where they exceed the text-memory budget), the negative prompt's embedding
    for guidance (default 7.5), and its codec's decoder."""
    import torch

    from o2mcli.data.text import prompt_table, prompts_flag

    if cfg.classes is not None:
        raise OptionError("classes", cfg.classes, f"{model_path} is text-conditioned; give --prompt or --prompts")
    if prompts is None:
        raise O2MError(f"{model_path}: a text-conditioned model samples from prompts; give --prompt TEXT or "
                       "--prompts FILE")
    guidance = TEXT_GUIDANCE if cfg.guidance is None else cfg.guidance
    codec = loaded.codec(cfg.pipeline, device)  # checked: the parts are the recorded ones and fit the model
    # Each distinct prompt the n images use is encoded once; the images index their prompt's row.
    assigned = [prompts[i % len(prompts)] for i in range(cfg.n)]
    row = {p: i for i, p in enumerate(dict.fromkeys(assigned))}
    distinct = list(row)
    table = prompt_table(codec, distinct, prompts_flag(prompts))  # `table[rows]`: a tensor, or chunks within budget
    negative = codec.unpack(codec.encode_prompts([cfg.negative_prompt]))
    index = torch.tensor([row[p] for p in assigned], dtype=torch.int64)
    summary = {"prompts": len(prompts), "distinct_prompts": len(distinct), "guidance": guidance,
               "negative_prompt": cfg.negative_prompt, "pipeline": codec.summary()}
    return Condition(cond=index, table=table, uncond=negative, guidance=guidance, codec=codec, summary=summary,
                     npz={"prompts": np.array(assigned, dtype=str)})


def _write_pngs(images: np.ndarray, folder: Path) -> None:
    """One PNG per image, ``000000.png`` ... (inside the temp stage dir, so plain writes are atomic enough)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(folder / f"{i:06d}.png", format="PNG")
