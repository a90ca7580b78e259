"""Class labels in a distillation run: which classes the teacher knows, its null class, the label dropout.

A class-conditional teacher is distilled with labels on every batch: O2MKD takes them from the data,
DKDM gives each buffer slot its own. A label is replaced by the null class with the teacher's own training
dropout (unless ``--label-dropout`` says otherwise), so the students learn the unconditional branch too and
classifier-free guidance works on them (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from o2mcli.errors import O2MError, OptionError

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

    def record(self) -> dict[str, Any]:
        """The ``conditioning`` provenance the students carry (what sample and score read)."""
        return {"type": "class", "classes": list(self.classes), "null_class": self.null_class,
                "label_dropout": self.dropout}


def label_plan(conditioning: Optional[dict[str, Any]], dropout: Optional[float], teacher_path: Path
               ) -> Optional[LabelPlan]:
    """The plan for a teacher's ``conditioning`` (None: unconditional) and ``--label-dropout`` (None: the teacher's)."""
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
