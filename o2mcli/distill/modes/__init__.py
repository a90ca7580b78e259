"""Distillation modes, one module each, behind a registry (``--mode``): O2MKD on data, DKDM without."""

from __future__ import annotations

from o2mcli.distill.modes.base import DistillMode
from o2mcli.distill.modes.dkdm import DKDM
from o2mcli.distill.modes.o2mkd import O2MKD
from o2mcli.registry import Registry

MODES: Registry[type[DistillMode]] = Registry("--mode", "distillation mode")
MODES.register(O2MKD.name, O2MKD)
MODES.register(DKDM.name, DKDM)

__all__ = ["MODES", "DistillMode", "O2MKD", "DKDM"]
