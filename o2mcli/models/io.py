"""Load any supported model input, save self-describing safetensors, export diffusers pipelines.

Accepted inputs wherever a model is expected:
1. an o2m ``.safetensors`` file (UNet config, scheduler config and provenance in its metadata);
2. a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``);
3. a diffusers pipeline directory (``unet/``, ``scheduler/``);
4. an o2m stage directory (``manifest.json`` of kind teacher, template, students or merged).
Only safetensors and JSON are read: pickle-based checkpoints are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.fsutil import (atomic_file, atomic_write_json, check_output_free, loads_bounded, read_metadata,
                           save_safetensors, sha256_file, storage_errors)
from o2mcli.outputs import atomic_dir, check_not_input, is_held, kept_name, note_input
from o2mcli.manifest import MODEL_KINDS, Manifest, ModelRecord, is_stage_dir, read_manifest, require_kind
from o2mcli.models.configs import check_scheduler_config, is_learned_variance
from o2mcli.models.codec import Codec
from o2mcli.models.conditioning import class_record, text_record
from o2mcli.models.families import DenoiserFamily, family_for_config, family_of, pipeline_format
from o2mcli.models.configs import scheduler_config as default_scheduler_config
from o2mcli.models.group import StudentGroup
from o2mcli.models.guard import Header, build_checked, check_size, tensor_header

FORMAT = "o2m-denoiser/2"
# Model file formats o2m reads, and the metadata key of each one's denoiser config (o2m-unet/1: files written before
# manifest schema 2, when every model was called a UNet).
CONFIG_KEYS = {"o2m-unet/1": "o2m.unet_config", FORMAT: "o2m.denoiser_config"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """A denoiser ready to sample: one model (a UNet, a DiT) or a K-student group, plus its scheduler config."""

    source: Path
    form: str  # o2m-file | diffusers-model | diffusers-pipeline | stage:<kind>
    denoiser: nn.Module
    scheduler_config: dict[str, Any]
    denoiser_configs: list[dict[str, Any]]
    ranges: list[tuple[int, int]]
    sha256: str
    manifest: Manifest | None = None
    notes: list[str] = field(default_factory=list)
    # What the model conditions on (``models.conditioning``: class labels or prompts, and their record); None:
    # unconditional.
    conditioning: dict[str, Any] | None = None
    # (path, what it is) for every path the model's records point to: a manifest's parents, the teacher, template
    # or theta_0 its provenance names, the pipeline its conditioning or export record names. A run never writes
    # over them (o2mcli.outputs.note_input).
    recorded: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unet(self) -> nn.Module:
        """The denoiser, by its name before manifest schema 2 (kept for scripts written against it)."""
        return self.denoiser

    @property
    def unet_configs(self) -> list[dict[str, Any]]:
        """The denoiser configs, by their name before manifest schema 2."""
        return self.denoiser_configs

    @property
    def is_group(self) -> bool:
        return isinstance(self.denoiser, StudentGroup)

    @property
    def family(self) -> DenoiserFamily:
        """The model family of the denoiser (of its students, for a group)."""
        return family_of(self.denoiser.students[0] if self.is_group else self.denoiser)

    def codec(self, pipeline: Path | None = None, device: torch.device | str = "cpu") -> Codec:
        """The codec the model owns (``DenoiserFamily.codec``): from ``pipeline`` (``--pipeline``) or the pipeline
        its conditioning names, checked against its record and its denoiser configs; the identity for pixels."""
        return self.family.codec(self.conditioning, self.source, pipeline, device,
                                 models=[(c, self.source) for c in self.denoiser_configs])

    @property
    def kind(self) -> str:
        return self.form.split(":", 1)[1] if self.form.startswith("stage:") else "model"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))


# 1. Building a UNet from a config and a state dict -------------------------------------------

def check_denoiser_config(cfg: Any, where: Path) -> None:
    """The model config's family, type, keys and sizes, before anything is built (crafted metadata is refused)."""
    family_for_config(cfg, where, served=True).check_config(cfg, where)


def check_timestep_range(rng: Any, T: int, where: Path) -> tuple[int, int]:
    """A model's timestep range: two integers with 0 <= lo < hi <= T."""
    ok = (isinstance(rng, (list, tuple)) and len(rng) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) for x in rng))
    if not ok or not 0 <= rng[0] < rng[1] <= T:
        raise O2MError(f"{where}: timestep range {rng!r} is empty, inverted or outside [0, {T}]")
    return int(rng[0]), int(rng[1])


