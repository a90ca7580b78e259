"""What a model conditions on, as kinds with capabilities.

A model's ``conditioning`` record (in its provenance, its stage manifest and ``LoadedModel.conditioning``) is a JSON
map whose ``type`` names its kind: ``class`` (class labels: the classes, the null class, the label dropout) or
``text`` (prompts, encoded by the codec of the pipeline the record names, with the caption dropout). None:
unconditional. This module is the one place that reads ``type``: stages, data and distillation ask a kind what it
can do (:attr:`ConditionKind.prompts`, :attr:`ConditionKind.labels`) and how to describe a record, never its name,
so a new kind (or a family with a new codec) lands here and in its family's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from o2mcli.errors import O2MError
from o2mcli.registry import Registry


@dataclass(frozen=True)
class ConditionKind:
    """One kind of condition: what it takes, and how a record of it reads in words."""

    name: str
    prompts: bool = False  # samples and distils from prompts, encoded by the model's codec
    labels: bool = False  # takes class labels (a label table in the model)

    def describe(self, record: dict[str, Any]) -> str:
        """The record in words (``o2m info``, refusals)."""
        raise NotImplementedError

    def info_line(self, record: dict[str, Any]) -> str:
        """``o2m info``'s line for the record: a label and the description."""
        raise NotImplementedError


class ClassKind(ConditionKind):
    """Class labels: ``classes`` (names, in label order), ``null_class`` (the unconditional branch's label, or None
    where unknown) and ``label_dropout``."""

    def describe(self, record: dict[str, Any]) -> str:
        return f"classes {','.join(map(str, record.get('classes', [])))}"

    def info_line(self, record: dict[str, Any]) -> str:
        classes = [str(c) for c in record.get("classes", [])]
        null = record.get("null_class")
        null = "no null class recorded" if null is None else f"null class {null}"
        drop = "" if record.get("label_dropout") is None else f", label dropout {record['label_dropout']:g}"
        return (f"classes:     {len(classes)} ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); "
                f"{null}{drop}")


class TextKind(ConditionKind):
    """Prompts: ``pipeline`` (the directory whose codec encodes them, or None where unknown), ``hashes`` (its parts'
    sha256) and ``caption_dropout``."""

    def describe(self, record: dict[str, Any]) -> str:
        return f"text through {record.get('pipeline')}, caption dropout {record.get('caption_dropout')}"

    def info_line(self, record: dict[str, Any]) -> str:
        drop = "" if record.get("caption_dropout") is None else f", caption dropout {record['caption_dropout']:g}"
        where = record.get("pipeline") or "its pipeline not recorded (sample/export with --pipeline DIR)"
        return f"text:        prompts; VAE and text encoder(s) from {where}{drop}"


CLASS = ClassKind("class", labels=True)
TEXT = TextKind("text", prompts=True)

KINDS: Registry[ConditionKind] = Registry("conditioning type", "condition kind")
for _kind in (CLASS, TEXT):
    KINDS.register(_kind.name, _kind)


def kind_of(record: Any) -> Optional[ConditionKind]:
    """The kind of a conditioning record (None: unconditional, or a record that names no known kind)."""
    if not isinstance(record, dict):
        return None
    return KINDS.get(record.get("type"))  # type: ignore[arg-type]


def takes_prompts(record: Any) -> bool:
    """Whether a model with this conditioning record samples and distils from prompts."""
    kind = kind_of(record)
    return kind is not None and kind.prompts


def takes_labels(record: Any) -> bool:
    """Whether a model with this conditioning record takes class labels."""
    kind = kind_of(record)
    return kind is not None and kind.labels


def describe(record: Any) -> str:
    """A conditioning record in words, for refusals ("unconditional" for none)."""
    kind = kind_of(record)
    return "unconditional" if kind is None else kind.describe(record)


def text_record(found: Any, where: Path) -> dict[str, Any]:
    """A prompt-conditioned model's record: its pipeline (path, and its parts' sha256) and caption dropout from
    o2m's provenance (``found``); for a model without one, no known pipeline (``--pipeline``)."""
    out: dict[str, Any] = {"type": TEXT.name, "pipeline": None, "hashes": None, "caption_dropout": None}
    if kind_of(found) is not TEXT:
        return out
    pipe, hashes, drop = found.get("pipeline"), found.get("hashes"), found.get("caption_dropout")
    if pipe is not None and not isinstance(pipe, str):
        raise O2MError(f"{where}: conditioning metadata names pipeline {pipe!r}; expected a path")
    if hashes is not None and not (isinstance(hashes, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())):
        raise O2MError(f"{where}: conditioning metadata hashes {hashes!r}; expected part -> sha256")
    if not (isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop <= 1):
        drop = None
    out.update(pipeline=pipe, hashes=hashes, caption_dropout=drop)
    return out


def pipeline_record(root: Path, hashes: dict[str, str]) -> dict[str, Any]:
    """The record of a model that takes prompts through the pipeline at ``root`` (its parts' sha256)."""
    return {"type": TEXT.name, "pipeline": str(Path(root).resolve()), "hashes": dict(hashes), "caption_dropout": None}


def class_record(classes: list[str], null_class: Optional[int], label_dropout: Optional[float]) -> dict[str, Any]:
    """The record of a class-conditional model."""
    return {"type": CLASS.name, "classes": [str(c) for c in classes], "null_class": null_class,
            "label_dropout": label_dropout}
