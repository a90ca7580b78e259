"""``o2m sample``: draw images from any model input (one UNet or a K-student group) with a diffusers sampler.

The output is a ``samples`` stage directory:

* ``samples.npz`` with key ``images``: uint8 (N, H, W, C), what ``o2m score`` reads;
* ``png/000000.png`` ...: one PNG per image (unless ``png`` is off);
* ``grid.png``: the first 64 images, upscaled so a person can see them;
* ``manifest.json``: the full config (``model`` resolved to an absolute path), the model as
  ``parents[0]``, and a summary (shape, timing, and for a student group how many
  sample-evaluations each student served).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.chain import resolve_model_spec
from o2mcli.devices import resolve_device
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import int_list
from o2mcli.data.samples import SAMPLES_FILE
from o2mcli.fsutil import atomic_dir, atomic_write_bytes, check_output_free
from o2mcli.manifest import parent_ref, write_manifest
from o2mcli.viz import grid_image, save_png, to_uint8

GRID_IMAGES = 64
GRID_MIN_CELL = 64  # an 8x8 digit becomes 64x64 pixels in grid.png


class SampleConfig(BaseModel):
    """Every setting of a sampling run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str
    scheduler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    steps: int = Field(50, ge=1)
    n: int = Field(500, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)  # torch.Generator takes 64-bit seeds
    device: str = "auto"
    out: Path = Path("samples")
    force: bool = False
    png: bool = True
    classes: Optional[tuple[int, ...]] = None  # class-conditional models: the classes asked for, in turn ("0,1,2")
    guidance: float = Field(1.0, ge=0)  # classifier-free guidance weight w (1: plain conditional)
    _parse_classes = field_validator("classes", mode="before")(classmethod(lambda cls, v: int_list(v)))


def run_sample(cfg: SampleConfig) -> Path:
    """Sample ``cfg.n`` images from ``cfg.model``; write a ``samples`` stage directory at ``cfg.out``."""
    from o2mcli.diffusion.sampler import sample_images
    from o2mcli.models.group import StudentGroup
    from o2mcli.models.io import load_model

    # 1. Refuse bad outputs and inputs before any work.
    out = Path(cfg.out)
    check_output_free(out, cfg.force, inputs=[cfg.model])
    model_path = resolve_model_spec(cfg.model)
    if not model_path.exists():
        raise O2MError(f"{model_path}: no such model file or directory")
    device = resolve_device(cfg.device)

    # 2. Load the model (one UNet, a diffusers dir/pipeline, or a stage dir, maybe a student group).
    loaded = load_model(model_path, device)
    T = loaded.num_train_timesteps
    if cfg.steps > T:
        raise O2MError(f"--steps {cfg.steps}: more than the model's {T} training timesteps")
    unet = loaded.unet.eval()
    group = unet if isinstance(unet, StudentGroup) else None
    if group is not None:
        group.served = [0] * len(group.students)
    parent = parent_ref(model_path)

    labels, null_class = class_labels(loaded.conditioning, cfg, model_path)

    # 3. Sample.
    t0 = time.perf_counter()
    images01 = sample_images(unet, cfg.scheduler, loaded.scheduler_config, cfg.steps, cfg.n, cfg.batch_size,
                             cfg.seed, device, labels=labels, guidance=cfg.guidance, null_class=null_class)
    seconds = time.perf_counter() - t0
    if not np.isfinite(images01).all():
        raise O2MError(f"{model_path}: sampling produced non-finite values; the model is broken")
    images = to_uint8(images01)  # (N, H, W, C)
    _, h, w, c = images.shape

    # 4. Write the stage directory atomically.
    config = cfg.model_dump(mode="json")
    config["model"] = str(model_path.resolve())
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
    if labels is not None:
        names = loaded.conditioning["classes"]
        summary["classes"] = {names[k]: int((labels == k).sum()) for k in sorted(set(labels.tolist()))}
        summary["guidance"] = cfg.guidance
    if loaded.notes:
        summary["notes"] = list(loaded.notes)
    with atomic_dir(out, force=cfg.force) as tmp:
        buf = io.BytesIO()
        np.savez(buf, images=images, **({} if labels is None else {"labels": labels.numpy().astype(np.int64)}))
        atomic_write_bytes(tmp / SAMPLES_FILE, buf.getvalue())
        if cfg.png:
            _write_pngs(images, tmp / "png")
        save_png(grid_image(images[:GRID_IMAGES], min_cell=GRID_MIN_CELL), tmp / "grid.png")
        write_manifest(tmp, "samples", config, parents=[parent], summary=summary)
    return out


def class_labels(conditioning: dict | None, cfg: SampleConfig, model_path: Path):
    """(labels for the ``cfg.n`` images or None, the null class for guidance): the classes asked for in turn,
    or all classes balanced; refusals for an unconditional model, an unknown class, guidance without a null class."""
    import torch

    if conditioning is None:
        if cfg.classes is not None:
            raise OptionError("classes", cfg.classes, f"{model_path} is not class-conditional")
        if cfg.guidance != 1.0:
            raise OptionError("guidance", cfg.guidance, f"{model_path} is not class-conditional (guidance needs "
                              "a class-conditional model)")
        return None, None
    null = conditioning["null_class"]
    k = null if null is not None else len(conditioning["classes"])
    wanted = list(cfg.classes) if cfg.classes is not None else list(range(k))
    bad = [c for c in wanted if not 0 <= c < k]
    if bad or not wanted:
        raise OptionError("classes", cfg.classes, f"{model_path} has classes 0..{k - 1} "
                          f"({', '.join(conditioning['classes'][:k])})")
    if cfg.guidance != 1.0 and null is None:
        raise OptionError("guidance", cfg.guidance, f"{model_path} has no null class recorded (it was not trained "
                          "by o2m with label dropout), so it cannot be guided; use --guidance 1")
    labels = torch.tensor(wanted, dtype=torch.int64)[torch.arange(cfg.n) % len(wanted)]
    return labels, null


def _write_pngs(images: np.ndarray, folder: Path) -> None:
    """One PNG per image, ``000000.png`` ... (inside the temp stage dir, so plain writes are atomic enough)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(folder / f"{i:06d}.png", format="PNG")