def read_model_config(path: Path, what: str = "model config") -> dict[str, Any]:
    """A diffusers model config JSON file (``--model-config``, ``--student-config``), its family's checks passed."""
    path = Path(path)
    try:
        found = loads_bounded(path.read_bytes(), str(path))
    except FileNotFoundError as e:
        raise O2MError(f"{path}: no such {what} file") from e
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e
    if not isinstance(found, dict):
        raise O2MError(f"{path}: the {what} is a JSON {type(found).__name__}, expected an object (a diffusers config)")
    family_for_config(found, path, served=True).check_config(found, path)
    return found


def build_denoiser(cfg: dict[str, Any], state: dict[str, torch.Tensor] | None, where: Path) -> nn.Module:
    """The model a config describes (its family by ``_class_name``); weights, if given, must match exactly. A fresh
    model (no weights: ``--model-config``, ``--student-config``) is sized on the meta device first, so a config
    implying more than ``guard.MAX_MODEL_BYTES`` is refused before anything is allocated."""
    family = family_for_config(cfg, where, served=True)
    if state is None:
        with torch.device("meta"):
            check_size(family.build(cfg, None, where), where)
    return family.build(cfg, state, where)


def load_denoiser(cfg: dict[str, Any], weights: Path, where: Path, header: Header | None = None) -> nn.Module:
    """The model ``cfg`` describes with the weights of the safetensors file ``weights``: the config is built on the
    meta device and checked against the file's header (dtypes, bytes, names and shapes) before anything real is
    allocated or any tensor read (``models.guard``); then built for real, weights matching exactly."""
    family = family_for_config(cfg, where, served=True)
    return build_checked(lambda state: family.build(cfg, state, where), weights, where, header)


def _read_safetensors(path: Path) -> tuple[Header, dict[str, str]]:
    """A model file's tensor header (dtypes and shapes, floating point only) and metadata; no tensor is read."""
    if not path.is_file():
        raise O2MError(f"{path}: no such model file")
    meta = read_metadata(path)
    return tensor_header(path), meta


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return loads_bounded(path.read_bytes(), str(path))
    except FileNotFoundError as e:
        raise O2MError(f"{path}: missing") from e
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e


def _meta_json(meta: dict[str, str], key: str, where: Path) -> Any:
    if key not in meta:
        raise O2MError(f"{where}: o2m metadata lacks {key!r}")
    return loads_bounded(meta[key], f"{where}: o2m metadata {key!r}")


# 2. The four input forms ------------------------------------------------------------------------

def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load any accepted model input onto ``device`` (eval mode)."""
    path = Path(path)
    if not path.exists():
        raise O2MError(f"{path}: no such model file or directory")
    if path.is_file():
        loaded = _load_file(path)
    elif is_stage_dir(path):
        loaded = _load_stage(path)
    elif (path / "unet").is_dir() or (path / "model_index.json").is_file():
        fmt = pipeline_format(path)
        if fmt is not None:  # a latent pipeline's format: every part there, safetensors only, the parts fitting
            fmt.check_layout(path)
        loaded = _load_diffusers_dir(path / "unet", path, form="diffusers-pipeline",
                                     sched_json=path / "scheduler" / "scheduler_config.json")
        if fmt is not None:
            loaded.conditioning = fmt.conditioning(path)
            marker = path / "o2m_export.json"
            if marker.is_file():  # an o2m export: the caption dropout its students were distilled with
                rec = _read_json(marker)
                found = rec.get("conditioning") if isinstance(rec, dict) else None
                drop = text_record(found, marker)["caption_dropout"]
                loaded.conditioning["caption_dropout"] = drop
    elif (path / "config.json").is_file():
        loaded = _load_diffusers_dir(path, path, form="diffusers-model",
                                     sched_json=path / "scheduler_config.json")
    else:
        raise O2MError(f"{path}: not a model (expected an o2m .safetensors file, a diffusers model or pipeline "
                       "directory, or an o2m stage directory)")
    note_input(path, "a model this run reads")
    if loaded.conditioning is not None and loaded.conditioning.get("pipeline"):
        loaded.recorded.append((loaded.conditioning["pipeline"], "the pipeline its conditioning names"))
    for where, what in loaded.recorded:
        note_input(where, f"{what}, recorded by {path}")
    loaded.denoiser.to(device)
    return loaded


# What a model's records point to ---------------------------------------------------------------------------------

# Provenance keys that name a file or directory the model came from (o2m's stages write them; see each stage).
_PATH_KEYS = {"teacher": "its teacher", "template": "its template", "theta_0": "its merge's theta_0",
              "student_config": "its student config", "source": "the model it was exported from",
              "parts_from": "the pipeline its parts came from"}


def recorded_paths(record: Any) -> list[tuple[str, str]]:
    """(path, what it is) for every absolute path an o2m provenance or export record names (o2m records resolved
    paths): the keys of ``_PATH_KEYS``, each merged student's ``path``, the training data's ``source`` and the
    conditioning's ``pipeline``. Anything else in the record (or a record that is not a map) names nothing."""
    if not isinstance(record, dict):
        return []
    found = [(record.get(k), what) for k, what in _PATH_KEYS.items()]
    students = record.get("students")
    found += [(st.get("path"), "a student it was merged from")
              for st in (students if isinstance(students, list) else []) if isinstance(st, dict)]
    for key, sub, what in (("data", "source", "the data it was trained on"),
                           ("conditioning", "pipeline", "the pipeline its conditioning names")):
        if isinstance(record.get(key), dict):
            found.append((record[key].get(sub), what))
    return [(p, what) for p, what in found if isinstance(p, str) and os.path.isabs(p)]


