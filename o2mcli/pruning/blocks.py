"""BK-SDM block removal (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion").

A Stable Diffusion UNet (``layers_per_block`` 2) made shallower by removing whole residual+attention
pairs, so that a plain diffusers config still describes it:

* ``bk-base``: every down stage keeps its first resnet (+attention) pair and drops the second
  (``layers_per_block`` 1); every up stage keeps pairs 0 and 2 of its 3 and drops the middle one.
  Pair 0 of an up stage reads the skip of the stage's last down resnet, pair 2 the skip of the
  downsampler below it: with one down resnet left, the kept pairs read the same skips, with the
  same shapes, as in the teacher.
* ``bk-small``: ``bk-base`` without the mid block (``mid_block_type`` null).
* ``bk-tiny``: ``bk-small`` without the innermost down stage (a ``DownBlock2D``, no attention) and
  the first up stage (an ``UpBlock2D``); ``block_out_channels`` loses its last entry and the new
  innermost down stage has no downsampler. It needs at least 3 stages (2 remain) and the two
  innermost widths equal (SD: 1280, 1280), so the first remaining up stage sees the widths it saw.

The student is built from its config by plain diffusers and every tensor of it is copied from a
same-named (after the map below), same-shaped teacher tensor; any gap is a bug (RuntimeError).
The record names what was removed, maps student blocks to teacher blocks, and names BK-SDM's own feature-KD points
(``bk_feature_pairs``: the down and up stages, no mid block; bk-tiny's innermost stage by an attention output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from o2mcli.errors import O2MError

VARIANTS = ("bk-base", "bk-small", "bk-tiny")
UP_KEEP = (0, 2)  # of an up stage's 3 pairs, the ones a bk student keeps (the middle one goes)
_UNIT = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)(?:\.(\d+))?")


@dataclass
class BlockRemoval:
    """A block-removal plan: the student's config, where each of its tensors comes from, and what went."""

    variant: str
    config: dict[str, Any]
    key_map: dict[str, str] = field(default_factory=dict)  # student tensor -> teacher tensor
    layer_map: dict[str, str] = field(default_factory=dict)  # student layer (resnet, attention, ...) -> teacher's
    block_map: dict[str, str] = field(default_factory=dict)  # student block -> teacher block
    feature_pairs: dict[str, str] = field(default_factory=dict)  # BK-SDM's feature-KD points (bk_feature_pairs)
    removed: list[str] = field(default_factory=list)  # teacher layers or blocks with no place in the student
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What the template's provenance and summary keep of it (no per-tensor map: the layer map implies it)."""
        return {"variant": self.variant, "removed": self.removed, "layer_map": self.layer_map,
                "block_map": self.block_map, "feature_pairs": self.feature_pairs, "notes": self.notes}


# 1. The student's config ----------------------------------------------------------------------------

def _layers(cfg: dict[str, Any]) -> int | None:
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        return int(lpb[0]) if len(set(lpb)) == 1 else None
    return int(lpb)


