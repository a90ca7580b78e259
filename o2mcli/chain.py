"""Chaining defaults: run the stages in order in one directory and each finds its input.

``sample`` takes the newest model (stage directory of kind teacher/template/students/merged,
or an o2m ``.safetensors`` file) in the working directory; ``score`` the newest samples.
The built-in names ``digits-teacher``, ``digits-cond-teacher`` (class-conditional) and ``digits-dit-teacher`` (a
class-conditional DiT) are the teachers shipped in the package.
"""

from __future__ import annotations

from pathlib import Path

from o2mcli.errors import O2MError
from o2mcli.fsutil import read_metadata
from o2mcli.manifest import MODEL_KINDS, list_stage_dirs

ASSETS = Path(__file__).with_name("assets")
BUILTIN_MODELS = {"digits-teacher": ASSETS / "digits_teacher.safetensors",
                  "digits-cond-teacher": ASSETS / "digits_cond_teacher.safetensors",  # class-conditional
                  "digits-dit-teacher": ASSETS / "digits_dit_teacher.safetensors"}  # class-conditional DiT


def resolve_model_spec(spec: str | Path) -> Path:
    """A path as given, or a built-in model name."""
    s = str(spec)
    if s in BUILTIN_MODELS and not Path(s).exists():
        path = BUILTIN_MODELS[s]
        if not path.is_file():
            raise O2MError(f"{path}: the built-in {s} is missing from this install")
        return path
    return Path(spec)


def _o2m_file_kind(path: Path) -> str | None:
    try:
        meta = read_metadata(path)
    except O2MError:  # anything unreadable is simply not a candidate
        return None
    # o2m-denoiser/2, or o2m-unet/1 (files written before manifest schema 2)
    return meta.get("o2m.kind", "model") if meta.get("format", "").startswith(("o2m-denoiser/", "o2m-unet/")) \
        else None


def find_newest_model(root: Path = Path("."), kinds: tuple[str, ...] = MODEL_KINDS) -> Path:
    """The most recently written model of ``kinds`` in ``root`` (stage directories and o2m .safetensors files)."""
    found = [(mtime, path) for mtime, path, kind in list_stage_dirs(root) if kind in kinds]
    found += [(p.stat().st_mtime, p) for p in Path(root).glob("*.safetensors")
              if not p.name.startswith(".") and _o2m_file_kind(p) in kinds]
    if not found:
        what = "model" if kinds == MODEL_KINDS else " or ".join(kinds)
        raise O2MError(f"{Path(root).resolve()}: no {what} found here; name one (a model file or directory, "
                       "or digits-teacher for the shipped teacher)")
    return max(found)[1]


def find_newest_samples(root: Path = Path(".")) -> Path:
    """The most recently written ``samples`` stage directory in ``root``."""
    found = [(mtime, path) for mtime, path, kind in list_stage_dirs(root) if kind == "samples"]
    if not found:
        raise O2MError(f"{Path(root).resolve()}: no samples directory found here; run o2m sample first or name one")
    return max(found)[1]
