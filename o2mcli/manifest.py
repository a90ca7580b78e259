"""Typed manifest directories: every stage's output is a directory with a ``manifest.json``.

A manifest records what was made (artifacts with sha256 and size), from what (parent
manifests or model files, with their sha256), how (the stage's full resolved config and
the library versions) and, for models, their diffusers config, size, MACs and the
timestep range each serves. Artifact paths never leave the directory.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from o2mcli import __version__
from o2mcli.errors import O2MError
from o2mcli.fsutil import atomic_write_json, contained, loads_bounded, sha256_file

SCHEMA_VERSION = 2
# Schema 1: the manifests o2m wrote before the denoiser rename (``unet_config`` per model); still read.
READ_VERSIONS = (1, SCHEMA_VERSION)
MANIFEST_NAME = "manifest.json"
Kind = Literal["teacher", "template", "students", "merged", "samples", "scores"]
MODEL_KINDS: tuple[str, ...] = ("teacher", "template", "students", "merged")


def _check_rel(path: str) -> str:
    if any(ord(ch) < 32 for ch in path):
        raise ValueError(f"artifact path contains a control character: {path!r}")
    p = Path(path)
    if not path or p.is_absolute() or path.startswith(("/", "\\")) or ".." in p.parts or "\\" in path:
        raise ValueError(f"artifact path must be relative and inside the directory, got {path!r}")
    return path


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Artifact(_Frozen):
    """One file of a stage directory."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    _rel = field_validator("path")(classmethod(lambda cls, v: _check_rel(v)))


