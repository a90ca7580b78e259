"""``DiTTransformer2DModel`` pruning (issue #14): whole attention heads and, with them, the model width; whole
transformer blocks (``--drop-blocks``) are ``pruning/pruners/dit_depth.py``'s.

A plain diffusers DiT config has one width: ``num_attention_heads * attention_head_dim`` is at once the token
(residual) width, every block's attention width, its adaLN-Zero embedding width, and a quarter of its MLP width
(``FeedForward`` is always 4x, gelu-approximate; ``DiTTransformer2DModel`` passes no ``ff_inner_dim``). So a
template that plain diffusers rebuilds removes whole heads and narrows all of these alike:

* the token channels kept are the ones whose fixed 2D sin-cos position code is closest to the template's own
  (diffusers recomputes that code from the width; it is not stored), so each kept channel keeps its position
  frequency (exactly so when the width halves);
* each block keeps its best heads (q/k/v rows and out-projection columns of whole heads), its best MLP hidden
  units, and the best channels of its (t, class) embedding MLP, by the ``--importance`` criterion applied to
  the weights those channels touch (magnitude: L2; taylor: |w * dL/dw|; random: seeded);
* the adaLN-Zero modulation (six per-channel vectors) and the final shift/scale follow the token channels.

Slicing is done by hand (torch-pruning's tracer does not see the chunked modulation vectors); the sliced model
is then rebuilt from its new config by plain diffusers and must predict the same, as the UNet pruners check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.pruning.pruners.dit_depth import DepthRemoval, drop_blocks
from o2mcli.pruning.pruners.base import Pruner

FAMILY = "DiTTransformer2DModel"


# 1. Plans ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiTPlan:
    """Heads kept (and so width ``new_heads * head_dim``, MLP 4x that) under one ratio."""

    ratio: float
    old_heads: int
    new_heads: int
    head_dim: int
    round_to: Optional[int] = None  # a DiT removes whole heads; there is no channel rounding to choose

    @property
    def old_width(self) -> int:
        return self.old_heads * self.head_dim

    @property
    def new_width(self) -> int:
        return self.new_heads * self.head_dim

    def new_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out = dict(cfg)
        out["num_attention_heads"] = self.new_heads
        return out


def plan_heads(cfg: dict[str, Any], ratio: float) -> DiTPlan:
    """Whole heads left after removing ``ratio`` of them (rounded, at least one)."""
    if not 0.0 < ratio < 1.0:
        raise O2MError(f"--ratio {ratio}: must be in (0, 1), the fraction of attention heads removed")
    heads, d = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    new = max(1, int(math.floor(heads * (1.0 - ratio) + 0.5)))
    if new >= heads:
        raise O2MError(f"--ratio {ratio}: removes no head of the DiT's {heads}; use a larger ratio")
    if (new * d) % 4:
        raise O2MError(f"--ratio {ratio}: {new} heads of {d} give width {new * d}, not a multiple of 4 as DiT's 2D "
                       "sin-cos position code needs; use another ratio")
    return DiTPlan(ratio=ratio, old_heads=heads, new_heads=new, head_dim=d)


def dit_macs(cfg: dict[str, Any]) -> int:
    """MACs of one batch-1 forward of a DiT built from ``cfg`` on the meta device (no memory, no compute)."""
    from o2mcli.models.stats import count_macs
    from o2mcli.pruning.widths import reference_unet

    return count_macs(reference_unet(cfg))


def plan_for_macs(cfg: dict[str, Any], target: float) -> DiTPlan:
    """The most heads whose template costs at most ``target`` MACs per forward."""
    heads = int(cfg.get("num_attention_heads", 16))
    teacher = dit_macs(cfg)
    if target >= teacher:
        raise O2MError(f"--target-macs {target / 1e9:.4g}G: the teacher already costs {teacher / 1e9:.4g}G; "
                       "nothing to prune")
    smallest = teacher
    for new in range(heads - 1, 0, -1):
        ratio = round(1.0 - new / heads, 6)
        try:
            plan = plan_heads(cfg, ratio)
        except O2MError:
            continue
        smallest = dit_macs(plan.new_config(cfg))
        if smallest <= target:
            return plan
    raise O2MError(f"--target-macs {target / 1e9:.4g}G: below what removing heads can reach (one head costs "
                   f"{smallest / 1e9:.4g}G; add --drop-blocks to go further)")


# 2. Which channels ------------------------------------------------------------------------------------

def sincos_channels(old: int, new: int) -> list[int]:
    """The ``new`` token channels of an ``old``-wide DiT whose 2D sin-cos position frequencies are nearest the ones
    diffusers gives a ``new``-wide DiT. The code is [h: sin(k), cos(k); w: sin(k), cos(k)] over k < width/4 with
    frequency 10000^(-k / (width/4)): template frequency j sits nearest teacher frequency j * old / new."""
    qo, qn = old // 4, new // 4
    ks = [min(qo - 1, int(math.floor(j * qo / qn + 0.5))) for j in range(qn)]
    return [part * qo + k for part in range(4) for k in ks]


class _Scorer:
    """Per-channel scores from the weights a channel touches, under one criterion."""

    def __init__(self, kind: str, generator: Optional[torch.Generator] = None) -> None:
        self.kind, self.generator = kind, generator

    def __call__(self, n: int, touched: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """``touched``: (parameter, dim) pairs whose slices along dim are the n channels."""
        if self.kind == "random":
            return torch.rand(n, generator=self.generator)
        score = torch.zeros(n, dtype=torch.float64)
        for p, dim in touched:
            if self.kind == "taylor":
                if p.grad is None:
                    raise RuntimeError(f"taylor importance: a parameter of shape {tuple(p.shape)} has no gradient")
                v = (p.detach() * p.grad.detach()).abs()
            else:
                v = p.detach() ** 2
            v = v.movedim(dim, 0).reshape(n, -1).sum(1).double()
            score += v
        return score.sqrt() if self.kind == "magnitude" else score


def scorer_for(importance: Any) -> _Scorer:
    """The criterion behind one of ``pruning/importance``'s objects (torch-pruning importances)."""
    import torch_pruning as tp

    if isinstance(importance, tp.importance.GroupTaylorImportance):
        return _Scorer("taylor")
    if isinstance(importance, tp.importance.GroupMagnitudeImportance):
        return _Scorer("magnitude")
    if hasattr(importance, "generator"):  # pruning/importance/random.py: seeded scores
        return _Scorer("random", importance.generator)
    raise O2MError(f"--importance {type(importance).__name__}: not supported for a DiT (magnitude, random, taylor)")


