"""``UNet2DModel`` channel pruning: uniform widths (``pruning/widths.py``) and torch-pruning surgery with the
fix-ups diffusers needs (``pruning/surgery.py``), rebuilt and checked with plain diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.models.io import build_denoiser
from o2mcli.models.stats import count_block_params
from o2mcli.pruning.pruners.base import Pruner
from o2mcli.pruning.surgery import attribute_mismatches, check_prunable, prune_uniform
from o2mcli.pruning.widths import WidthPlan, block_macs, check_same_structure, plan_for_macs, plan_widths


class UNet2DPruner(Pruner):
    """Uniform channel pruning of a DDPM ``UNet2DModel``."""

    family = "UNet2DModel"

    def check(self, cfg: dict[str, Any], where: Path) -> None:
        check_prunable(cfg, where)

    def plan(self, cfg: dict[str, Any], ratio: Optional[float], target_macs: Optional[float],
             round_to: Optional[int]) -> WidthPlan:
        if target_macs is not None:
            plan = plan_for_macs(cfg, target_macs, round_to)
        else:
            plan = plan_widths(cfg, 0.3 if ratio is None else ratio, round_to)
        if plan.new_channels == plan.old_channels:
            raise O2MError(f"--ratio {plan.ratio}: removes no channel at --round-to {plan.round_to} (every block "
                           f"keeps {list(plan.old_channels)}); use a larger ratio")
        check_same_structure(cfg, plan)
        return plan

    def prune(self, model: nn.Module, plan: WidthPlan, importance: Callable[[Any], torch.Tensor]) -> Any:
        return prune_uniform(model, plan, importance)

    def rebuild(self, pruned: nn.Module, new_cfg: dict[str, Any], where: Path) -> nn.Module:
        """Rebuild the pruned UNet from its new config with plain diffusers and check it is the same model."""
        plain = build_denoiser(new_cfg, pruned.state_dict(), where)  # load_state_dict copies: no aliasing
        bad = attribute_mismatches(pruned, plain)
        if bad:
            raise RuntimeError(f"pruned model differs from its diffusers config: {bad[0]} ({len(bad)} differences)")
        size = new_cfg["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, new_cfg["in_channels"], *size, generator=g)
        t = torch.tensor([3, 700])
        cond = self.probe_condition(new_cfg, 2, g)
        with torch.no_grad():
            a, b = predict(pruned.eval(), x, t, cond), predict(plain, x, t, cond)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"pruned model and its diffusers rebuild disagree by {(a - b).abs().max():.3g}")
        return plain

    def probe_condition(self, cfg: dict[str, Any], n: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """The condition the rebuild check feeds both models (none: the family's default)."""
        return None

    def summary(self, teacher: nn.Module, template: nn.Module, plan: WidthPlan, outcome: Any) -> dict:
        tp_, sp = count_block_params(teacher), count_block_params(template)
        tm, sm = block_macs(teacher), block_macs(template)
        old, new = plan.old_channels, plan.new_channels
        n = len(old)
        widths = {"conv_in": (old[0], new[0]), "time_embedding": (plan.old_time_dim, plan.new_time_dim),
                  "conv_norm_out": (old[0], new[0]), "conv_out": (old[0], new[0]), "mid_block": (old[-1], new[-1]),
                  "class_embedding": (plan.old_time_dim, plan.new_time_dim)}  # added to the time embedding
        widths.update({f"down_blocks.{i}": (old[i], new[i]) for i in range(n)})
        widths.update({f"up_blocks.{i}": (old[n - 1 - i], new[n - 1 - i]) for i in range(n)})
        blocks = []
        for name in tp_:
            row = {"block": name, "channels": list(widths.get(name, (None, None))),
                   "params": [tp_[name], sp.get(name, 0)], "macs": [tm.get(name, 0), sm.get(name, 0)]}
            row["params_kept"] = round(row["params"][1] / max(row["params"][0], 1), 4)
            row["macs_kept"] = round(row["macs"][1] / max(row["macs"][0], 1), 4) if row["macs"][0] else None
            blocks.append(row)
        tparams, sparams = sum(tp_.values()), sum(sp.values())
        tmacs, smacs = sum(tm.values()), sum(sm.values())
        return {
            "teacher": {"params": tparams, "macs": tmacs, "block_out_channels": list(old)},
            "template": {"params": sparams, "macs": smacs, "block_out_channels": list(new)},
            "params_ratio": round(sparams / tparams, 4),
            "macs_ratio": round(smacs / tmacs, 4),
            "ratio": plan.ratio,
            "round_to": plan.round_to,
            "blocks": blocks,
            "attention_heads": outcome.heads,
            "groups_pruned": len(outcome.groups),
            "time_projection": (f"sinusoidal width {old[0]} -> {new[0]}: the first time-MLP layer keeps the "
                                "inputs of the nearest teacher frequencies"),
        }
