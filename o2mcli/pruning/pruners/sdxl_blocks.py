"""Block-removal patterns for SDXL's U-Net from the compression literature: KOALA-1B/700M, SSD-1B and Segmind-Vega.

Each pattern turns an SDXL-shaped ``UNet2DConditionModel`` (3 stages; down ``DownBlock2D``, ``CrossAttnDownBlock2D``,
``CrossAttnDownBlock2D``; ``layers_per_block`` 2; ``addition_embed_type`` ``text_time``; a cross-attention mid block;
one transformer depth per stage, SDXL base: 0/2/10) into the student architecture its authors published, as a plain
diffusers config (per-stage ``transformer_layers_per_block``, and ``reverse_transformer_layers_per_block`` where the up
path is not the down path's mirror). The published architectures (transformer depth of every attention, in diffusers
order; "=" keeps the teacher's whole stack):

=========== ========= ================== ============================ ==============================
pattern     per stage down (stage 1, 2)   up (up_blocks.0, 1)          mid block
=========== ========= ================== ============================ ==============================
koala-1b    1 down    [=], [6]           [6, 6], [=, =]               cross-attn, depth 6
koala-700m  1 down    [=], [5]           [5, 5], [=, =]               removed
ssd-1b      2 down    [=, =], [4, 4]     [4, 4, =], [=, 1, 1]         one resnet, no attention
vega        2 down    [1, 1], [2, 2]     [2, 2, 2], [1, 1, 1]         one resnet, no attention
=========== ========= ================== ============================ ==============================

Sources: ComfyUI's ``comfy/model_detection.py`` (``unet_config_from_diffusers_unet``: the diffusers-format SSD_1B,
Segmind_Vega, KOALA_700M and KOALA_1B entries, ``num_res_blocks``, ``transformer_depth``,
``transformer_depth_output``, ``transformer_depth_middle``: -1 is a mid block of one resnet, -2 none); the KOALA model
cards (etri-vilab/koala-700m README: "Tx blocks [0, 2, 10] / [0, 2, 6] / [0, 2, 5]", params 2,567M / 1,161M / 782M);
the SSD-1B model card ("1.3B") and diffusers' SSD-1B-style config (``reverse_transformer_layers_per_block``
``[[4, 4, 10], [2, 1, 1], 1]``); Segmind's Vega write-up (blog.segmind.com/segmind-vega-2: down 247M, mid 31M,
up 460M; this pattern gives 246.8M, 31.1M and 459.9M, 745.2M in all).

Initialization (the student is built by plain diffusers from its config and every tensor copied from a same-shaped
teacher tensor; a gap is a RuntimeError):

* whole resnet+attention pairs (KOALA, ``layers_per_block`` 1, as BK-SDM): a down stage keeps pair 0, an up stage
  pairs 0 and 2 (the middle one goes). Up pair 0 then reads the skip of the stage's last down resnet and pair 2 the
  skip below it, with the teacher's shapes.
* a shortened transformer stack (k of the teacher's n layers): neither paper nor config says which teacher layers
  initialize it. Our choice: the first k-1 and the last one (k=1: the last alone). The first layers keep the
  stack's start exact; the last is the layer whose output the teacher's ``proj_out`` was trained to read, and its
  self-attention is the KOALA feature-KD point of the stack (below), so student and teacher points start equal.
* a mid block cut to one resnet (SSD-1B, Vega: diffusers' ``UNetMidBlock2D``, ``num_layers`` 0): the teacher's
  ``mid_block.resnets.0`` (Segmind's distill_sdxl.py pairs that truncated mid block with the teacher's whole one).
* everything else (conv_in, time and text_time embeddings, samplers, norms, conv_out) from its namesake.

Feature KD (``feature_pairs``): KOALA (Lee et al. 2023, Sec. 3.2) found the self-attention features the best
distillation target, better than the block outputs BK-SDM uses. Each kept ``Transformer2DModel`` (every stage's
attentions and a cross-attention mid block) gives one point: the self-attention module ``attn1`` of its last
transformer layer, paired with the teacher's ``attn1`` of the last layer of the same stack, e.g.
``down_blocks.2.attentions.0.transformer_blocks.5.attn1 -> down_blocks.2.attentions.0.transformer_blocks.9.attn1``
for koala-1b. Which layer of a deep stack is ours to choose (the last; see above). Outputs are tokens (B, H*W, C).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.pruning.blocks import BlockRemoval, map_tensors

FULL = -1  # in a pattern: the teacher's whole transformer stack is kept

# Teacher layer each student layer of a stage comes from, by the student's layers per down stage.
DOWN_KEEP = {2: (0, 1), 1: (0,)}
UP_KEEP = {2: (0, 1, 2), 1: (0, 2)}  # an up stage has layers_per_block + 1 layers

SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class SDXLPattern:
    """One published SDXL student: its layers per down stage and the transformer depth of every attention."""

    name: str
    paper: str
    layers_per_block: int
    down: tuple[tuple[int, ...], ...]  # per down stage, per kept layer (0: a stage without attention)
    up: tuple[tuple[int, ...], ...]  # per up stage in diffusers order (innermost first), per kept layer
    mid: str | None  # "UNetMidBlock2DCrossAttn", "UNetMidBlock2D" (one resnet) or None (removed)
    mid_depth: int = 0  # transformer depth of a cross-attention mid block


KOALA = "Lee et al. 2023, KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for T2I Synthesis"
SEGMIND = "Gupta et al. 2024, Progressive Knowledge Distillation of Stable Diffusion XL using Layer Level Loss"

PATTERNS: dict[str, SDXLPattern] = {
    # KOALA-1B (KOALA, Sec. 3.1): BK-SDM-style pair removal, innermost stacks 10 -> 6, mid block depth 6.
    "koala-1b": SDXLPattern("koala-1b", KOALA, 1, ((0,), (FULL,), (6,)), ((6, 6), (FULL, FULL), (0, 0)),
                            "UNetMidBlock2DCrossAttn", 6),
    # KOALA-700M (KOALA, Sec. 3.1): as KOALA-1B with innermost stacks 10 -> 5 and no mid block.
    "koala-700m": SDXLPattern("koala-700m", KOALA, 1, ((0,), (FULL,), (5,)), ((5, 5), (FULL, FULL), (0, 0)), None),
    # SSD-1B (Gupta et al. 2024): all resnets kept; transformer layers cut per attention; mid block one resnet.
    "ssd-1b": SDXLPattern("ssd-1b", SEGMIND, 2, ((0, 0), (FULL, FULL), (4, 4)), ((4, 4, FULL), (FULL, 1, 1), (0, 0, 0)),
                          "UNetMidBlock2D"),
    # Segmind-Vega (Gupta et al. 2024): all resnets kept; stacks 2 -> 1 and 10 -> 2; mid block one resnet.
    "vega": SDXLPattern("vega", SEGMIND, 2, ((0, 0), (1, 1), (2, 2)), ((2, 2, 2), (1, 1, 1), (0, 0, 0)),
                        "UNetMidBlock2D"),
}
SDXL_VARIANTS: tuple[str, ...] = tuple(PATTERNS)

# Published U-Net parameter counts (see the module docstring for the sources).
PUBLISHED_PARAMS = {"sdxl": 2_567_000_000, "koala-1b": 1_161_000_000, "koala-700m": 782_000_000,
                    "ssd-1b": 1_300_000_000, "vega": 745_000_000}

# SDXL base 1.0's U-Net config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), for costing on the meta
# device: the fields that shape the model; everything else is diffusers' default.
SDXL_BASE_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": list(SDXL_DOWN), "up_block_types": list(SDXL_UP),
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}


def keep_layers(n: int, k: int) -> tuple[int, ...]:
    """Which of a teacher stack's ``n`` transformer layers initialize a student stack of ``k``: the first ``k - 1``
    and the last (our choice; see the module docstring). ``k`` 1 keeps the last alone."""
    if k >= n:
        return tuple(range(n))
    return tuple(range(k - 1)) + (n - 1,)


# 1. Checking the teacher and writing the student's config ------------------------------------------------------

def _seq(v: Any, n: int) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _teacher_depths(cfg: dict[str, Any], variant: str, where: Path | str) -> list[int]:
    """The teacher's transformer depth per down stage, refusing anything that is not SDXL-shaped for ``variant``."""
    head = f"{where}: --blocks {variant}"
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise O2MError(f"{head} needs an SDXL UNet2DConditionModel; this is a {cfg.get('_class_name')}")
    if cfg.get("addition_embed_type") != "text_time":
        raise O2MError(f"{head} needs an SDXL U-Net (addition_embed_type text_time: pooled text and size/crop "
                       f"embeddings); this one has addition_embed_type {cfg.get('addition_embed_type')!r}")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    if len(down) != 3 or len(cfg.get("block_out_channels", ())) != 3:
        raise O2MError(f"{head} needs SDXL's 3 stages; this U-Net has {len(down)}")
    if tuple(down) != SDXL_DOWN or tuple(up) != SDXL_UP:
        raise O2MError(f"{head} needs SDXL's blocks (down {', '.join(SDXL_DOWN)}; up {', '.join(SDXL_UP)}); "
                       f"this U-Net has down {down}, up {up}")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise O2MError(f"{head} needs SDXL's cross-attention mid block; this U-Net has "
                       f"mid_block_type {cfg.get('mid_block_type')!r}")
    if set(_seq(cfg.get("layers_per_block", 2), 3)) != {2}:
        raise O2MError(f"{head} needs layers_per_block 2 (SDXL); this U-Net has {cfg.get('layers_per_block')!r}")
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise O2MError(f"{head} needs a symmetric SDXL teacher (one transformer depth per stage); this U-Net is "
                       "already asymmetric (reverse_transformer_layers_per_block is set)")
    depths = _seq(cfg.get("transformer_layers_per_block", 1), 3)
    if len(depths) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths):
        raise O2MError(f"{head} needs one transformer depth (>= 1) per stage; this U-Net has "
                       f"transformer_layers_per_block {cfg.get('transformer_layers_per_block')!r}")
    pat = PATTERNS[variant]
    for stage in (1, 2):
        wanted = [d for d in pat.down[stage] + pat.up[2 - stage] if d != FULL]
        if stage == 2 and pat.mid == "UNetMidBlock2DCrossAttn":
            wanted.append(pat.mid_depth)
        if wanted and max(wanted) > depths[stage]:
            raise O2MError(f"{head} keeps {max(wanted)} transformer layers in a stage-{stage} stack; this U-Net's "
                           f"stage-{stage} stacks have only {depths[stage]} (SDXL: {[0, 2, 10][stage]})")
    return depths


