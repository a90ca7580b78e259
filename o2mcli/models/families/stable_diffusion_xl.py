"""A Stable Diffusion XL pipeline directory's parts (issue #24): the UNet (the denoiser, ``addition_embed_type``
"text_time"), and the VAE, the two CLIP text encoders and their tokenizers that stages use around it, read offline
from safetensors.

The layout is diffusers' ``StableDiffusionXLPipeline``: ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/`` (CLIP ViT-L, a ``CLIPTextModel``), ``text_encoder_2/`` (OpenCLIP bigG, a
``CLIPTextModelWithProjection``), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``. A prompt's condition is, as
diffusers' ``encode_prompt`` makes it, both encoders' penultimate hidden states concatenated (the tokens the
cross-attention reads) and the second encoder's projected pooled output; the empty prompt gives zeros where the
pipeline sets ``force_zeros_for_empty_prompt`` (SDXL's unconditional branch). Time ids are the target size's
(``unet2d_condition.target_time_ids``). A refiner-only pipeline (no first text encoder) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.condition import Condition
from o2mcli.models.conditioning import pipeline_record
from o2mcli.models.families.base import build_from_config
from o2mcli.models.families.stable_diffusion import (SDParts, _checked, aux_hashes, _json, _load_text, _text_config,
                                                     _unet_config, _vae_config, _weights_path, check_tokenizer,
                                                     load_tokenizer, tokenizer_digest)

PIPELINE = "StableDiffusionXLPipeline"
REFINER = "StableDiffusionXLImg2ImgPipeline"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def is_xl_pipeline(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline directory whose index names an SDXL class."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    found = _json(index)
    return isinstance(found, dict) and str(found.get("_class_name", "")).startswith("StableDiffusionXL")


def _index(root: Path) -> dict[str, Any]:
    found = _json(root / "model_index.json")
    if not isinstance(found, dict):
        raise O2MError(f"{root / 'model_index.json'}: a JSON {type(found).__name__}, expected an object")
    return found


def _check_files(root: Path) -> None:
    """The index names the base SDXL pipeline (a refiner is refused by name), every part is there, and weights are
    safetensors."""
    index = _index(root)
    cls = index.get("_class_name")
    first = index.get("text_encoder")
    if cls == REFINER or (cls == PIPELINE and isinstance(first, list) and first[0] is None):
        raise O2MError(f"{root}: a refiner-only SDXL pipeline ({cls}, no first text encoder); o2m distils the base "
                       f"{PIPELINE}, whose UNet generates from noise")
    if cls != PIPELINE:
        raise O2MError(f"{root}: model_index.json names {cls!r}; expected {PIPELINE}")
    for part in PARTS:
        if not (root / part).is_dir():
            raise O2MError(f"{root}: no {part}/ folder (an SDXL pipeline, {PIPELINE}, has {', '.join(PARTS)})")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _weights_path(root / part, part)


def check_xl_layout(root: Path, models: Sequence[tuple[Any, Path | str]] = ()) -> None:
    """Every part there, safetensors only, and the parts fitting each other and ``models``."""
    _check_files(root)
    check_xl_parts(root, models)


def check_xl_parts(root: Path, models: Sequence[tuple[Any, Path | str]] = ()) -> list[Any]:
    """The parts against each other from their configs, before any weight is read: the scheduler config, each
    tokenizer against its text encoder (one context length for both), the VAE, and each UNet against them
    (:func:`check_xl_unets_fit`). Returns the two tokenizers."""
    from o2mcli.models.configs import check_scheduler_config

    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        check_scheduler_config(_json(sched), sched)
    texts = [_text_config(root, enc) for enc, _ in ENCODERS]
    toks = [load_tokenizer(root, tok) for _, tok in ENCODERS]
    for (enc, tok), text, tokenizer in zip(ENCODERS, texts, toks):
        check_tokenizer(tokenizer, root / tok, text, root / enc)
    if toks[0].model_max_length != toks[1].model_max_length:
        raise O2MError(f"{root}: tokenizer model_max_length {toks[0].model_max_length} but tokenizer_2 "
                       f"{toks[1].model_max_length}; SDXL concatenates both encoders' tokens position by position")
    check_xl_unets_fit(root, [(_unet_config(root), root / "unet"), *models], texts)
    return toks


def check_xl_unets_fit(root: Path, models: Sequence[tuple[Any, Path | str]], texts: Any = None) -> None:
    """Each UNet config of ``models`` fits the pipeline: an SDXL UNet2DConditionModel ("text_time") whose
    ``cross_attention_dim`` is both encoders' widths together, whose pooled width is the second encoder's projection,
    and whose channels are the VAE's ``latent_channels`` (out: twice that with a learned variance)."""
    from o2mcli.models.families.unet2d import TEXT_BOUNDS, check_unet_sizes
    from o2mcli.models.families.text_unet import XL_BOUNDS, is_text_time, pooled_width, width as _width

    texts = texts or [_text_config(root, enc) for enc, _ in ENCODERS]
    width = sum(int(t.hidden_size) for t in texts)
    projection = int(getattr(texts[1], "projection_dim", 0) or 0)
    latent = _vae_config(root)["latent_channels"]
    for cfg, where in models:
        check_unet_sizes(cfg, where, extra=TEXT_BOUNDS + XL_BOUNDS)
        if cfg.get("_class_name") != "UNet2DConditionModel" or not is_text_time(cfg):
            raise O2MError(f"{where}: not an SDXL UNet (a UNet2DConditionModel with addition_embed_type "
                           f"'text_time'); an SDXL pipeline's UNet takes pooled text and time ids")
        if _width(cfg.get("cross_attention_dim", 1280)) != width:
            raise O2MError(f"{root}: text encoders of widths {texts[0].hidden_size} + {texts[1].hidden_size} = "
                           f"{width} but {where} takes cross_attention_dim {cfg.get('cross_attention_dim')}")
        if pooled_width(cfg) != projection:
            raise O2MError(f"{root / 'text_encoder_2'}: projection_dim {projection} but {where} takes pooled text of "
                           f"width {pooled_width(cfg)} (projection_class_embeddings_input_dim less 6 time ids)")
        out = cfg.get("out_channels", cfg.get("in_channels", 4))
        if cfg.get("in_channels", 4) != latent or out not in (latent, 2 * latent):
            raise O2MError(f"{root / 'vae'}: latent_channels {latent} but {where} has in_channels "
                           f"{cfg.get('in_channels', 4)} and out_channels {out}")