def provenance_of(meta: dict[str, str], where: Path) -> dict[str, Any]:
    """An o2m file's ``o2m.provenance`` record, parsed with bounded size and depth ({} when absent; a record that
    is not a JSON object is refused)."""
    if "o2m.provenance" not in meta:
        return {}
    found = loads_bounded(meta["o2m.provenance"], f"{where}: o2m metadata 'o2m.provenance'")
    if not isinstance(found, dict):
        raise O2MError(f"{where}: o2m metadata 'o2m.provenance' is a JSON {type(found).__name__}, expected an object")
    return found


def _load_file(path: Path) -> LoadedModel:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise O2MError(f"{path}: pickle-based checkpoints are not loaded (unsafe); convert it to safetensors")
    if path.suffix.lower() != ".safetensors":
        raise O2MError(f"{path}: not a model file (expected .safetensors)")
    header, meta = _read_safetensors(path)
    if meta.get("format") not in CONFIG_KEYS:
        if (path.parent / "config.json").is_file():
            return _load_diffusers_dir(path.parent, path.parent, "diffusers-model",
                                       path.parent / "scheduler_config.json", weights=path)
        raise O2MError(f"{path}: bare safetensors without o2m metadata; pass the diffusers directory "
                       "that holds it with its config.json")
    cfg = _meta_json(meta, CONFIG_KEYS[meta["format"]], path)
    sched = _meta_json(meta, "o2m.scheduler_config", path)
    T = check_scheduler_config(sched, path)
    rng = check_timestep_range(_meta_json(meta, "o2m.timestep_range", path), T, path)
    recorded = recorded_paths(provenance_of(meta, path))
    unet = load_denoiser(cfg, path, path, header)
    return LoadedModel(source=path, form="o2m-file", denoiser=unet, scheduler_config=sched, denoiser_configs=[cfg],
                       ranges=[rng], sha256=sha256_file(path), conditioning=conditioning_of(cfg, meta, path),
                       recorded=recorded)


def _load_diffusers_dir(model_dir: Path, root: Path, form: str, sched_json: Path,
                        weights: Path | None = None) -> LoadedModel:
    weights = weights or model_dir / WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in model_dir.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise O2MError(f"{model_dir}: only {pickled[0]} (pickle) found; o2m loads safetensors weights only")
        raise O2MError(f"{weights}: missing model weights")
    cfg = _read_json(model_dir / "config.json")
    check_denoiser_config(cfg, model_dir / "config.json")
    header, _ = _read_safetensors(weights)
    unet = load_denoiser(cfg, weights, weights, header)
    notes = []
    if sched_json.is_file():
        sched = _read_json(sched_json)
        check_scheduler_config(sched, sched_json)
    else:
        sched = default_scheduler_config("learned" if is_learned_variance(cfg) else "fixed")
        notes.append(f"no scheduler config beside {model_dir}; using DDPM linear betas, T=1000")
    T = int(sched.get("num_train_timesteps", 1000))
    meta = {}
    marker = root / "o2m_export.json"
    rec = _read_json(marker) if marker.is_file() else None
    # o2m's export keeps the class names (or, for a DiT, that it is unconditional) beside diffusers' files
    if family_for_config(cfg, weights).class_table(cfg) is not None and rec is not None:
        found = rec.get("conditioning") if isinstance(rec, dict) else None
        meta = {"o2m.provenance": json.dumps({"conditioning": found})}
    return LoadedModel(source=root, form=form, denoiser=unet, scheduler_config=sched, denoiser_configs=[cfg],
                       ranges=[(0, T)], sha256=sha256_file(weights), notes=notes,
                       conditioning=conditioning_of(cfg, meta, weights), recorded=recorded_paths(rec))