def student_config(cfg: dict[str, Any], variant: str, where: Path) -> dict[str, Any]:
    """The diffusers config of ``variant``'s student; teachers outside BK-SDM's shape are refused by name."""
    if variant not in VARIANTS:
        raise O2MError(f"--blocks {variant!r}: unknown; choose one of {', '.join(VARIANTS)}")
    if _layers(cfg) != 2:
        raise O2MError(f"{where}: --blocks {variant} needs a teacher with layers_per_block 2 (SD 1.x/2.x: two "
                       f"resnet+attention pairs per down stage); this one has {cfg.get('layers_per_block')!r}")
    out = dict(cfg)
    out["layers_per_block"] = 1
    if variant in ("bk-small", "bk-tiny"):
        out["mid_block_type"] = None
    if variant == "bk-tiny":
        chans, down, up = list(cfg["block_out_channels"]), list(cfg["down_block_types"]), list(cfg["up_block_types"])
        if len(chans) < 3:
            raise O2MError(f"{where}: --blocks bk-tiny removes the innermost stage; this UNet has {len(chans)} "
                           "stages and needs at least 3 (so that 2 remain)")
        if down[-1] != "DownBlock2D" or up[0] != "UpBlock2D":
            raise O2MError(f"{where}: --blocks bk-tiny removes an innermost stage without attention (down "
                           f"DownBlock2D, up UpBlock2D, as in SD 1.x/2.x); this one has {down[-1]} / {up[0]}")
        if chans[-1] != chans[-2]:
            raise O2MError(f"{where}: --blocks bk-tiny needs the two innermost stages equally wide (SD: 1280, "
                           f"1280), so the first remaining up stage keeps its input width; found {chans[-2:]}")
        out["block_out_channels"], out["down_block_types"], out["up_block_types"] = chans[:-1], down[:-1], up[1:]
        for key in ("attention_head_dim", "cross_attention_dim", "transformer_layers_per_block",
                    "only_cross_attention", "num_attention_heads"):
            if isinstance(out.get(key), (list, tuple)):  # per-stage settings, in down order
                out[key] = list(out[key])[:-1]
    return out


# 2. Where every student tensor comes from ----------------------------------------------------------

def teacher_layer(name: str, up_offset: int) -> str:
    """The teacher layer (or tensor) a student layer (or tensor) is initialized from."""
    m = _UNIT.match(name)
    if m is None:
        return name  # conv_in, time_embedding, mid_block, conv_norm_out, conv_out: same place
    kind, block, part, idx = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    rest = name[m.end():]
    if kind == "down_blocks":
        return name  # down stages keep their first pair and their downsampler, at the same index
    block += up_offset
    if part in ("resnets", "attentions"):
        return f"up_blocks.{block}.{part}.{UP_KEEP[int(idx)]}{rest}"
    return f"up_blocks.{block}.{part}" + (f".{idx}" if idx is not None else "") + rest


def _unit(key: str) -> str:
    """The layer a tensor belongs to: a stage's resnet, attention or sampler, or a top-level module."""
    m = _UNIT.match(key)
    return m.group(0) if m is not None else key.split(".")[0]


def map_tensors(plan: BlockRemoval, teacher: dict[str, tuple[int, ...]], student: dict[str, tuple[int, ...]],
                source: Callable[[str], str], unit: Callable[[str], str]) -> set[str]:
    """Fill ``plan``'s tensor and layer maps: every student tensor from the same-shaped teacher tensor ``source``
    names, and every tensor of a kept teacher layer (``unit``) used. A gap is a bug in the pattern (RuntimeError).
    Returns the kept teacher layers. Shared by every block-removal pattern (BK-SDM's here, SDXL's)."""
    for k, shape in student.items():
        src = source(k)
        if teacher.get(src) != shape:
            raise RuntimeError(f"--blocks {plan.variant}: student tensor {k} {shape} has no same-shaped teacher "
                               f"tensor ({src}: {teacher.get(src)})")
        plan.key_map[k] = src
        plan.layer_map.setdefault(unit(k), unit(src))
    used = set(plan.key_map.values())
    kept = set(plan.layer_map.values())
    for k in teacher:
        if unit(k) in kept and k not in used:
            raise RuntimeError(f"--blocks {plan.variant}: teacher tensor {k} of a kept layer has no place in the "
                               "student")
    return kept