def _best(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep).indices.sort().values


# 3. Slicing -------------------------------------------------------------------------------------------

def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


def _linear(lin: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> None:
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
        if lin.bias is not None:
            lin.bias = _param(lin.bias.detach()[rows])
    if cols is not None:
        w = w[:, cols]
    lin.weight = _param(w)
    lin.out_features, lin.in_features = w.shape


def _layer_norm(norm: nn.LayerNorm, width: int) -> None:
    if norm.weight is not None:
        raise RuntimeError("a DiT LayerNorm with affine weights (norm_elementwise_affine) is not handled")
    norm.normalized_shape = (width,)


def _chunks(idx: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """``idx`` in each of the n consecutive width-sized chunks (adaLN-Zero's six modulation vectors)."""
    return torch.cat([idx + i * width for i in range(n)])


@dataclass
class DiTOutcome:
    """What the slicing kept: per block the teacher heads and the counts of MLP and embedding channels."""

    token_channels: list[int]
    heads: dict[str, list[int]] = field(default_factory=dict)
    mlp: dict[str, list[int]] = field(default_factory=dict)  # block -> [old, new] hidden width
    groups: list[str] = field(default_factory=list)


@torch.no_grad()
def slice_dit(model: nn.Module, plan: DiTPlan, scorer: _Scorer) -> DiTOutcome:
    """Narrow ``model`` in place to ``plan``: parameters sliced, config-derived attributes set as diffusers would."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    D, Dn, d = plan.old_width, plan.new_width, plan.head_dim
    R = torch.tensor(sincos_channels(D, Dn))
    out = DiTOutcome(token_channels=R.tolist())
    # Token stream: patch projection in, final modulation and projection out.
    pe = model.pos_embed
    pe.proj.weight = _param(pe.proj.weight.detach()[R])
    pe.proj.bias = _param(pe.proj.bias.detach()[R])
    pe.proj.out_channels = Dn
    grid = int(pe.height)
    pos = get_2d_sincos_pos_embed(Dn, grid, base_size=pe.base_size, interpolation_scale=pe.interpolation_scale,
                                  output_type="pt")
    pe.pos_embed = pos.float().unsqueeze(0).to(pe.pos_embed.device)  # non-persistent: what a rebuild computes
    for i, blk in enumerate(model.transformer_blocks):
        name = f"transformer_blocks.{i}"
        n1, attn, ff = blk.norm1, blk.attn1, blk.ff
        # The block's (t, class) embedding: hidden and output widths, each its own best channels.
        te = n1.emb.timestep_embedder
        e1 = _best(scorer(D, [(te.linear_1.weight, 0), (te.linear_1.bias, 0), (te.linear_2.weight, 1)]), Dn)
        touch_e2 = [(te.linear_2.weight, 0), (te.linear_2.bias, 0),
                    (n1.emb.class_embedder.embedding_table.weight, 1), (n1.linear.weight, 1)]
        if i == 0:  # diffusers reads block 0's embedding for the final shift and scale too
            touch_e2.append((model.proj_out_1.weight, 1))
        e2 = _best(scorer(D, touch_e2), Dn)
        _linear(te.linear_1, rows=e1)
        _linear(te.linear_2, rows=e2, cols=e1)
        table = n1.emb.class_embedder.embedding_table
        table.weight = _param(table.weight.detach()[:, e2])
        table.embedding_dim = Dn
        _linear(n1.linear, rows=_chunks(R, D, 6), cols=e2)
        _layer_norm(n1.norm, Dn)
        if i == 0:
            _linear(model.proj_out_1, rows=_chunks(R, D, 2), cols=e2)
        # Attention: whole heads.
        h = plan.old_heads
        hs = scorer(D, [(attn.to_q.weight, 0), (attn.to_q.bias, 0), (attn.to_k.weight, 0), (attn.to_k.bias, 0),
                        (attn.to_v.weight, 0), (attn.to_v.bias, 0), (attn.to_out[0].weight, 1)])
        if scorer.kind == "random":
            head_scores = torch.rand(h, generator=scorer.generator)
        else:
            head_scores = (hs ** 2).reshape(h, d).sum(1) if scorer.kind == "magnitude" else hs.reshape(h, d).sum(1)
        keep_heads = _best(head_scores, plan.new_heads)
        H = torch.cat([torch.arange(int(k) * d, (int(k) + 1) * d) for k in keep_heads])
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            _linear(lin, rows=H, cols=R)
        _linear(attn.to_out[0], rows=R, cols=H)
        attn.heads = attn.sliceable_head_dim = plan.new_heads
        attn.inner_dim = attn.inner_kv_dim = attn.query_dim = attn.cross_attention_dim = Dn
        attn.out_dim = attn.out_context_dim = Dn
        out.heads[name] = keep_heads.tolist()
        # MLP: 4x the width, its best hidden units.
        up, down = ff.net[0].proj, ff.net[2]
        hidden = up.out_features
        M = _best(scorer(hidden, [(up.weight, 0), (up.bias, 0), (down.weight, 1)]), 4 * Dn)
        _linear(up, rows=M, cols=R)
        _linear(down, rows=R, cols=M)
        out.mlp[name] = [hidden, 4 * Dn]
        _layer_norm(blk.norm3, Dn)
        blk.dim, blk.num_attention_heads = Dn, plan.new_heads
        out.groups += [f"{name}.heads", f"{name}.mlp", f"{name}.emb"]
    _layer_norm(model.norm_out, Dn)
    _linear(model.proj_out_2, cols=R)
    model.inner_dim = Dn
    model.register_to_config(num_attention_heads=plan.new_heads)
    return out


# 4. The pruner ---------------------------------------------------------------------------------------

def _widths(cfg: dict[str, Any]) -> dict[str, int]:
    heads, d = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    return {"num_attention_heads": heads, "attention_head_dim": d, "width": heads * d, "mlp_width": 4 * heads * d,
            "num_layers": int(cfg["num_layers"])}


def _block_rows(teacher: nn.Module, template: nn.Module, block_map: Optional[dict[str, str]]) -> tuple[list, dict]:
    """One row per teacher block (params, MACs teacher -> its student block, 0 where none), and totals."""
    from o2mcli.models.stats import count_block_macs, count_block_params

    tp_, sp = count_block_params(teacher), count_block_params(template)
    with torch.no_grad():
        tm, sm = count_block_macs(teacher.eval()), count_block_macs(template.eval())
    from_teacher = {t: s for s, t in (block_map or {}).items()}
    rows = []
    for name in tp_:
        if block_map is None:
            other = name if name in sp else None
        else:
            other = from_teacher.get(name) if name.startswith("transformer_blocks.") else name
        row = {"block": name, "params": [tp_[name], sp.get(other, 0)], "macs": [tm.get(name, 0), sm.get(other, 0)]}
        if block_map is not None:
            row["student_block"] = other
        row["params_kept"] = round(row["params"][1] / max(row["params"][0], 1), 4)
        row["macs_kept"] = round(row["macs"][1] / max(row["macs"][0], 1), 4) if row["macs"][0] else None
        rows.append(row)
    totals = {"tparams": sum(tp_.values()), "sparams": sum(sp.values()), "tmacs": sum(tm.values()),
              "smacs": sum(sm.values())}
    return rows, totals


class DiTPruner(Pruner):
    """Head (and width) pruning and block dropping of a ``DiTTransformer2DModel``."""

    family = FAMILY
    drops_blocks = True
    width_unit = "heads"

    def widths_line(self, teacher: dict, template: dict) -> str:
        """Heads (and with them the width and MLP), and depth."""
        t, m = teacher, template
        return (f"heads {t['num_attention_heads']} -> {m['num_attention_heads']}, width {t['width']} -> "
                f"{m['width']}, MLP {t['mlp_width']} -> {m['mlp_width']}, blocks {t['num_layers']} -> "
                f"{m['num_layers']}")

    def check(self, cfg: dict[str, Any], where: Path) -> None:
        from o2mcli.models.families.dit import check_dit_config

        check_dit_config(cfg, where)
        if cfg.get("norm_elementwise_affine", False):
            raise O2MError(f"{where}: DiT config norm_elementwise_affine=true is not supported by o2m prune "
                           "(DiT's adaLN-Zero norms have no affine weights)")
        if cfg.get("activation_fn", "gelu-approximate") not in ("gelu", "gelu-approximate"):
            raise O2MError(f"{where}: DiT config activation_fn={cfg['activation_fn']!r} is not supported by o2m "
                           "prune (gelu or gelu-approximate)")

    def plan(self, cfg: dict[str, Any], ratio: Optional[float], target_macs: Optional[float],
             round_to: Optional[int]) -> DiTPlan:
        if round_to is not None:
            raise O2MError(f"--round-to {round_to}: a DiT loses whole heads of attention_head_dim="
                           f"{cfg.get('attention_head_dim')} channels; there is no rounding to choose")
        if target_macs is not None:
            return plan_for_macs(cfg, target_macs)
        return plan_heads(cfg, 0.3 if ratio is None else ratio)

    def prune(self, model: nn.Module, plan: DiTPlan, importance: Callable[[Any], torch.Tensor]) -> DiTOutcome:
        return slice_dit(model, plan, scorer_for(importance))

    def rebuild(self, pruned: nn.Module, new_cfg: dict[str, Any], where: Path) -> nn.Module:
        """The sliced DiT rebuilt from its new config by plain diffusers, checked to be the same model."""
        from o2mcli.models.denoise import predict
        from o2mcli.models.families.dit import DiT
        from o2mcli.pruning.surgery import attribute_mismatches

        plain = DiT().build(new_cfg, pruned.state_dict(), where)
        bad = attribute_mismatches(pruned, plain)
        if bad:
            raise RuntimeError(f"pruned DiT differs from its diffusers config: {bad[0]} ({len(bad)} differences)")
        g = torch.Generator().manual_seed(0)
        c, s = int(new_cfg["in_channels"]), int(new_cfg["sample_size"])
        x = torch.randn(2, c, s, s, generator=g)
        t = torch.tensor([3, 700])
        y = torch.tensor([0, int(new_cfg["num_embeds_ada_norm"])])  # a class and the null class
        with torch.no_grad():
            a, b = predict(pruned.eval(), x, t, y), predict(plain.eval(), x, t, y)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"pruned DiT and its diffusers rebuild disagree by {(a - b).abs().max():.3g}")
        return plain

    def summary(self, teacher: nn.Module, template: nn.Module, plan: DiTPlan, outcome: DiTOutcome) -> dict:
        from o2mcli.models.io import denoiser_config_of

        rows, tot = _block_rows(teacher, template, None)
        tw, sw = _widths(denoiser_config_of(teacher)), _widths(denoiser_config_of(template))
        for r in rows:
            if r["block"] in outcome.mlp:
                r["heads"] = [plan.old_heads, plan.new_heads]
                r["mlp_width"] = outcome.mlp[r["block"]]
        return {
            "teacher": {"params": tot["tparams"], "macs": tot["tmacs"], **tw},
            "template": {"params": tot["sparams"], "macs": tot["smacs"], **sw},
            "params_ratio": round(tot["sparams"] / tot["tparams"], 4),
            "macs_ratio": round(tot["smacs"] / tot["tmacs"], 4),
            "ratio": plan.ratio,
            "round_to": None,
            "blocks": rows,
            "attention_heads": outcome.heads,  # per block, the teacher heads kept
            "groups_pruned": len(outcome.groups),
            "token_channels": (f"width {plan.old_width} -> {plan.new_width}: the token channels kept are those whose "
                               "2D sin-cos position frequencies are nearest the template's own"),
        }

    def drop_blocks(self, model: nn.Module, n: int, where: Path) -> tuple[nn.Module, DepthRemoval]:
        return drop_blocks(model, n, where)

    def removal_summary(self, teacher: nn.Module, shallow: nn.Module, template: nn.Module, removal: DepthRemoval,
                        slim: Optional[dict]) -> dict:
        """Totals against the teacher, one row per teacher block with the student block in its place, and the
        removal record; the slimming's fields (if any) kept."""
        from o2mcli.models.io import denoiser_config_of

        rows, tot = _block_rows(teacher, template, removal.block_map)
        slim_rows = {r["block"]: r for r in (slim or {}).get("blocks", [])}  # the slimming's rows: student names
        for r in rows:
            for key in ("heads", "mlp_width"):
                if key in slim_rows.get(r.get("student_block"), {}):
                    r[key] = slim_rows[r["student_block"]][key]
        out = dict(slim or {})
        out.update({
            "teacher": {"params": tot["tparams"], "macs": tot["tmacs"], **_widths(denoiser_config_of(teacher))},
            "template": {"params": tot["sparams"], "macs": tot["smacs"], **_widths(denoiser_config_of(template))},
            "params_ratio": round(tot["sparams"] / tot["tparams"], 4),
            "macs_ratio": round(tot["smacs"] / tot["tmacs"], 4),
            "ratio": (slim or {}).get("ratio"),
            "round_to": None,
            "block_removal": {**removal.record(), "params": sum(p.numel() for p in shallow.parameters()),
                              "num_layers": removal.config["num_layers"]},
            "blocks": rows,
        })
        return out
