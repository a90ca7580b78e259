"""``o2m train``: standard DDPM training of a teacher (Ho et al. 2020; learned variance: Nichol & Dhariwal 2021)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.data import load_dataset
from o2mcli.devices import resolve_device
from o2mcli.errors import O2MError
from o2mcli.parsing import cli, int_list
from o2mcli.stages import fields
from o2mcli.outputs import atomic_dir, ensure_space, reserve_output, run_scope
from o2mcli.manifest import write_manifest
from o2mcli.models.conditioning import class_record
from o2mcli.models.configs import scheduler_config, unet_config
from o2mcli.models.parametrization import prediction_name
from o2mcli.models.io import build_denoiser, model_record, save_model_file
from o2mcli.runtime.checkpoint import check_partial, run_bytes
from o2mcli.runtime.run import read_jsonl, seed_everything
from o2mcli.viz import line_plot


class TrainConfig(BaseModel):
    """Every setting of a teacher training run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    data: str = Field("digits", description="'digits' (bundled) or a folder of same-size images.")
    out: Path = Field(Path("teacher"), description="Stage directory, or a .safetensors file.",
                      json_schema_extra=cli("-o", "--out"))
    steps: int = Field(4000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1, json_schema_extra=cli("--batch-size", "-b"))
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (linear warm-up).")
    lr_warmup: int = fields.internal(200, ge=0)
    weight_decay: float = fields.internal(0.0, ge=0)
    ema_decay: float = fields.ema_decay()
    grad_clip: float = fields.internal(1.0, gt=0)
    variance: Literal["fixed", "learned"] = Field("fixed", json_schema_extra=cli(unset=True), description="fixed (C "
                                                  "outputs; the default) or learned (2C outputs, hybrid loss). With "
                                                  "--model-config, the config's out_channels decide.")
    # What the model learns to output: epsilon or v_prediction (or eps, v).
    prediction_type: str = Field("epsilon", description="What the model learns to output: epsilon (eps, the noise) or "
                                 "v_prediction (v, Salimans & Ho 2022).")
    vlb_weight: float = fields.internal(0.001, ge=0)
    cond: Literal["none", "class"] = Field("none", description="none, or class: a class-conditional teacher from the "
                                           "data's labels (the digits, or a folder with one subfolder per class).")
    label_dropout: float = Field(0.1, ge=0, le=1, description="--cond class: probability a label is replaced by the "
                                 "null class, so classifier-free guidance works.")
    # A diffusers config (JSON; its _class_name picks the family, UNet2DModel without one) instead of o2m's built-in
    # UNet, which the four shape settings below describe (they are refused beside it). The command passes only the
    # ones given, so the stage can tell a default from a choice.
    denoiser_config: Optional[Path] = Field(None, json_schema_extra=cli("--model-config"), description="A diffusers "
                                            "model config (JSON) to train instead of the built-in UNet: its "
                                            "_class_name picks the family (UNet2DModel without one, "
                                            "DiTTransformer2DModel, ...).")
    block_out_channels: tuple[int, ...] = Field((32, 64, 64), json_schema_extra=cli("--channels", unset=True),
                                                description="Built-in UNet: block_out_channels, comma-separated "
                                                "[default: 32,64,64].")
    layers_per_block: int = Field(1, ge=1, json_schema_extra=cli(unset=True),
                                  description="Built-in UNet [default: 1].")
    norm_num_groups: int = Field(8, ge=1, json_schema_extra=cli("--norm-groups", unset=True),
                                 description="Built-in UNet: GroupNorm groups [default: 8].")
    attention_level: Optional[int] = Field(1, json_schema_extra=cli(unset=True), description="Built-in UNet: level "
                                           "with attention blocks; -1 for none [default: 1].")
    num_train_timesteps: int = Field(1000, ge=2, json_schema_extra=cli("--timesteps"),
                                     description="Training timesteps T.")
    seed: int = fields.seed()
    device: str = fields.device()
    save_every: int = fields.save_every()
    log_every: int = fields.log_every()
    resume: bool = fields.resume()
    force: bool = fields.force()

    _parse_channels = field_validator("block_out_channels", mode="before")(classmethod(lambda cls, v: int_list(v)))

    _prediction = field_validator("prediction_type")(classmethod(lambda cls, v: prediction_name(v)))

    @field_validator("block_out_channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("channel counts must be positive")
        return v


@run_scope
def run_train(cfg: TrainConfig) -> Path:
    """Train a DDPM teacher; write a ``teacher`` stage directory, or one ``.safetensors`` if ``out`` ends so.

    Training is a configuration of the one engine (``o2mcli.distill``): one student, no teacher, no KD,
    real images, the diffusion loss; the loop (resume, logs, the NaN stop, checkpoints) is ``fit``.
    """
    from o2mcli.distill.build import make_trainer
    from o2mcli.distill.engine import Hyper
    from o2mcli.distill.fit import FitPlan, fit
    from o2mcli.runtime.dist import barrier, init_distributed, local_device, shutdown

    # 1. Refuse bad options, then bad outputs, before any work (options first: a bad --device is not
    #    "an interrupted run is there").
    given = read_denoiser_config(cfg)
    if given is None and cfg.attention_level is not None and not 0 <= cfg.attention_level < len(cfg.block_out_channels):
        raise O2MError(f"--attention-level {cfg.attention_level}: must index one of {len(cfg.block_out_channels)} levels")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=[cfg.data])
    work = check_partial(out, cfg.resume, cfg.force)

    # 2. Data and model.
    data = load_dataset(cfg.data)
    _, c, h, w = data.images.shape
    if h != w:
        raise O2MError(f"{data.source}: images are {w}x{h}; o2m trains square images")
    if given is None and h % (2 ** (len(cfg.block_out_channels) - 1)):
        raise O2MError(f"{data.source}: size {h} is not divisible by 2^{len(cfg.block_out_channels) - 1} "
                       f"(the downsamplings of {len(cfg.block_out_channels)} blocks)")
    classes: tuple[str, ...] = ()
    if cfg.cond != "none":
        if data.labels is None:
            raise O2MError(f"{data.source}: --cond class needs labelled images (the bundled digits, or a folder with "
                           "one subfolder per class)")
        classes = data.classes
        if len(classes) < 2:
            raise O2MError(f"{data.source}: --cond class needs at least 2 classes; found {len(classes)} "
                           f"({', '.join(classes)})")
    seed_everything(cfg.seed)  # the model's initialization
    if given is not None:
        model, cfg = model_from_config(cfg, given, data, len(classes))
    else:
        try:
            ucfg = unet_config(sample_size=h, channels=c, variance=cfg.variance,
                               block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                               norm_num_groups=cfg.norm_num_groups, attention_level=cfg.attention_level,
                               num_classes=len(classes) or None)
        except ValueError as e:
            raise O2MError(str(e)) from e
        model = build_denoiser(ucfg, None, out)
    scfg = scheduler_config(cfg.variance, cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    ensure_space(out, run_bytes(model, 1))
    hyper = Hyper(batch_size=cfg.batch_size, lr=cfg.lr, lr_warmup=cfg.lr_warmup, weight_decay=cfg.weight_decay,
                  ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip)

    # 3. The engine and the loop; the teacher written (rank 0).
    dist = init_distributed(device.type)
    try:
        device = local_device(dist, device)
        engine = make_trainer(model, scfg, data.to_model_range(), hyper, cfg.vlb_weight, cfg.seed, device, dist,
                              data.labels if classes else None, len(classes), cfg.label_dropout)
        fit(engine, FitPlan(steps=cfg.steps, log_every=cfg.log_every, save_every=cfg.save_every, resume=cfg.resume,
                            desc="train"), work, _fingerprint(cfg), lambda _engine, _log: {})
        if dist.is_main:
            _write(cfg, out, work, engine, scfg, data)
        barrier(dist)
    finally:
        shutdown(dist)
    return out


def _write(cfg: TrainConfig, out: Path, work: Path, engine, scfg: dict, data) -> None:
    """The EMA weights as the teacher, with the manifest, the metrics log and the loss curve."""
    student = engine.students[0]
    model = copy.deepcopy(student.raw).cpu().eval()
    student.ema.copy_to(model)
    rows = read_jsonl(work / "metrics.jsonl")
    # With --model-config the built-in UNet's shape settings describe nothing: left out; the file's path is kept
    # (the model's own config is in its metadata).
    config = cfg.model_dump(mode="json", exclude=set(SHAPE_FLAGS) if cfg.denoiser_config is not None else None)
    if cfg.denoiser_config is not None:
        config["denoiser_config"] = str(Path(cfg.denoiser_config).resolve())
    provenance = {"stage": "train", "config": config, "data": {"name": data.name, "source": data.source,
                                                                "sha256": data.sha256, "n": len(data)}}
    if cfg.cond != "none":  # what sample and score need to ask for a class and to guide
        provenance["conditioning"] = class_record(list(data.classes), len(data.classes), cfg.label_dropout)
    if out.suffix == ".safetensors":
        save_model_file(out, model, scfg, kind="teacher", provenance=provenance, force=cfg.force)
    else:
        with atomic_dir(out, force=cfg.force) as tmp:
            save_model_file(tmp / "model.safetensors", model, scfg, kind="teacher", provenance=provenance)
            shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
            line_plot({"loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}, tmp / "loss.png",
                      title=f"o2m train ({cfg.data})", logy=True)
            write_manifest(tmp, "teacher", config,
                           models=[model_record("teacher", "model.safetensors", model, (0, cfg.num_train_timesteps))],
                           scheduler_config=scfg,
                           summary={"final_loss": rows[-1]["loss"] if rows else None, "data": provenance["data"]})
    shutil.rmtree(work, ignore_errors=True)


def _fingerprint(cfg: TrainConfig) -> dict:
    # `steps` is left out so a resumed run can be extended (the LR is constant after warm-up). A --model-config
    # file counts by its content: an edited file is another run.
    found = cfg.model_dump(mode="json", exclude={"resume", "force", "device", "save_every", "log_every", "out", "steps"})
    if found.get("prediction_type") == "epsilon":  # (added later: checkpoints written before it still resume)
        del found["prediction_type"]
    if cfg.denoiser_config is not None:
        from o2mcli.fsutil import sha256_file

        found["denoiser_config_sha256"] = sha256_file(Path(cfg.denoiser_config))
    return found


# The built-in UNet's shape settings and their flags: meaningless beside --model-config, so refused there.
SHAPE_FLAGS = {"block_out_channels": "--channels", "layers_per_block": "--layers-per-block",
               "norm_num_groups": "--norm-groups", "attention_level": "--attention-level"}


def read_denoiser_config(cfg: TrainConfig) -> Optional[dict]:
    """``--model-config``'s diffusers config, its family's checks passed (a bad ``_class_name`` refused by name); None
    without one. The built-in UNet's shape options beside it are refused: the file gives the architecture."""
    from o2mcli.models.io import read_model_config

    if cfg.denoiser_config is None:
        return None
    path = Path(cfg.denoiser_config)
    clash = [SHAPE_FLAGS[k] for k in SHAPE_FLAGS if k in cfg.model_fields_set]
    if clash:
        raise O2MError(f"{clash[0]}: shapes o2m's built-in UNet; --model-config {path} gives the architecture")
    found = read_model_config(path)
    return found


def model_from_config(cfg: TrainConfig, given: dict, data, n_classes: int):
    """A freshly initialized model of ``given``'s family that fits the data (image shape, C or 2C outputs) and the
    conditioning (``n_classes`` classes, the null class after them; 0: unconditional), tried on one input; and the
    config with ``variance`` as the model's outputs say (``--variance`` must agree where given)."""
    import torch

    from o2mcli.models.configs import is_learned_variance
    from o2mcli.models.denoise import predict
    from o2mcli.models.families import family_for_config

    path = Path(cfg.denoiser_config)
    family = family_for_config(given, path, served=True)
    table, trained = family.class_table(given), family.trained_classes(given)
    if n_classes and trained is None:
        raise O2MError(f"{path}: a {family.name} config without a label table cannot train --cond class")
    if n_classes and trained != n_classes:
        raise O2MError(f"{path}: the {family.name} config's label table holds {trained} classes (the null class "
                       f"after them); {data.source} has {n_classes}")
    if not n_classes and table is not None and table[1] is None:
        raise O2MError(f"{path}: a {family.name} config with a label table fixes no null class to train it "
                       "unconditionally on; pass --cond class (or drop the table)")
    model = build_denoiser(given, None, path)
    _, c, h, w = data.images.shape
    if family.input_shape(model) != (c, h, w):
        raise O2MError(f"{path}: the model takes {'x'.join(map(str, family.input_shape(model)))} inputs; "
                       f"{data.source} has {c}x{h}x{w} images (set in_channels and sample_size)")
    learned = is_learned_variance(dict(model.config))
    out_c = int(model.config.get("out_channels") or c)
    if out_c not in (c, 2 * c):
        raise O2MError(f"{path}: out_channels {out_c}; expected {c} (fixed variance) or {2 * c} (learned)")
    variance = "learned" if learned else "fixed"
    if "variance" in cfg.model_fields_set and cfg.variance != variance:
        raise O2MError(f"--variance {cfg.variance}: {path} has {out_c} output channels for {c} input channels, "
                       f"a {variance} variance")
    try:  # one forward pass: a config diffusers builds but cannot run on these images fails here, in one line
        with torch.no_grad():
            y = predict(model, torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.long))
    except (RuntimeError, ValueError, TypeError) as e:
        raise O2MError(f"{path}: the model does not run on {c}x{h}x{w} images "
                       f"({str(e).splitlines()[0][:120]})") from e
    if tuple(y.shape) != (1, out_c, h, w):
        raise O2MError(f"{path}: the model maps {c}x{h}x{w} inputs to {tuple(y.shape)[1:]}; expected "
                       f"{(out_c, h, w)}")
    return model, cfg.model_copy(update={"variance": variance})