def _depth(spec: int, teacher: int) -> int:
    return teacher if spec == FULL else spec


def student_config(cfg: dict[str, Any], variant: str, where: Path | str) -> dict[str, Any]:
    """The plain diffusers config of ``variant``'s student of the SDXL-shaped teacher config ``cfg``."""
    if variant not in PATTERNS:
        raise O2MError(f"--blocks {variant!r}: unknown SDXL pattern; choose one of {', '.join(SDXL_VARIANTS)}")
    depths = _teacher_depths(cfg, variant, where)
    pat = PATTERNS[variant]
    down = [[_depth(s, depths[i]) if s else 1 for s in stage] for i, stage in enumerate(pat.down)]
    up = [[_depth(s, depths[2 - i]) if s else 1 for s in stage] for i, stage in enumerate(pat.up)]
    out = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    out["layers_per_block"] = pat.layers_per_block
    # diffusers: one int per down stage (a list where a stage's attentions differ); the mid block takes the last.
    out["transformer_layers_per_block"] = [d[0] if len(set(d)) == 1 else d for d in down]
    mirror = [[d[0]] * (pat.layers_per_block + 1) if len(set(d)) == 1 else None for d in reversed(down)]
    out["reverse_transformer_layers_per_block"] = None if mirror == up else \
        [u[0] if len(set(u)) == 1 else u for u in up]
    out["mid_block_type"] = pat.mid
    if pat.mid == "UNetMidBlock2DCrossAttn" and out["transformer_layers_per_block"][-1] != pat.mid_depth:
        # diffusers gives the mid block the innermost down stage's depth: a pattern must agree with itself
        raise RuntimeError(f"--blocks {variant}: mid depth {pat.mid_depth} differs from the innermost down depth "
                           f"{out['transformer_layers_per_block'][-1]}")
    return out