class ParentRef(_Frozen):
    """Provenance link to the input of a stage: a stage dir's manifest or a model file."""

    kind: str
    path: str  # absolute path at the time the stage ran
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelRecord(_Frozen):
    """One denoiser (a UNet, a DiT) in the directory."""

    name: str
    artifact: str
    # schema 1 called it ``unet_config``
    denoiser_config: dict[str, Any] = Field(validation_alias=AliasChoices("denoiser_config", "unet_config"))
    params: int = Field(ge=0)
    macs: int = Field(ge=0)
    timestep_range: tuple[int, int]

    _rel = field_validator("artifact")(classmethod(lambda cls, v: _check_rel(v)))

    @field_validator("timestep_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (0 <= v[0] < v[1]):
            raise ValueError(f"timestep_range must satisfy 0 <= lo < hi, got {v}")
        return v


class Manifest(_Frozen):
    """The typed ``manifest.json`` of a stage directory."""

    schema_version: int = SCHEMA_VERSION
    kind: Kind
    created_at: str
    versions: dict[str, str]
    config: dict[str, Any]
    parents: list[ParentRef] = []
    artifacts: list[Artifact] = []
    models: list[ModelRecord] = []
    scheduler_config: Optional[dict[str, Any]] = None
    summary: dict[str, Any] = {}

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v not in READ_VERSIONS:
            raise ValueError(f"unsupported schema_version {v} (this o2m reads {', '.join(map(str, READ_VERSIONS))})")
        return v

    @model_validator(mode="after")
    def _models_are_artifacts(self) -> "Manifest":
        names = {a.path for a in self.artifacts}
        for m in self.models:
            if m.artifact not in names:
                raise ValueError(f"model {m.name!r} names {m.artifact!r}, which is not a listed artifact")
        if self.kind in MODEL_KINDS and not self.models:
            raise ValueError(f"a {self.kind!r} manifest must list at least one model")
        return self

    def artifact(self, path: str) -> Artifact:
        for a in self.artifacts:
            if a.path == path:
                return a
        raise KeyError(path)


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result."""
    import diffusers
    import torch

    return {
        "o2m": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_stage_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def manifest_path(directory: Path) -> Path:
    """``directory/manifest.json``, refusing one that is a symlink resolving outside ``directory``.

    The manifest vouches for every file of the directory, so it must belong to the directory as its artifacts do
    (the rule of ``fsutil.contained``): a link to a manifest elsewhere would make this directory pass for another
    one (its kind, its parents, its hashes). A link that stays inside the directory changes nothing and is read.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST_NAME
    if mpath.is_symlink():
        try:
            root = directory.resolve()
            target = mpath.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise O2MError(f"{mpath}: manifest is a symlink that cannot be resolved ({e}); refused") from e
        if target != root and root not in target.parents:
            raise O2MError(f"{mpath}: manifest is a symlink to {target}, outside its directory; refused")
    return mpath


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """Read and validate ``directory/manifest.json``; with ``verify``, check every artifact's size and hash."""
    directory = Path(directory)
    mpath = manifest_path(directory)
    if not mpath.is_file():
        raise O2MError(f"{directory}: not an o2m stage directory (no {MANIFEST_NAME})")
    try:
        raw = loads_bounded(mpath.read_bytes(), f"{mpath}", noun="manifest")
    except OSError as e:
        raise O2MError(f"{mpath}: unreadable manifest ({e.strerror or e})") from e
    try:
        man = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "manifest"
        raise O2MError(f"{mpath}: invalid manifest: {loc}: {first['msg']}") from e
    if verify:
        verify_artifacts(directory, man)
    return man


def verify_artifacts(directory: Path, man: Manifest) -> None:
    """Every artifact inside the directory, present, and with the recorded size and sha256."""
    for a in man.artifacts:
        target = contained(directory, a.path)
        if not target.is_file():
            raise O2MError(f"{directory / a.path}: artifact listed in the manifest is missing")
        size = target.stat().st_size
        if size != a.size:
            raise O2MError(f"{directory / a.path}: size {size} does not match the manifest ({a.size}); truncated or replaced")
        if sha256_file(target) != a.sha256:
            raise O2MError(f"{directory / a.path}: sha256 does not match the manifest; the file was modified")


def require_kind(man: Manifest, where: Path, kinds: tuple[str, ...]) -> None:
    """Refuse a parent of the wrong kind, with a one-line reason."""
    if man.kind not in kinds:
        raise O2MError(f"{where}: manifest kind is {man.kind!r}, expected {' or '.join(map(repr, kinds))}")


def artifact_record(directory: Path, rel: str) -> Artifact:
    """Hash a file already written inside ``directory``."""
    target = contained(directory, rel)
    return Artifact(path=rel, sha256=sha256_file(target), size=target.stat().st_size)


def parent_ref(path: Path) -> ParentRef:
    """A provenance link to a stage directory (its manifest's hash) or a model file/dir."""
    path = Path(path).resolve()
    if is_stage_dir(path):
        man = read_manifest(path, verify=False)
        return ParentRef(kind=man.kind, path=str(path), sha256=sha256_file(path / MANIFEST_NAME))
    if path.is_file():
        return ParentRef(kind="model-file", path=str(path), sha256=sha256_file(path))
    for name in ("diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        if (path / name).is_file():
            return ParentRef(kind="diffusers-dir", path=str(path), sha256=sha256_file(path / name))
    raise O2MError(f"{path}: cannot record as a parent (not a stage dir, model file or diffusers dir)")


def write_manifest(directory: Path, kind: str, config: dict[str, Any], *, parents: list[ParentRef] = (),
                   models: list[ModelRecord] = (), scheduler_config: dict | None = None,
                   summary: dict | None = None, artifacts: list[str] | None = None) -> Manifest:
    """Hash the directory's files (all regular files by default) and write its manifest atomically."""
    directory = Path(directory)
    if artifacts is None:
        artifacts = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                           if p.is_file() and p.name != MANIFEST_NAME and ".tmp-o2m" not in p.name)
    man = Manifest(kind=kind, created_at=now(), versions=versions(), config=config, parents=list(parents),
                   artifacts=[artifact_record(directory, a) for a in artifacts], models=list(models),
                   scheduler_config=scheduler_config, summary=summary or {})
    atomic_write_json(directory / MANIFEST_NAME, man.model_dump(mode="json"))
    return man


def newest_stage_dir(root: Path, kinds: tuple[str, ...]) -> Path | None:
    """The most recently written stage directory of one of ``kinds`` directly under ``root``."""
    found = [(mtime, path) for mtime, path, kind in list_stage_dirs(root) if kind in kinds]
    return max(found)[1] if found else None


def list_stage_dirs(root: Path) -> list[tuple[float, Path, str]]:
    """(manifest mtime, directory, kind) for every readable stage directory directly under ``root``.

    A directory whose manifest is unreadable, invalid or a symlink leaving the directory is not a candidate."""
    out = []
    for child in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if child.name.startswith(".") or not is_stage_dir(child):
            continue
        try:
            man = read_manifest(child, verify=False)
        except O2MError:
            continue
        out.append(((child / MANIFEST_NAME).stat().st_mtime, child, man.kind))
    return out