def _load_stage(path: Path) -> LoadedModel:
    man = read_manifest(path, verify=True)
    require_kind(man, path, MODEL_KINDS)
    if man.scheduler_config is None:
        raise O2MError(f"{path}: model manifest has no scheduler_config")
    T = check_scheduler_config(man.scheduler_config, path / "manifest.json")
    units, ranges, metas = [], [], []
    recorded = [(p.path, f"the {p.kind} its manifest names as parent") for p in man.parents]
    for rec in man.models:
        check_timestep_range(list(rec.timestep_range), T, path / rec.artifact)
        check_denoiser_config(rec.denoiser_config, path / rec.artifact)
        header, meta = _read_safetensors(path / rec.artifact)
        metas.append(meta)
        recorded += recorded_paths(provenance_of(meta, path / rec.artifact))
        units.append(load_denoiser(rec.denoiser_config, path / rec.artifact, path / rec.artifact, header))
        ranges.append(tuple(rec.timestep_range))
    if man.scheduler_config is None:
        raise O2MError(f"{path}: model manifest has no scheduler_config")
    unet = units[0] if len(units) == 1 else StudentGroup(units, ranges)
    return LoadedModel(source=path, form=f"stage:{man.kind}", denoiser=unet, scheduler_config=man.scheduler_config,
                       denoiser_configs=[r.denoiser_config for r in man.models], ranges=ranges,
                       sha256=sha256_file(path / "manifest.json"), manifest=man,
                       conditioning=conditioning_of(man.models[0].denoiser_config, metas[0], path / man.models[0].artifact),
                       recorded=recorded)


def conditioning_of(cfg: dict[str, Any], meta: dict[str, str], where: Path) -> dict[str, Any] | None:
    """What a class-conditional model conditions on: its classes, null class and training label dropout (from
    o2m's provenance), or for another model the class indices with the null class its config fixes (DiT's
    ``num_embeds_ada_norm``; None for a UNet2DModel); None if unconditional.

    A model whose config fixes its null class (a DiT) may also be used unconditionally: every sample gets the
    null class. o2m records that as a provenance (or export record) without a conditioning (``"conditioning"``
    absent or null); such a model is unconditional here, so ``o2m sample`` takes no ``--class`` for it. A model
    without any o2m record is foreign: its label table is taken at its word, classes "0".."K-1".
    """
    family = family_for_config(cfg, where)
    prov = provenance_of(meta, where)
    found = prov.get("conditioning")
    if family.condition is not None and family.condition.prompts:
        return text_record(found, where)
    table = family.class_table(cfg)
    if table is None:
        return None
    n, fixed_null = table
    if isinstance(found, dict) and isinstance(found.get("classes"), list) and found.get("null_class") is not None:
        classes, null = [str(c) for c in found["classes"]], found["null_class"]
        fits = null < n if fixed_null is None else null == fixed_null
        if not (isinstance(null, int) and not isinstance(null, bool) and null == len(classes) and fits):
            raise O2MError(f"{where}: conditioning metadata names {len(classes)} classes and null class {null!r} "
                           f"for {n} class embeddings")
        # Models trained before the dropout was recorded here carry it in their training config.
        dropout = found.get("label_dropout", (prov.get("config") or {}).get("label_dropout")
                            if isinstance(prov.get("config"), dict) else None)
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout <= 1):
            dropout = None
        return class_record(classes, null, dropout)
    # o2m's own record (a stage's provenance, or an export's conditioning, even null) without classes: a model
    # that can run on its null class alone was trained or distilled unconditionally.
    recorded = "stage" in prov or "conditioning" in prov
    if fixed_null is not None and recorded and found is None:
        return None
    return class_record([str(i) for i in range(int(n))], fixed_null, None)


# 3. Writing ---------------------------------------------------------------------------------------

def denoiser_config_of(unet: nn.Module) -> dict[str, Any]:
    """The diffusers config of a UNet as a plain JSON-able dict."""
    cfg = dict(unet.config)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    out["_class_name"] = type(unet).__name__
    return out


