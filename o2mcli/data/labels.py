"""Class labels in a distillation run: which classes the teacher knows, its null class, the label dropout.

A class-conditional teacher is distilled with labels on every batch: O2MKD takes them from the data,
DKDM gives each buffer slot its own. A label is replaced by the null class with the teacher's own training
dropout (unless ``--label-dropout`` says otherwise), so the students learn the unconditional branch too and
classifier-free guidance works on them (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from o2mcli.errors import O2MError, OptionError
from o2mcli.models.condition import Condition, tokens_condition
from o2mcli.models.conditioning import TEXT, class_record, takes_prompts

DEFAULT_DROPOUT = 0.1  # o2m train's default, for teachers that did not record theirs


@dataclass(frozen=True)
class LabelPlan:
    """The classes a run's batches carry (indices ``0..len(classes)-1``), the null class, the dropout."""

    classes: tuple[str, ...]
    null_class: Optional[int]
    dropout: float

    @property
    def n(self) -> int:
        return len(self.classes)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` labels uniform over the classes, each dropped to the null class with the plan's probability."""
        labels = torch.randint(0, self.n, (n,), generator=generator)
        if self.dropout > 0:
            labels[torch.rand(n, generator=generator) < self.dropout] = self.null_class
        return labels

    def cond(self, idx: torch.Tensor) -> Condition:
        """What the model is called with for label indices ``idx``: the labels themselves."""
        return Condition(labels=idx)

    def record(self) -> dict[str, Any]:
        """The ``conditioning`` provenance the students carry (what sample and score read)."""
        return class_record(list(self.classes), self.null_class, self.dropout)


@dataclass(frozen=True)
class TextPlan(LabelPlan):
    """Text conditions as labels: index ``i < n`` is prompt (or caption) ``i``, index ``n`` the empty prompt (the
    null condition, what caption dropout gives); ``table[idx]`` gives their packed embeddings (the codec's rows,
    ``Codec.pack``), which ``unpack`` turns into the models' Condition: a tensor (n + 1, ...) computed once, or, when
    that would exceed the text-memory budget, a ``data.text.ChunkedTable`` that makes fixed chunks of rows on demand
    (the same values whatever the order rows are asked in)."""

    table: Any = None
    source: Optional[dict[str, Any]] = None  # the pipeline record: path and the VAE/text encoder/tokenizer sha256
    unpack: Callable[[torch.Tensor], Condition] = tokens_condition
    ids: Optional[torch.Tensor] = None  # (n + 1, K) added ids per row (SDXL: each image's size and crop), or None

    def cond(self, idx: torch.Tensor) -> Condition:
        """The text condition (tokens, and where the family takes them pooled text and ids) for indices ``idx``, on
        ``idx``'s device."""
        cond = self.unpack(self.table[idx.cpu()])
        if self.ids is not None:
            cond = replace(cond, ids=self.ids[idx.cpu()])
        return cond.to(idx.device)

    def record(self) -> dict[str, Any]:
        return {**(self.source or {}), "type": TEXT.name, "caption_dropout": self.dropout}


def text_plan(texts: list[str], embeddings: torch.Tensor, null_embedding: torch.Tensor, dropout: float,
              source: dict[str, Any], unpack: Callable[[torch.Tensor], Condition] = tokens_condition) -> TextPlan:
    """A plan over ``texts`` with their embeddings (N, L, D) and the empty prompt's (1, L, D) as the null condition."""
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
    table = torch.cat([embeddings.float(), null_embedding.float().reshape(1, *embeddings.shape[1:])]).contiguous()
    return text_plan_over(texts, table, dropout, source, unpack)


def text_plan_over(texts: list[str], table: Any, dropout: float, source: dict[str, Any],
                   unpack: Callable[[torch.Tensor], Condition] = tokens_condition,
                   ids: Optional[torch.Tensor] = None) -> TextPlan:
    """A plan over ``texts`` whose ``table`` (n + 1 rows, the null condition last) is already made."""
    if len(table) != len(texts) + 1:
        raise ValueError(f"{len(texts)} texts and the null condition, but a table of {len(table)} rows")
    source = {k: v for k, v in source.items() if k in ("pipeline", "hashes")}
    if ids is not None and len(ids) != len(table):
        raise ValueError(f"{len(table)} condition rows but {len(ids)} rows of ids")
    return TextPlan(tuple(texts), len(texts), float(dropout), table=table, source=source, unpack=unpack, ids=ids)


def label_plan(conditioning: Optional[dict[str, Any]], dropout: Optional[float], teacher_path: Path
               ) -> Optional[LabelPlan]:
    """The plan for a teacher's ``conditioning`` (None: unconditional) and ``--label-dropout`` (None: the teacher's)."""
    if takes_prompts(conditioning):
        return None  # a text plan needs the prompts or captions: made when they are read (data/text.py)
    if conditioning is None:
        if dropout is not None:
            raise OptionError("label_dropout", dropout, f"the teacher {teacher_path} is not class-conditional")
        return None
    null = conditioning.get("null_class")
    if null is None:
        # A class-conditional model o2m did not train: no known null class, so no unconditional branch to learn.
        if dropout:
            raise OptionError("label_dropout", dropout, f"the teacher {teacher_path} has no null class recorded "
                              "(it was not trained by o2m with label dropout); use --label-dropout 0")
        return LabelPlan(tuple(conditioning["classes"]), None, 0.0)
    if dropout is None:
        dropout = conditioning.get("label_dropout")
        dropout = DEFAULT_DROPOUT if dropout is None else float(dropout)
    return LabelPlan(tuple(conditioning["classes"]), int(null), float(dropout))


def check_data_classes(plan: LabelPlan, data: Any, teacher_path: Path) -> torch.Tensor:
    """The data's labels, refused unless the data name the teacher's classes in the teacher's order."""
    if data.labels is None:
        raise O2MError(f"--data {data.source}: the images have no class labels, but the teacher {teacher_path} is "
                       f"class-conditional ({plan.n} classes); use the digits or a folder with one subfolder per class")
    if tuple(data.classes) != tuple(plan.classes):
        raise O2MError(f"--data {data.source}: classes {', '.join(data.classes)} differ from the teacher's "
                       f"({', '.join(plan.classes)}; {teacher_path})")
    return data.labels
