"""diffusers' ``UNet2DConditionModel``: Stable Diffusion's latent, text-conditioned UNet (issue #13), SD 1.x/2.x and
SDXL (issue #24).

The condition (``models.condition.Condition``) holds the text tokens, ``(B, L, cross_attention_dim)``, passed as
``encoder_hidden_states``; an SDXL UNet (``addition_embed_type`` "text_time") also takes the pooled text embeddings
``(B, P)`` and six time ids ``(B, 6)`` (original size, crop top-left, target size), passed as ``added_cond_kwargs``.
Its VAE, text encoder(s) and tokenizer(s) stay in the teacher's pipeline directory, named by path and sha256 in the
``conditioning`` provenance (``families/stable_diffusion.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.codec import Codec
from o2mcli.models.condition import as_condition
from o2mcli.models.families.text_unet import (TIME_IDS, VAE_FACTOR, XL_BOUNDS, is_text_time, pooled_width,
                                               target_time_ids, width as _width)
from o2mcli.models.conditioning import TEXT
from o2mcli.models.families.base import DenoiserFamily, build_from_config
from o2mcli.models.families.unet_cache import UNetDeepCache, unet2d_condition_partial
from o2mcli.models.families.unet2d import TEXT_BOUNDS, check_unet_sizes, unet_block_outputs, unet_input_shape

SHAPE_TOKENS = 77  # CLIP's context length: the stand-in condition's length when only shapes matter


class UNet2DCondition(UNetDeepCache, DenoiserFamily):
    """``UNet2DConditionModel``: eps from ``model(x_t, t, encoder_hidden_states=text).sample``."""

    name = "UNet2DConditionModel"
    condition = TEXT

    def check_config(self, cfg: Any, where: Path) -> None:
        from o2mcli.models.families.stable_diffusion import check_text_only

        check_unet_sizes(cfg, where, extra=TEXT_BOUNDS + XL_BOUNDS)
        # o2m passes text tokens, and for SDXL pooled text and time ids: any other input would fail mid-run
        check_text_only(cfg, where, allow_text_time=True)
        if is_text_time(cfg):
            pooled = pooled_width(cfg)
            if pooled < 1:
                raise O2MError(f"{where}: projection_class_embeddings_input_dim "
                               f"{cfg.get('projection_class_embeddings_input_dim')} leaves no room for the pooled "
                               f"text embeddings beside {TIME_IDS} time ids of addition_time_embed_dim "
                               f"{cfg.get('addition_time_embed_dim')} (SDXL: 2816 = 1280 + 6 x 256)")

    def build(self, cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]], where: Path) -> nn.Module:
        from diffusers import UNet2DConditionModel

        self.check_config(cfg, where)
        return build_from_config(UNet2DConditionModel, cfg, state, where)

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cond``: a Condition (text tokens (B, L, D); for SDXL also pooled (B, P) and time ids (B, 6)) or bare
        tokens. What is missing stands in as zeros of CLIP's length (and the target size's time ids): enough for MACs
        and feature shapes; sampling and training always pass real embeddings (the empty prompt's for guidance)."""
        text, added = _inputs(model, x_t, cond)
        return model(x_t, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def deepcache_partial(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                          branch: int, cache: Any) -> torch.Tensor:
        text, added = _inputs(model, x_t, cond)
        return unet2d_condition_partial(model, x_t, t, text, branch, cache, added)

    def stand_in(self) -> str:
        return f"a {SHAPE_TOKENS}-token text embedding (SDXL: and zero pooled text, the target size's time ids)"

    def condition_shape(self, cfg: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The text tokens' width the cross-attention reads; for SDXL also the pooled text's width and the time
        ids' embedding width."""
        out = {"cross_attention_dim": _width(cfg.get("cross_attention_dim", 1280))}
        if is_text_time(cfg):
            out.update({"pooled text width": pooled_width(cfg),
                        "addition_time_embed_dim": cfg.get("addition_time_embed_dim")})
        return out

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        return unet_input_shape(model)  # latent channels and size

    def feature_points(self, model: nn.Module) -> list[str]:
        """The block outputs, as for UNet2DModel (BK-SDM's feature-KD points)."""
        return unet_block_outputs(model)

    def feature_map(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A point's output as (B, C, H, W): block outputs already are; a transformer's ``proj_out`` under
        ``use_linear_projection`` (SD 2.x; a point of BK-SDM-Tiny) gives tokens (B, H*W, C), laid back on the square
        latent grid (o2m's SD latents are square), else on one row (every feature-KD loss treats positions alike)."""
        if tensor.dim() != 3:
            return tensor
        b, n, c = tensor.shape
        side = int(round(n ** 0.5))
        h, w = (side, side) if side * side == n else (1, n)
        return tensor.transpose(1, 2).reshape(b, c, h, w)

    def codec(self, conditioning: Optional[dict[str, Any]], where: Path, pipeline: Optional[Path] = None,
              device: torch.device | str = "cpu", models: Sequence[tuple[Any, Path | str]] = ()) -> Codec:
        """The teacher pipeline's VAE, text encoder(s) and tokenizer(s), checked against the model's record and
        ``models``: an SDXL pipeline's where the directory is one (``stable_diffusion_xl.resolve_xl_parts``), else
        Stable Diffusion's (``stable_diffusion.resolve_parts``)."""
        from o2mcli.models.families.stable_diffusion import resolve_parts
        from o2mcli.models.families.stable_diffusion_xl import is_xl_pipeline, resolve_xl_parts

        cond = conditioning or {}
        root = pipeline if pipeline is not None else cond.get("pipeline")
        if root is not None and is_xl_pipeline(Path(root)):
            return resolve_xl_parts(cond, where, pipeline, device, models)
        return resolve_parts(cond, where, pipeline, device, models)

    def pipeline(self, model: nn.Module, scheduler: Any, parts: Any = None) -> Any:
        """The pipeline of this UNet and its codec's parts: a ``StableDiffusionPipeline``, or for an SDXL UNet a
        ``StableDiffusionXLPipeline`` (the codec builds it, checking the UNet fits its parts)."""
        if parts is None or not parts.latent:
            raise O2MError("a UNet2DConditionModel's pipeline needs its VAE, text encoder and tokenizer (codec)")
        return parts.make_pipeline(model, scheduler)

    def save_pipeline(self, pipe: Any, folder: Path, parts: Any = None) -> None:
        """The pipeline, with the teacher's VAE, text encoder(s) and tokenizer(s) files copied byte for byte
        (``SDParts.copy_parts``), so the export's parts hash as the teacher's."""
        pipe.save_pretrained(folder, safe_serialization=True)
        if parts is not None:
            parts.copy_parts(folder)


def _inputs(model: nn.Module, x_t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, Optional[dict[str, Any]]]:
    """The text tokens to pass (checked to be (B, L, D); zeros of CLIP's length standing in) and, for SDXL, the
    ``added_cond_kwargs`` (pooled text and time ids; zeros and the target size's ids standing in)."""
    cfg = getattr(model, "module", model).config
    cond = as_condition(cond, "tokens")
    text = None if cond is None else cond.tokens
    b = x_t.shape[0]
    if text is None:
        text = torch.zeros(b, SHAPE_TOKENS, _cross_dim(cfg), device=x_t.device, dtype=x_t.dtype)
    if text.ndim != 3:
        raise O2MError(f"a UNet2DConditionModel takes text embeddings (batch, tokens, dim), got shape "
                       f"{tuple(text.shape)}")
    if not is_text_time(cfg):
        return text, None
    pooled = None if cond is None else cond.pooled
    ids = None if cond is None else cond.ids
    if pooled is None:
        pooled = torch.zeros(b, pooled_width(cfg), device=x_t.device, dtype=x_t.dtype)
    if ids is None:
        h, w = x_t.shape[-2:]
        ids = target_time_ids(VAE_FACTOR * h, VAE_FACTOR * w, b, x_t.device, x_t.dtype)
    return text, {"text_embeds": pooled, "time_ids": ids}


def _cross_dim(cfg: Any) -> int:
    """The text embedding width a built model's config expects."""
    return _width(cfg.cross_attention_dim)