def save_model_file(path: Path, unet: nn.Module, scheduler_config: dict[str, Any], *, kind: str,
                    timestep_range: tuple[int, int] | None = None, provenance: dict[str, Any] | None = None,
                    force: bool = False) -> Path:
    """Write one self-describing safetensors model atomically (refuses to overwrite without ``force``). An output this
    run reserved that something else created meanwhile is not replaced: the weights are kept beside it, and said."""
    path = Path(path)
    check_not_input(path)  # nothing this run read is ever replaced (o2mcli.outputs.note_input)
    try:
        check_output_free(path, force)
    except O2MError as e:
        if not is_held(path):
            raise
        kept = kept_name(path)
        save_model_file(kept, unet, scheduler_config, kind=kind, timestep_range=timestep_range,
                        provenance=provenance)
        raise O2MError(f"{e} (it appeared while this run worked; the finished output is kept as {kept})") from e
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    meta = {
        "format": FORMAT,
        "o2m.kind": kind,
        CONFIG_KEYS[FORMAT]: json.dumps(denoiser_config_of(unet), sort_keys=True),
        "o2m.scheduler_config": json.dumps({k: v for k, v in scheduler_config.items()
                                            if not k.startswith("_") or k == "_class_name"}, sort_keys=True),
        "o2m.timestep_range": json.dumps(list(timestep_range or (0, T))),
        "o2m.provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    with atomic_file(path) as tmp:
        save_safetensors(state, tmp, metadata=meta)
    return path


def model_record(name: str, rel: str, unet: nn.Module, timestep_range: tuple[int, int]) -> ModelRecord:
    """The manifest entry of one saved UNet: config, size, MACs and its timestep range."""
    from o2mcli.models.stats import count_macs, count_params

    return ModelRecord(name=name, artifact=rel, denoiser_config=denoiser_config_of(unet), params=count_params(unet),
                       macs=count_macs(unet), timestep_range=tuple(timestep_range))


def export_pipeline(loaded: LoadedModel, out_dir: Path, force: bool = False, pipeline: Path | None = None) -> Path:
    """Write the model family's diffusers directory that plain diffusers loads offline: ``DDPMPipeline``
    for a UNet2DModel, ``StableDiffusionPipeline`` for a UNet2DConditionModel (VAE, text encoder and tokenizer from
    its teacher's pipeline, or ``pipeline``, checked by sha256), a model directory with its scheduler config for a
    DiTTransformer2DModel (diffusers has no pixel-space DiT pipeline); the family's pipeline()/save_pipeline()."""
    import diffusers

    if loaded.is_group:
        raise O2MError(f"{loaded.source}: a group of {len(loaded.ranges)} students has no single-UNet diffusers "
                       "form; merge it first (o2m merge) or export one student file")
    out_dir = Path(out_dir)
    for where, what in [(loaded.source, "the model this export reads"), *loaded.recorded]:
        note_input(where, what)
    check_output_free(out_dir, force, inputs=[pipeline])
    check_not_input(out_dir)
    unet = loaded.denoiser.to("cpu")
    family = family_of(unet)
    parts = family.codec(loaded.conditioning, loaded.source, pipeline)
    # The scheduler keeps the class the model's (or else its teacher pipeline's) config names, where diffusers has
    # it and it samples this model: only DDPM draws from a learned variance. Otherwise DDPM, as before.
    config = {k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")}
    names = [loaded.scheduler_config.get("_class_name"), (getattr(parts, "scheduler_config", None) or {}).get(
        "_class_name")]
    kept = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    name = next((n for n in names if n in kept), "DDPMScheduler")
    if str(config.get("variance_type", "")).startswith("learned"):
        name = "DDPMScheduler"
    scheduler = getattr(diffusers, name).from_config(config)
    pipe = family.pipeline(unet, scheduler, parts)
    with atomic_dir(out_dir, force=force) as tmp:
        with storage_errors(out_dir):  # a full disk inside diffusers' save_pretrained: the usual one-line refusal
            family.save_pipeline(pipe, tmp, parts)
        # Marks the pipeline as o2m's, so `o2m export --force` may replace it (and nothing else).
        record = {"format": "o2m-export/1", "source": str(loaded.source), "sha256": loaded.sha256}
        if loaded.conditioning is not None:
            # diffusers' DDPMPipeline passes no class labels; the UNet takes them (`class_labels=`), the last
            # embedding being the null class. The class names stay here, and o2m reads them back (a DiT exported
            # without them is unconditional: o2m then always gives it the null class). A text model's
            # record names the teacher pipeline its parts came from (and their hashes) and its caption dropout.
            record["conditioning"] = loaded.conditioning
        if parts.root is not None:
            record["parts_from"] = str(Path(parts.root).resolve())
        atomic_write_json(tmp / "o2m_export.json", record)
    return out_dir


# The names before manifest schema 2 (every model was called a UNet), kept for scripts written against them.
unet_config_of = denoiser_config_of
load_unet = load_denoiser
build_unet = build_denoiser