def xl_hashes(root: Path) -> dict[str, str]:
    """The sha256 of the parts around the UNet: what a student refers to."""
    return aux_hashes(root, ENCODERS)


def xl_conditioning(root: Path) -> dict[str, Any]:
    """The ``conditioning`` record of a model from the SDXL pipeline at ``root``."""
    return pipeline_record(root, xl_hashes(root))


@dataclass
class SDXLParts(SDParts):
    """An SDXL pipeline's parts: the codec of an SDXL UNet. Packed prompt rows are the tokens (L x D, both encoders'
    penultimate states) followed by the pooled text (P)."""

    text_encoder_2: nn.Module = None  # type: ignore[assignment]
    tokenizer_2: Any = None
    force_zeros: bool = True  # the empty prompt's condition is zeros (SDXL's unconditional branch)
    encoders = ENCODERS

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo:lo + batch_size]
            states, pooled = [], None
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(next(enc.parameters()).device)
                res = enc(ids, output_hidden_states=True)
                if res[0].ndim == 2:  # the projected pooled output (the second encoder's), as diffusers takes it
                    pooled = res[0]
                states.append(res.hidden_states[-2])
            tokens = torch.cat(states, -1)
            if self.force_zeros:
                empty = torch.tensor([p == "" for p in chunk], device=tokens.device)
                tokens = torch.where(empty[:, None, None], torch.zeros_like(tokens), tokens)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            out.append(torch.cat([tokens.flatten(1), pooled], 1))
        return torch.cat(out)

    def unpack(self, rows: torch.Tensor) -> Condition:
        length = int(self.tokenizer.model_max_length)
        width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        return Condition(tokens=rows[:, :length * width].reshape(len(rows), length, width),
                         pooled=rows[:, length * width:])

    def time_ids(self, geometry: torch.Tensor, resolution: int) -> torch.Tensor:
        """SDXL's time ids of training images: each image's own size and crop, then the target size (Podell et al.
        2023, size and crop conditioning; as diffusers' SDXL training script computes them)."""
        target = torch.tensor([[resolution, resolution]], dtype=torch.float32).expand(len(geometry), 2)
        return torch.cat([geometry.float(), target], 1)

    def to(self, device: torch.device | str) -> "SDXLParts":
        super().to(device)
        self.text_encoder_2.to(device)
        return self

    def prompts_to(self, device: torch.device | str) -> "SDXLParts":
        super().prompts_to(device)
        self.text_encoder_2.to(device)
        return self

    def make_pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        """A ``StableDiffusionXLPipeline`` of ``unet`` and these parts."""
        from diffusers import StableDiffusionXLPipeline

        check_xl_unets_fit(Path(self.root), [({**unet.config, "_class_name": type(unet).__name__},
                                              "the UNet to export")])
        return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                         text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                         tokenizer_2=self.tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=self.force_zeros)