def plan_blocks(cfg: dict[str, Any], variant: str, where: Path) -> BlockRemoval:
    """The whole plan from the teacher's config alone (models built on the meta device: no memory, so it serves the
    SD-sized benchmark too). Every student tensor must map to a teacher tensor of the same shape."""
    from o2mcli.pruning.widths import reference_unet

    new_cfg = student_config(cfg, variant, where)
    off = 1 if variant == "bk-tiny" else 0
    teacher = {k: tuple(v.shape) for k, v in reference_unet(cfg).state_dict().items()}
    student = {k: tuple(v.shape) for k, v in reference_unet(new_cfg).state_dict().items()}
    plan = BlockRemoval(variant=variant, config=new_cfg)
    kept_units = map_tensors(plan, teacher, student, lambda k: teacher_layer(k, off), _unit)
    gone = sorted({_unit(k) for k in teacher} - kept_units, key=_natural)
    plan.removed = _collapse(gone, {_unit(k) for k in teacher})
    plan.block_map, plan.feature_pairs, plan.notes = _block_maps(new_cfg, off, variant)
    return plan


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _collapse(gone: list[str], units: set[str]) -> list[str]:
    """Removed layers, a whole block named once when none of its layers remains."""
    out: list[str] = []
    for u in gone:
        block = ".".join(u.split(".")[:2]) if u.split(".")[0].endswith("blocks") else u
        whole = all(v in gone for v in units if v == block or v.startswith(block + "."))
        name = block if whole else u
        if name not in out:
            out.append(name)
    return out


def _block_maps(new_cfg: dict[str, Any], off: int, variant: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    n = len(new_cfg["block_out_channels"])
    block_map = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(n)}
    if new_cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        block_map["mid_block"] = "mid_block"
    block_map.update({f"up_blocks.{i}": f"up_blocks.{i + off}" for i in range(n)})
    notes = []
    if off:
        last = f"down_blocks.{n - 1}"
        notes.append(f"{last} has no downsampler in the student (it is the innermost stage now): its output is "
                     "twice the teacher's resolution, so feature KD pairs its last layer's output with the teacher's "
                     "layer before the downsampler instead (BK-SDM-Tiny)")
    return block_map, bk_feature_pairs(new_cfg, off), notes


def bk_feature_pairs(new_cfg: dict[str, Any], off: int) -> dict[str, str]:
    """BK-SDM's feature-KD points (Kim et al. 2023, Sec. 3.2, L_featKD; ``mapping_layers`` of its
    kd_train_text_to_image.py), student module -> teacher module, in input-to-output order.

    * bk-base, bk-small: every down stage's and every up stage's output, with its namesake. The mid block is not a
      point, not even in bk-base, which keeps it (BK-SDM hooks the down and up blocks only).
    * bk-tiny: the outer down stages with their namesakes; the innermost remaining stage, which lost its
      downsampler, by its last layer: the student's one attention's ``proj_out`` against the teacher's second
      (``down_blocks.2.attentions.0.proj_out`` -> ``down_blocks.2.attentions.1.proj_out`` on SD 1.x/2.x); and
      every up stage with the teacher's one index higher (its first up stage is gone).

    Beyond BK-SDM (its configs always have attention there): an innermost stage without attention pairs its resnet
    outputs the same way (``resnets.0`` -> ``resnets.1``).
    """
    n = len(new_cfg["block_out_channels"])
    pairs = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(n - 1 if off else n)}
    if off:
        inner = n - 1
        part = "attentions.{}.proj_out" if "CrossAttn" in str(new_cfg["down_block_types"][inner]) else "resnets.{}"
        pairs[f"down_blocks.{inner}.{part.format(0)}"] = f"down_blocks.{inner}.{part.format(1)}"
    pairs.update({f"up_blocks.{i}": f"up_blocks.{i + off}" for i in range(n)})
    return pairs


# 3. The student itself -----------------------------------------------------------------------------

def remove_blocks(teacher: nn.Module, variant: str, where: Path) -> tuple[nn.Module, BlockRemoval]:
    """``variant``'s student, built by plain diffusers from its config and initialized from ``teacher``."""
    from o2mcli.models.io import build_denoiser, denoiser_config_of

    plan = plan_blocks(denoiser_config_of(teacher), variant, where)
    state = teacher.state_dict()
    student_state = {k: state[src].detach().clone() for k, src in plan.key_map.items()}
    student = build_denoiser(plan.config, student_state, where)
    for k, v in student.state_dict().items():  # the exact load above, checked once more against the map
        if not torch.equal(v, state[plan.key_map[k]]):
            raise RuntimeError(f"--blocks {variant}: student tensor {k} differs from teacher {plan.key_map[k]}")
    return student, plan
