"""KD losses, one module each, behind a registry (``--kd``)."""

from __future__ import annotations

import torch

from o2mcli.distill.losses.at import AttentionTransfer
from o2mcli.distill.losses.base import KDLoss, Outputs
from o2mcli.distill.losses.crd import ContrastiveRD
from o2mcli.distill.losses.feat import FeatureKD
from o2mcli.distill.losses.none import NoKD
from o2mcli.distill.losses.output import OutputKD
from o2mcli.distill.losses.sp import SimilarityPreserving
from o2mcli.registry import Registry

KD_LOSSES: Registry[type[KDLoss]] = Registry("--kd", "KD method")
for _cls in (OutputKD, AttentionTransfer, SimilarityPreserving, ContrastiveRD, FeatureKD, NoKD):
    KD_LOSSES.register(_cls.name, _cls)

__all__ = ["KD_LOSSES", "KDLoss", "Outputs", "kd_class", "build_kd_loss"]


def kd_class(name: str) -> type[KDLoss]:
    """The KD loss registered as ``name``."""
    return KD_LOSSES.resolve(name)


def build_kd_loss(name: str, student_channels: dict[str, int], teacher_channels: dict[str, int],
                  generator: torch.Generator) -> KDLoss:
    """An instance of the ``name`` loss for one student."""
    return kd_class(name)(student_channels, teacher_channels, generator)