# 2. Where every student tensor comes from ---------------------------------------------------------------------

_STAGE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(\..*)$")
_TB = re.compile(r"^\.transformer_blocks\.(\d+)(\..*)$")


def _stack_source(rest: str, n_teacher: int, k_student: int) -> str:
    """The tail of a tensor name inside an attention, its transformer layer index moved to the teacher's."""
    m = _TB.match(rest)
    if m is None:
        return rest  # norm, proj_in, proj_out: the attention's own
    return f".transformer_blocks.{keep_layers(n_teacher, k_student)[int(m.group(1))]}{m.group(2)}"


def _sources(cfg: dict[str, Any], new_cfg: dict[str, Any], variant: str) -> Any:
    """A function from a student tensor name to its teacher tensor name."""
    pat = PATTERNS[variant]
    t_depths = _seq(cfg.get("transformer_layers_per_block", 1), 3)
    lpb = pat.layers_per_block

    def s_depth(kind: str, stage: int, layer: int) -> int:
        spec = (pat.down[stage] if kind == "down_blocks" else pat.up[stage])[layer]
        return _depth(spec, t_depths[stage if kind == "down_blocks" else 2 - stage])

    def source(name: str) -> str:
        m = _STAGE.match(name)
        if m is not None:
            kind, stage, part, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            t_idx = (DOWN_KEEP if kind == "down_blocks" else UP_KEEP)[lpb][idx]
            if part == "attentions":
                n = t_depths[stage if kind == "down_blocks" else 2 - stage]
                rest = _stack_source(rest, n, s_depth(kind, stage, idx))
            return f"{kind}.{stage}.{part}.{t_idx}{rest}"
        m = _MID.match(name)
        if m is not None:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            if part == "attentions":
                rest = _stack_source(rest, t_depths[2], pat.mid_depth)
            return f"mid_block.{part}.{idx}{rest}"
        return name  # conv_in, time_embedding, add_embedding, samplers, conv_norm_out, conv_out

    return source


