"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_k w_k (theta_k - theta_0)."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, Field, field_validator

from o2mcli.parsing import cli, number


class TaskArithmeticOptions(BaseModel):
    """What only task arithmetic reads (a field of MergeConfig; the average ignores it)."""

    lam: Optional[float] = Field(None, json_schema_extra=cli("--lambda", text=True),
                                 description="Task-vector scale; default 1/K (the plain average).")  # "1/4" accepted
    _parse_lam = field_validator("lam", mode="before")(classmethod(lambda cls, v: number(v)))


def task_arithmetic(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], weights: list[float],
                    lam: float) -> dict[str, torch.Tensor]:
    """Add the weighted task vectors theta_k - theta_0 of ``models`` to ``base``, scaled by ``lam``.

    Computed in float64 so that identical students merge back to themselves exactly in float32.
    """
    out = {}
    for key, b in base.items():
        if not b.dtype.is_floating_point:
            out[key] = models[0][key].clone()
            continue
        b64 = b.double()
        delta = sum(w * (m[key].double() - b64) for w, m in zip(weights, models))
        out[key] = (b64 + lam * delta).to(b.dtype)
    return out


task_arithmetic.options = TaskArithmeticOptions  # type: ignore[attr-defined]  # its options, registered with it