def load_xl_parts(path: Path, device: torch.device | str = "cpu", unet: bool = True,
                  models: Sequence[tuple[Any, Path | str]] = ()) -> SDXLParts:
    """Every part of an SDXL pipeline directory, built from its configs and exactly matching weights once the
    configs fit each other and ``models``; ``unet=False``: all but the UNet."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from o2mcli.models.families.text_unet import build_plain

    root = Path(path)
    _check_files(root)
    toks = check_xl_parts(root, models)
    hashes: dict[str, str] = {}
    model = None
    if unet:
        cfg = _unet_config(root)
        model, hashes["unet"] = _checked(root / "unet", "unet", lambda state: _with_state(build_plain(cfg), state))
        model = model.to(device).eval()
    vae_cfg = _json(root / "vae" / "config.json")
    vae, hashes["vae"] = _checked(root / "vae", "vae",
                                  lambda state: build_from_config(AutoencoderKL, vae_cfg, state, root / "vae"))
    text, hashes["text_encoder"] = _load_text(root, "text_encoder", CLIPTextModel)
    text_2, hashes["text_encoder_2"] = _load_text(root, "text_encoder_2", CLIPTextModelWithProjection)
    for tok in ("tokenizer", "tokenizer_2"):
        hashes[tok] = tokenizer_digest(root / tok)
    force = _index(root).get("force_zeros_for_empty_prompt", True)
    return SDXLParts(root=root, unet=model, vae=vae.to(device).eval(), text_encoder=text.to(device).eval(),
                     tokenizer=toks[0], scheduler_config=_json(root / "scheduler" / "scheduler_config.json"),
                     hashes=hashes, text_encoder_2=text_2.to(device).eval(), tokenizer_2=toks[1],
                     force_zeros=bool(force))


def _with_state(model: nn.Module, state: dict[str, torch.Tensor] | None) -> nn.Module:
    if state is not None:
        model.load_state_dict(state, strict=True)  # names and shapes matched by the guard first
    return model


def resolve_xl_parts(conditioning: dict[str, Any], where: Path, pipeline: Path | None = None,
                     device: torch.device | str = "cpu", models: Sequence[tuple[Any, Path | str]] = ()
                     ) -> SDXLParts:
    """An SDXL UNet's codec: from ``pipeline`` (``--pipeline``) or the pipeline its record names, refused unless
    its parts are the ones it was made with (sha256) and they fit each other and ``models``."""
    root = Path(pipeline) if pipeline is not None else (
        Path(conditioning["pipeline"]) if conditioning.get("pipeline") else None)
    if root is None:
        raise O2MError(f"{where}: an SDXL UNet that does not name its pipeline; pass --pipeline DIR (the pipeline "
                       "whose VAE and text encoders it was trained with)")
    if not is_xl_pipeline(root):
        how = "" if pipeline is not None else " (recorded in its provenance); pass --pipeline DIR"
        raise O2MError(f"{where}: its pipeline {root} is not an SDXL pipeline directory{how}")
    _check_files(root)
    have = xl_hashes(root)
    for part, digest in (conditioning.get("hashes") or {}).items():
        if have.get(part) != digest:
            raise O2MError(f"{root}: its {part} differs from the one {where} was made with (sha256 "
                           f"{str(have.get(part))[:12]}, recorded {str(digest)[:12]})")
    return load_xl_parts(root, device, unet=False, models=models)


class SDXLPipelineFormat:
    """A ``StableDiffusionXLPipeline`` directory as a model input: the UNet in ``unet/`` is the denoiser, its codec's
    parts stay in the directory, named by path and hash."""

    name = PIPELINE

    def claims(self, root: Path) -> bool:
        return is_xl_pipeline(root)

    def check_layout(self, root: Path) -> None:
        check_xl_layout(root)

    def conditioning(self, root: Path) -> dict[str, Any]:
        return xl_conditioning(root)