def _unit(key: str) -> str:
    """The layer a tensor belongs to: a transformer layer, else a resnet/attention/sampler, else a top-level module."""
    m = re.match(r"^(.*?\.attentions\.\d+\.transformer_blocks\.\d+)\.", key)
    if m is not None:
        return m.group(1)
    m = re.match(r"^((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+|"
                 r"mid_block\.(?:resnets|attentions)\.\d+)\.", key)
    return m.group(1) if m is not None else key.split(".")[0]


def _collapse(gone: set[str], units: set[str]) -> list[str]:
    """Removed layers, an attention or the mid block named once when none of its layers remains."""
    out: list[str] = []
    for u in sorted(gone, key=_natural):
        name = u
        parts = u.split(".")
        for cut in range(1, len(parts)):  # the shortest ancestor all of whose layers went
            anc = ".".join(parts[:cut])
            below = [v for v in units if v == anc or v.startswith(anc + ".")]
            if anc in ("down_blocks", "up_blocks") or parts[cut - 1] in ("attentions", "resnets",
                                                                          "transformer_blocks"):
                continue  # name a block, a layer or an attention, never a bare container
            if below and all(v in gone for v in below):
                name = anc
                break
        if name not in out:
            out.append(name)
    return out


def _natural(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _build(cfg: dict[str, Any], device: Union[str, torch.device] = "meta") -> nn.Module:
    """A plain diffusers UNet2DConditionModel of ``cfg`` (on the meta device by default: shapes only)."""
    from o2mcli.models.families.text_unet import build_plain

    with torch.device(device):
        return build_plain(cfg)


def sdxl_removal_config(cfg: dict[str, Any], variant: str, where: Path | str) -> BlockRemoval:
    """``variant``'s plan for the SDXL-shaped teacher config ``cfg``: the student config and every map, no weights
    (both models are built on the meta device). Every student tensor must map to a same-shaped teacher tensor."""
    new_cfg = student_config(cfg, variant, where)
    teacher = {k: tuple(v.shape) for k, v in _build(cfg).state_dict().items()}
    student = {k: tuple(v.shape) for k, v in _build(new_cfg).state_dict().items()}
    source = _sources(cfg, new_cfg, variant)
    plan = BlockRemoval(variant=variant, config=new_cfg)
    kept = map_tensors(plan, teacher, student, source, _unit)
    units = {_unit(k) for k in teacher}
    plan.removed = _collapse(units - kept, units)
    plan.block_map = {b: b for b in ([f"down_blocks.{i}" for i in range(3)] +
                                     (["mid_block"] if new_cfg["mid_block_type"] else []) +
                                     [f"up_blocks.{i}" for i in range(3)])}
    plan.feature_pairs = _attn_pairs(plan.layer_map)
    plan.notes = _notes(variant, new_cfg)
    return plan


def _attn_pairs(layer_map: dict[str, str]) -> dict[str, str]:
    """KOALA's self-attention feature-KD points: each student stack's last layer's ``attn1`` with its teacher's."""
    last: dict[str, str] = {}
    for s_layer, t_layer in layer_map.items():  # student layers come in model order, so the last one wins
        m = re.match(r"^(.*\.attentions\.\d+)\.transformer_blocks\.\d+$", s_layer)
        if m is not None:
            last[m.group(1)] = s_layer
    return {f"{s}.attn1": f"{layer_map[s]}.attn1" for s in last.values()}


def _notes(variant: str, new_cfg: dict[str, Any]) -> list[str]:
    pat = PATTERNS[variant]
    notes = [f"{variant}: {pat.paper}", "shortened transformer stacks keep the teacher's first k-1 layers and its last "
             "(our choice: neither the paper nor the released config says which layers initialize them)"]
    if pat.mid == "UNetMidBlock2D":
        notes.append("mid block: one resnet (diffusers UNetMidBlock2D), initialized from the teacher's "
                     "mid_block.resnets.0")
    elif pat.mid is None:
        notes.append("mid block removed (mid_block_type null)")
    if pat.layers_per_block == 1:
        notes.append("resnet+attention pairs removed as in BK-SDM: down stages keep pair 0, up stages pairs 0 and 2")
    return notes


# 3. The student itself ----------------------------------------------------------------------------------------

def remove_sdxl_blocks(teacher: nn.Module, variant: str, where: Path | str) -> tuple[nn.Module, BlockRemoval]:
    """``variant``'s student of the SDXL-shaped ``teacher``: built by plain diffusers from its config, every tensor
    copied from its mapped teacher tensor (same shape, same values, same dtype and device)."""
    cfg = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(teacher.config).items()
              if not k.startswith("_")}, "_class_name": type(teacher).__name__}
    plan = sdxl_removal_config(cfg, variant, where)
    state = teacher.state_dict()
    p = next(teacher.parameters())
    student = _build(plan.config, "meta").to_empty(device=p.device)
    if p.dtype != torch.float32:  # diffusers warns on any dtype cast, so only cast when it changes something
        student = student.to(p.dtype)
    if dict(student.named_buffers()).keys() - student.state_dict().keys():
        raise RuntimeError(f"--blocks {variant}: the student has non-persistent buffers, which to_empty leaves unset")
    own = student.state_dict()
    missing = sorted(set(own) - set(plan.key_map))
    if missing:
        raise RuntimeError(f"--blocks {variant}: student tensor {missing[0]} has no teacher source")
    # load_state_dict copies into the student's own storage: no second copy of the weights is held (SDXL: ~10 GB)
    student.load_state_dict({k: state[src] for k, src in plan.key_map.items()}, strict=True)
    for k, v in student.state_dict().items():  # the load above, checked once more against the map
        if not torch.equal(v, state[plan.key_map[k]]):
            raise RuntimeError(f"--blocks {variant}: student tensor {k} differs from teacher {plan.key_map[k]}")
    return student.eval(), plan
