"""diffusers' ``DiTTransformer2DModel``: the diffusion transformer (Peebles & Xie 2023) in pixel space (issue #14).

The image is cut into ``patch_size`` patches, each a token; ``num_layers`` transformer blocks with adaLN-Zero
conditioning on (t, class) follow. DiT is class-conditional by construction: its label table holds
``num_embeds_ada_norm`` classes and, after them, the null class (classifier-free guidance's unconditional branch).
A model asked without labels (an unconditional teacher's student, MACs, shape probes) gets the null class.
diffusers drops labels to the null class at random in training mode; o2m does its own label dropout, seeded, so
the family switches diffusers' off when it builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from o2mcli.models.condition import as_condition
from o2mcli.errors import O2MError
from o2mcli.models.configs import check_int_in
from o2mcli.models.families.base import DenoiserFamily, LabelInput, build_from_config

MAX_TOKEN_BYTES = 16 << 30  # one sample's token activations (a few maps of tokens x width), as for the UNets


def check_dit_config(cfg: Any, where: Path) -> None:
    """A DiT config o2m can build: an object, sizes in bounds, a patch size that divides the image, adaLN-Zero with a
    label table, and bounded activations; one line naming the key otherwise."""
    if not isinstance(cfg, dict):
        raise O2MError(f"{where}: the DiT config is a JSON {type(cfg).__name__}, expected an object")
    for key, hi in (("num_attention_heads", 1024), ("attention_head_dim", 4096), ("in_channels", 64),
                    ("out_channels", 128), ("num_layers", 1024), ("sample_size", 2048), ("patch_size", 2048),
                    ("num_embeds_ada_norm", 1_000_000)):
        check_int_in(cfg, key, 1, hi, where, "DiT config")
    size, patch = int(cfg.get("sample_size", 32)), int(cfg.get("patch_size", 2))
    if size % patch:
        raise O2MError(f"{where}: DiT config patch_size {patch} does not divide sample_size {size}")
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise O2MError(f"{where}: DiT config norm_type {cfg['norm_type']!r}; o2m takes DiT's 'ada_norm_zero'")
    if "num_embeds_ada_norm" in cfg and cfg["num_embeds_ada_norm"] is None:
        raise O2MError(f"{where}: DiT config num_embeds_ada_norm is null; DiT's adaLN-Zero needs a label table "
                       "(the number of classes; 1 for an unconditional model, which always gets the null class)")
    width = int(cfg.get("num_attention_heads", 16)) * int(cfg.get("attention_head_dim", 72))
    tokens = (size // patch) ** 2
    need = tokens * width * 4 * 8 + tokens * tokens * int(cfg.get("num_attention_heads", 16)) * 4
    if need > MAX_TOKEN_BYTES:
        raise O2MError(f"{where}: DiT config of {tokens} tokens x width {width} implies {need / 2**30:.0f} GiB of "
                       f"activations per image; refused (at most {MAX_TOKEN_BYTES >> 30} GiB)")


def null_class(model: nn.Module) -> int:
    """The label of the null class: the row after the classes in DiT's label table."""
    return int(getattr(model, "module", model).config.num_embeds_ada_norm)


class DiT(DenoiserFamily):
    """``DiTTransformer2DModel``: eps (and v) from ``model(x_t, t, class_labels=y).sample``."""

    name = "DiTTransformer2DModel"

    def check_config(self, cfg: Any, where: Path) -> None:
        check_dit_config(cfg, where)

    def build(self, cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]], where: Path) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        self.check_config(cfg, where)
        model = build_from_config(DiTTransformer2DModel, cfg, state, where)
        for m in model.modules():  # o2m drops labels itself, from its own generators (see the module docstring)
            if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                m.dropout_prob = 0.0
        return model

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cond``: class labels (B,); without them, the null class."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(b)  # a sampler's one timestep for the batch: DiT embeds one per sample
        cond = as_condition(cond, "labels")
        labels = None if cond is None else cond.labels
        if labels is None:
            labels = torch.full((b,), null_class(model), dtype=torch.long, device=x_t.device)
        return model(x_t, t, class_labels=labels).sample

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = model.config
        return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)

    def label_input(self, cfg: dict[str, Any]) -> LabelInput:
        """``num_embeds_ada_norm`` classes and the null class after them; optional (no labels: the null class)."""
        k = int(cfg.get("num_embeds_ada_norm", 1000))  # diffusers' default where the key is missing
        return LabelInput("num_embeds_ada_norm", k, "classes (num_embeds_ada_norm)", offset=1, optional=True)

    def feature_map(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A block's tokens (B, N, D) as the patch grid (B, D, h, w): N = h * w patches in raster order (diffusers'
        patchify), so a DiT's features meet a UNet's of the same resolution."""
        if tensor.dim() != 3:
            return tensor
        cfg = getattr(model, "module", model).config
        h = w = int(cfg.sample_size) // int(cfg.patch_size)
        b, n, d = tensor.shape
        if n != h * w:
            raise O2MError(f"{name}: {n} tokens, expected {h}x{w} patches")
        return tensor.transpose(1, 2).reshape(b, d, h, w)

    def feature_points(self, model: nn.Module) -> list[str]:
        """Every transformer block's output: token maps (B, tokens, width)."""
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def pipeline(self, model: nn.Module, scheduler: Any, parts: Any = None) -> Any:
        """diffusers has no pixel-space DiT pipeline (``DiTPipeline`` decodes latents with a VAE), so the export is
        the model directory itself with its scheduler: :class:`DiTExport`, written by :meth:`save_pipeline`."""
        return DiTExport(model=model, scheduler=scheduler)

    def save_pipeline(self, pipe: Any, folder: Path, parts: Any = None) -> None:
        """``config.json`` + ``diffusion_pytorch_model.safetensors`` (``DiTTransformer2DModel.from_pretrained``
        loads the folder) and ``scheduler_config.json`` beside them, so o2m loads the folder back as a diffusers
        model directory. No ``model_index.json``: the folder is a model, not a pipeline."""
        pipe.model.save_pretrained(folder, safe_serialization=True)
        pipe.scheduler.save_config(folder)


DEFAULT_CLASSES = 1000  # diffusers' num_embeds_ada_norm default


@dataclass
class DiTExport:
    """What ``o2m export`` writes for a DiT: the model and its scheduler (no diffusers pipeline class exists)."""

    model: nn.Module
    scheduler: Any
