"""CLIP score (Hessel et al. 2021) of images against their prompts, from local CLIP weights only.

For images ``x_i`` and their prompts ``c_i`` (i = 1..N), with CLIP embeddings ``E_I(x_i)`` and ``E_T(c_i)`` and
``cos_i = cos(E_I(x_i), E_T(c_i))``:

    CLIP score = max(100 * mean_i cos_i, 0),

torchmetrics' ``CLIPScore`` (``torchmetrics.multimodal.CLIPScore``: the clamp is on the mean, not on each pair),
the scaling Stable Diffusion papers report (e.g. ~30 for SD v1.4 with ViT-L/14). Beside it, the raw mean cosine
``mean_i cos_i`` (no x100, no clamp), what BK-SDM (Kim et al. 2023) and the O2MKD paper report as "CLIP score"
(SD v1.4: 0.2958, with OpenCLIP ViT-g-14). Hessel et al.'s own CLIP-S is ``2.5 * max(cos, 0)`` per pair.

Weights come from a local directory holding either

* a transformers ``CLIPModel`` (``config.json`` with ``model_type`` "clip" and ``model.safetensors``, or a
  safetensors shard index), or
* an OpenCLIP model as the Hugging Face laion repos ship it (``open_clip_config.json`` with ``model_cfg``, and
  ``open_clip_model.safetensors``; e.g. ViT-g-14 laion2b_s12b_b42k, BK-SDM's evaluator), converted here to a
  transformers ``CLIPModel``: same towers (GELU, or QuickGELU where ``quick_gelu`` is set), the text pooled at
  the tokenizer's end-of-text token (OpenCLIP's argmax of the ids: the same position for CLIP's vocabulary,
  whose end-of-text token has the highest id), the image pooled at the class token;

and its tokenizer files. The image preprocessing is CLIP's (resize the short side to the vision tower's size,
centre crop, CLIP's mean and std): a transformers directory's ``preprocessor_config.json`` when present, else
CLIP's defaults at the model's ``image_size``; an OpenCLIP directory's ``preprocess_cfg`` (OpenCLIP's defaults
where it is silent). Everything is read with ``local_files_only=True`` and safetensors only: o2m never downloads
and never unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from o2mcli.errors import O2MError

SCALE = 100.0  # torchmetrics' CLIPScore; Hessel et al.'s CLIP-S uses 2.5
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLED = ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough for a CLIP tokenizer
FORMATS = {"transformers": "transformers CLIPModel", "open_clip": "OpenCLIP (converted to a transformers CLIPModel)"}
SCALING_TEXT = ("max(100 * mean(cos(image, text)), 0), the mean over the images clamped at 0 (torchmetrics' "
                "CLIPScore; Hessel et al.'s CLIP-S = 2.5 * max(cos, 0) per pair); 'CLIP cos' is the raw mean cosine "
                "(no x100, no clamp), as BK-SDM and the O2MKD paper report it")


def clip_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row-matched embeddings (N, D) x (N, D) -> (N,), float64 (Hessel et al. 2021)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise O2MError(f"CLIP score: image and text embeddings must be matched (N, D), got "
                       f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    a = image_emb.double() / image_emb.double().norm(dim=-1, keepdim=True)
    b = text_emb.double() / text_emb.double().norm(dim=-1, keepdim=True)
    return (a * b).sum(-1)


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair ``100 * cos`` (N,), not clamped: torchmetrics clamps only their mean (:func:`clip_score`)."""
    return SCALE * clip_cosines(image_emb, text_emb)


def clip_score(cosines: torch.Tensor) -> float:
    """torchmetrics' CLIPScore of per-pair cosines (N,): ``max(100 * mean(cos), 0)``."""
    if cosines.ndim != 1 or cosines.numel() == 0:
        raise O2MError(f"CLIP score: expected N >= 1 cosines, got shape {tuple(cosines.shape)}")
    return max(SCALE * float(cosines.double().mean()), 0.0)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading progress bars and info logs off while loading, restored after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _json(path: Path) -> Any:
    from o2mcli.fsutil import loads_bounded

    try:
        return loads_bounded(path.read_bytes(), str(path))
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e


def check_clip_dir(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """Refuse (one line) anything but a local CLIP directory with safetensors weights and a tokenizer: a
    transformers CLIPModel, or an OpenCLIP model (``open_clip_config.json`` + ``open_clip_model.safetensors``).

    A directory holding both (the laion repos ship both) is read as the transformers model.
    Returns the transformers config (for OpenCLIP, converted from its ``model_cfg``, without token ids) and the
    weight files (one file, or the shards an index names), in order; :func:`clip_format` tells the two apart.
    """
    root = Path(path).expanduser()
    flag = f"--clip-weights {path}"
    if not root.exists():
        raise O2MError(f"{flag}: no such directory (a local transformers CLIPModel or OpenCLIP directory; o2m never "
                       "downloads)")
    if not root.is_dir():
        raise O2MError(f"{flag}: not a directory (expected a transformers CLIPModel directory with config.json, "
                       f"{WEIGHTS} and the tokenizer files, or an OpenCLIP one with {OPEN_CLIP_CONFIG} and "
                       f"{OPEN_CLIP_WEIGHTS})")
    transformers_weights = (root / WEIGHTS).is_file() or (root / INDEX).is_file()
    if (root / OPEN_CLIP_CONFIG).is_file() and not ((root / "config.json").is_file() and transformers_weights):
        cfg, files = _check_open_clip(root, flag)
    else:
        cfg, files = _check_transformers(root, flag)
    if not any((root / n).is_file() for n in TOKENIZER_FILES):
        raise O2MError(f"{flag}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); save the CLIP tokenizer "
                       "or processor into the same directory")
    return cfg, files


def clip_format(files: list[Path]) -> str:
    """'open_clip' or 'transformers': which kind of directory :func:`check_clip_dir` found."""
    return "open_clip" if files[0].name == OPEN_CLIP_WEIGHTS else "transformers"


def _check_transformers(root: Path, flag: str) -> tuple[dict[str, Any], list[Path]]:
    if not (root / "config.json").is_file():
        raise O2MError(f"{flag}: no config.json (expected a transformers CLIPModel directory, or an OpenCLIP one "
                       f"with {OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS})")
    cfg = _json(root / "config.json")
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "clip":
        raise O2MError(f"{flag}: not a CLIP model (config.json model_type {kind!r}; expected 'clip', "
                       "a transformers CLIPModel with text and vision towers)")
    if (root / WEIGHTS).is_file():
        files = [root / WEIGHTS]
    elif (root / INDEX).is_file():
        index = _json(root / INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards or any("/" in s or "\\" in s or s.startswith(".") for s in shards):
            raise O2MError(f"{root / INDEX}: names no usable shard files")
        files = [root / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise O2MError(f"{root / INDEX}: shard {missing[0]} is missing")
    else:
        pickled = [n for n in PICKLED if (root / n).is_file()]
        if pickled:
            raise O2MError(f"{flag}: only {pickled[0]} found; o2m loads safetensors weights only (convert it, e.g. "
                           f"load it once and save_pretrained(..., safe_serialization=True))")
        raise O2MError(f"{flag}: no {WEIGHTS} (o2m loads safetensors weights only)")
    return cfg, files


def _check_open_clip(root: Path, flag: str) -> tuple[dict[str, Any], list[Path]]:
    if not (root / OPEN_CLIP_WEIGHTS).is_file():
        pickled = [n for n in OPEN_CLIP_PICKLED if (root / n).is_file()]
        if pickled:
            raise O2MError(f"{flag}: only {pickled[0]} found (a pickle); o2m loads OpenCLIP weights from "
                           f"{OPEN_CLIP_WEIGHTS} only (the laion repos ship both)")
        raise O2MError(f"{flag}: {OPEN_CLIP_CONFIG} but no {OPEN_CLIP_WEIGHTS} (o2m loads safetensors weights only)")
    found = _json(root / OPEN_CLIP_CONFIG)
    model_cfg = found.get("model_cfg") if isinstance(found, dict) else None
    if not isinstance(model_cfg, dict):
        raise O2MError(f"{root / OPEN_CLIP_CONFIG}: no 'model_cfg' object (expected OpenCLIP's hub config)")
    return open_clip_config(model_cfg, root / OPEN_CLIP_CONFIG), [root / OPEN_CLIP_WEIGHTS]


# OpenCLIP's options that o2m converts, and those it accepts only at OpenCLIP's defaults (anything else changes the
# towers in ways a transformers CLIPModel does not have: layer scale, attentional pooling, timm or HF towers...).
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_OC_TOP_DEFAULTS = {"init_logit_bias": None, "custom_text": False, "nonscalar_logit_scale": False,
                    "cast_dtype": None, "output_dict": False}
_OC_VISION = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout",
              "output_tokens", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
              "timm_model_pretrained", "attn_pooler_queries", "attn_pooler_heads"}
_OC_VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                       "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                       "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                       "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                       "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "hf_tokenizer_name",
            "tokenizer_kwargs", "tokenizer_mode", "pad_id", "eos_id", "pool_type", "output_tokens",
            "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_OC_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                     "final_ln_after_pool": False, "proj_bias": False, "proj_type": "linear", "act_kwargs": None,
                     "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                     "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                     "hf_model_name": None, "use_pad_mask": False, "correct_cls_mask": False}


def _size(v: Any, where: str, most: int = 1 << 20) -> int:
    """A positive integer size (an OpenCLIP size may be a square [n, n] pair)."""
    if isinstance(v, list) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= most:
        raise O2MError(f"{where}: expected a positive integer (or a square [n, n]), got {v!r}")
    return v


def _ratio(v: Any, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e3:
        raise O2MError(f"{where}: expected a positive number, got {v!r}")
    return float(v)


def _known(section: dict[str, Any], converted: set[str], defaults: dict[str, Any], where: str) -> None:
    for k, v in section.items():
        if k in converted:
            continue
        if k not in defaults:
            raise O2MError(f"{where}: OpenCLIP option {k!r} is not supported (o2m converts plain ViT CLIP models)")
        if v != defaults[k] and not (k == "block_type" and v == "default"):
            raise O2MError(f"{where}: OpenCLIP option {k}={v!r} is not supported (o2m converts plain ViT CLIP "
                           f"models; expected {defaults[k]!r})")


def open_clip_config(model_cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """A transformers ``CLIPConfig`` dict for OpenCLIP's ``model_cfg`` (ViT image tower, CLIP text tower).

    OpenCLIP (``open_clip/model.py``, ``transformer.py``): vision heads = width / head_width, MLP width =
    int(width * mlp_ratio), LayerNorm eps 1e-5, ``nn.GELU`` unless ``quick_gelu``; the image pooled at the class
    token after ``ln_post``, the text at the end-of-text token after ``ln_final``, both then projected.
    Token ids are left to :func:`load_clip`, which takes them from the tokenizer.
    """
    w = str(where)
    _known(model_cfg, _OC_TOP, _OC_TOP_DEFAULTS, w)
    vis, txt = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vis, dict) or not isinstance(txt, dict) or "embed_dim" not in model_cfg:
        raise O2MError(f"{w}: model_cfg needs embed_dim, vision_cfg and text_cfg")
    _known(vis, _OC_VISION, _OC_VISION_DEFAULTS, f"{w} vision_cfg")
    _known(txt, _OC_TEXT, _OC_TEXT_DEFAULTS, f"{w} text_cfg")
    if txt.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise O2MError(f"{w} text_cfg: pool_type {txt['pool_type']!r} is not supported (expected 'argmax' or 'eos')")
    quick = model_cfg.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise O2MError(f"{w}: quick_gelu must be true or false, got {quick!r}")
    act = "quick_gelu" if quick else "gelu"
    width = _size(vis.get("width", 768), f"{w} vision_cfg.width")
    head_width = _size(vis.get("head_width", 64), f"{w} vision_cfg.head_width")
    if width % head_width:
        raise O2MError(f"{w} vision_cfg: width {width} is not a multiple of head_width {head_width}")
    t_width = _size(txt.get("width", 512), f"{w} text_cfg.width")
    heads = _size(txt.get("heads", 8), f"{w} text_cfg.heads")
    if t_width % heads:
        raise O2MError(f"{w} text_cfg: width {t_width} is not a multiple of heads {heads}")
    scale = model_cfg.get("init_logit_scale", 2.6592)
    vision_config = {"hidden_size": width, "num_attention_heads": width // head_width,
                     "num_hidden_layers": _size(vis.get("layers", 12), f"{w} vision_cfg.layers", 4096),
                     "intermediate_size": int(width * _ratio(vis.get("mlp_ratio", 4.0), f"{w} vision_cfg.mlp_ratio")),
                     "image_size": _size(vis.get("image_size", 224), f"{w} vision_cfg.image_size"),
                     "patch_size": _size(vis.get("patch_size", 16), f"{w} vision_cfg.patch_size"),
                     "hidden_act": act, "layer_norm_eps": 1e-5}
    text_config = {"hidden_size": t_width, "num_attention_heads": heads,
                   "num_hidden_layers": _size(txt.get("layers", 12), f"{w} text_cfg.layers", 4096),
                   "intermediate_size": int(t_width * _ratio(txt.get("mlp_ratio", 4.0), f"{w} text_cfg.mlp_ratio")),
                   "vocab_size": _size(txt.get("vocab_size", 49408), f"{w} text_cfg.vocab_size"),
                   "max_position_embeddings": _size(txt.get("context_length", 77), f"{w} text_cfg.context_length"),
                   "hidden_act": act, "layer_norm_eps": 1e-5}
    return {"model_type": "clip", "projection_dim": _size(model_cfg["embed_dim"], f"{w} embed_dim"),
            "logit_scale_init_value": float(scale) if isinstance(scale, (int, float)) else 2.6592,
            "vision_config": vision_config, "text_config": text_config,
            "open_clip": {"text_pool_type": txt.get("pool_type", "argmax"), "text_eos_id": txt.get("eos_id")}}


def open_clip_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int,
                         where: Path) -> dict[str, torch.Tensor]:
    """OpenCLIP's CLIP state dict -> transformers ``CLIPModel``'s (float32): ``in_proj`` split into q, k, v;
    ``visual.proj`` and ``text_projection`` ((width, embed) matrices applied as ``x @ P``) transposed into
    ``nn.Linear`` weights. Every key must be used; none may be missing."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise O2MError(f"{where}: no tensor {name!r}; not an OpenCLIP ViT CLIP checkpoint of this config")
        used.add(name)
        return state[name].float()

    def block(src: str, dst: str) -> None:
        w, b = take(f"{src}.attn.in_proj_weight"), take(f"{src}.attn.in_proj_bias")
        if w.ndim != 2 or w.shape[0] % 3 or b.shape != (w.shape[0],):
            raise O2MError(f"{where}: {src}.attn.in_proj has shape {tuple(w.shape)}; expected (3 * width, width)")
        for part, wp, bp in zip(("q", "k", "v"), w.chunk(3), b.chunk(3)):
            out[f"{dst}.self_attn.{part}_proj.weight"], out[f"{dst}.self_attn.{part}_proj.bias"] = wp, bp
        for a, c in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}.{c}.weight"], out[f"{dst}.{c}.bias"] = take(f"{src}.{a}.weight"), take(f"{src}.{a}.bias")

    def matrix(name: str) -> torch.Tensor:
        m = take(name)
        if m.ndim != 2:
            raise O2MError(f"{where}: {name} has shape {tuple(m.shape)}; expected a (width, embed_dim) matrix")
        return m.t().contiguous()

    v, t = "vision_model", "text_model"
    out[f"{v}.embeddings.class_embedding"] = take("visual.class_embedding")
    out[f"{v}.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out[f"{v}.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for a, c in (("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm"),
                 ("ln_final", f"{t}.final_layer_norm")):
        out[f"{c}.weight"], out[f"{c}.bias"] = take(f"{a}.weight"), take(f"{a}.bias")
    for i in range(vision_layers):
        block(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    for i in range(text_layers):
        block(f"transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    out["visual_projection.weight"] = matrix("visual.proj")
    out[f"{t}.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out[f"{t}.embeddings.position_embedding.weight"] = take("positional_embedding")
    out["text_projection.weight"] = matrix("text_projection")
    out["logit_scale"] = take("logit_scale").reshape(())
    extra = sorted(set(state) - used)
    if extra:
        raise O2MError(f"{where}: {len(extra)} tensor(s) the config does not explain, e.g. {extra[0]!r} (layers or "
                       "options other than model_cfg says)")
    return out


def weights_digest(files: list[Path]) -> str:
    """sha256 of the one weight file, or over the shards' names and hashes for a sharded model."""
    from o2mcli.fsutil import sha256_file

    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


@dataclass
class ClipScorer:
    """A loaded CLIPModel, its tokenizer and image processor; :meth:`score` scores images against prompts."""

    model: nn.Module
    tokenizer: Any
    processor: Any
    root: Path
    sha256: str
    image_size: int
    max_tokens: int
    preprocessing: str
    device: torch.device
    batch_size: int = 32
    format: str = "transformers"
    weight_files: tuple[str, ...] = ()
    architecture: str = ""

    def info(self) -> dict[str, Any]:
        """What the report records about the CLIP model (name, format, weights and their hash) and the scaling."""
        return {"name": self.root.resolve().name, "format": self.format, "format_text": FORMATS[self.format],
                "weights": str(self.root.resolve()), "weight_files": list(self.weight_files),
                "weights_sha256": self.sha256, "architecture": self.architecture, "image_size": self.image_size,
                "max_tokens": self.max_tokens, "preprocessing": self.preprocessing, "scaling": SCALING_TEXT,
                "scale": SCALE}

    def pixels(self, images_u8: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, C), C 1 or 3 -> CLIP's input (N, 3, S, S): resized, cropped, normalised."""
        x = np.asarray(images_u8)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise O2MError(f"CLIP score: images must be uint8 (N, H, W, 1 or 3), got {x.dtype} {x.shape}")
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)  # grayscale as RGB, as clean-fid and CLIP's convert("RGB") do
        out = self.processor(images=[np.ascontiguousarray(im) for im in x], return_tensors="pt",
                             input_data_format="channels_last")
        return out["pixel_values"]

    @torch.no_grad()
    def image_embeddings(self, images_u8: np.ndarray) -> torch.Tensor:
        """Projected CLIP image embeddings (N, D), float32 on the CPU (not normalised)."""
        out = []
        for start in range(0, len(images_u8), self.batch_size):
            px = self.pixels(images_u8[start:start + self.batch_size]).to(self.device, torch.float32)
            out.append(_pooled(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    @_quiet_transformers()
    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, int]:
        """Projected CLIP text embeddings (N, D) (not normalised) and how many prompts were cut at ``max_tokens``."""
        out, cut = [], 0
        for start in range(0, len(prompts), self.batch_size):
            chunk = [str(p) for p in prompts[start:start + self.batch_size]]
            full = self.tokenizer(chunk, padding=False, truncation=False)["input_ids"]
            cut += sum(len(ids) > self.max_tokens for ids in full)
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            feats = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                 attention_mask=enc["attention_mask"].to(self.device))
            out.append(_pooled(feats).float().cpu())
        return torch.cat(out), cut

    def score(self, images_u8: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        """torchmetrics' CLIP score (``max(100 * mean cos, 0)``), the raw mean cosine, the std of the per-image
        ``100 * cos``, and the count of prompts cut to CLIP's context length."""
        if len(prompts) != len(images_u8):
            raise O2MError(f"CLIP score: {len(images_u8)} images but {len(prompts)} prompts")
        text, cut = self.text_embeddings(prompts)
        cos = clip_cosines(self.image_embeddings(images_u8), text)
        return {"mean": clip_score(cos), "cosine": float(cos.mean()), "std": float((SCALE * cos).std(unbiased=False)),
                "n": int(cos.numel()), "truncated_prompts": int(cut)}


def _pooled(out: Any) -> torch.Tensor:
    """The projected embedding, whether transformers returns a tensor (4.x) or an output object (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(path: Path, device: torch.device | str = "cpu", batch_size: int = 32) -> ClipScorer:
    """The CLIP model, tokenizer and image processor of a local directory (checked by :func:`check_clip_dir`):
    a transformers CLIPModel as saved, an OpenCLIP one converted (:func:`open_clip_config`,
    :func:`open_clip_state_dict`)."""
    root = Path(path).expanduser()
    cfg, files = check_clip_dir(root)
    fmt = clip_format(files)
    vision = cfg.get("vision_config") or {}
    text = cfg.get("text_config") or {}
    image_size = int(vision.get("image_size", 224))
    max_tokens = int(text.get("max_position_embeddings", 77))
    with _quiet_transformers():
        tokenizer = _tokenizer(root, fmt)
        if fmt == "open_clip":
            model = _open_clip_model(cfg, files[0], tokenizer)
            processor, preprocessing = _open_clip_processor(root, image_size)
        else:
            model = _transformers_model(root)
            processor, preprocessing = _transformers_processor(root, image_size)
    crop = getattr(processor, "crop_size", None)  # a dict (transformers 4.x) or a SizeDict (5.x)
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else \
        (getattr(crop, "height", None), getattr(crop, "width", None))
    if getattr(processor, "do_center_crop", True) and crop_hw != (image_size, image_size):
        raise O2MError(f"{root / 'preprocessor_config.json'}: crops to {crop_hw[0]}x{crop_hw[1]} but the vision "
                       f"tower takes {image_size}x{image_size} images")
    preprocessing += (f": resize shortest side, centre crop {image_size}, mean "
                      f"{[round(float(v), 4) for v in processor.image_mean]}, std "
                      f"{[round(float(v), 4) for v in processor.image_std]}")
    act = vision.get("hidden_act", "quick_gelu")
    architecture = (f"ViT: {vision.get('num_hidden_layers')} layers, width {vision.get('hidden_size')}, patch "
                    f"{vision.get('patch_size')}, {image_size}px; text: {text.get('num_hidden_layers')} layers, width "
                    f"{text.get('hidden_size')}, {max_tokens} tokens; embedding {cfg.get('projection_dim')}; {act}")
    dev = torch.device(device)
    return ClipScorer(model=model.to(dev).eval(), tokenizer=tokenizer, processor=processor, root=root,
                      sha256=weights_digest(files), image_size=image_size, max_tokens=max_tokens,
                      preprocessing=preprocessing, device=dev, batch_size=batch_size, format=fmt,
                      weight_files=tuple(f.name for f in files), architecture=architecture)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _tokenizer(root: Path, fmt: str) -> Any:
    """The directory's CLIP tokenizer (AutoTokenizer; an OpenCLIP directory without tokenizer_config.json gets
    CLIPTokenizer over its tokenizer.json or vocab.json and merges.txt)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    cls = AutoTokenizer if fmt == "transformers" or (root / "tokenizer_config.json").is_file() else CLIPTokenizer
    try:
        return cls.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise O2MError(f"{root}: unreadable CLIP tokenizer ({_short(e)})") from e


def _transformers_model(root: Path) -> nn.Module:
    from transformers import CLIPModel

    try:
        model, found = CLIPModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True,
                                                 dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise O2MError(f"{root}: not a loadable CLIPModel ({_short(e)})") from e
    # from_pretrained only warns (and initialises randomly) where weights are missing or misshapen: refuse.
    missing = sorted(k for k in found.get("missing_keys", ()) if not k.endswith("position_ids"))
    bad = sorted(str(k[0] if isinstance(k, tuple) else k) for k in found.get("mismatched_keys", ()))
    if missing or bad:
        raise O2MError(f"{root}: the weights do not match config.json ("
                       + (f"{len(missing)} missing, e.g. {missing[0]}" if missing else f"misshapen {bad[0]}")
                       + "); not a complete CLIPModel")
    return model


def _open_clip_model(cfg: dict[str, Any], weights: Path, tokenizer: Any) -> nn.Module:
    """A transformers CLIPModel holding an OpenCLIP checkpoint's weights (built on the meta device, then the
    converted tensors assigned: no random initialisation of a billion parameters)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    where = weights.parent / OPEN_CLIP_CONFIG
    text = dict(cfg["text_config"])
    vocab = text["vocab_size"]
    oc = cfg["open_clip"]
    if oc["text_pool_type"] == "eos":
        eos = oc["text_eos_id"]
        if eos == 2:  # transformers pools eos id 2 by argmax (its legacy CLIP configs), not at the first id 2
            raise O2MError(f"{where}: text pool_type 'eos' with eos_id 2 cannot be converted")
    else:  # argmax of the ids: the end-of-text token, CLIP's highest id
        eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab:
        raise O2MError(f"{where}: end-of-text token id {eos!r} is not in the text tower's {vocab} tokens (the "
                       "tokenizer files do not fit this model)")
    in_vocab = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "pad")]
    bos, pad = (i if isinstance(i, int) and 0 <= i < vocab else None for i in in_vocab)
    text.update(eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise O2MError(f"{weights}: unreadable safetensors ({_short(e)})") from e
    sd = open_clip_state_dict(state, cfg["vision_config"]["num_hidden_layers"],
                              cfg["text_config"]["num_hidden_layers"], weights)
    del state
    config = CLIPConfig(text_config=text, vision_config=cfg["vision_config"], projection_dim=cfg["projection_dim"],
                        logit_scale_init_value=cfg["logit_scale_init_value"])
    with torch.device("meta"):
        model = CLIPModel(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise O2MError(f"{weights}: the weights do not match {OPEN_CLIP_CONFIG} ({_short(e)})") from e
    for module in model.modules():  # non-persistent buffers are not in any checkpoint: made here
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise O2MError(f"{weights}: cannot build buffer {name!r} of the converted model")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(tuple(buf.shape)), persistent=False)
    return model.float()


def _transformers_processor(root: Path, image_size: int) -> tuple[Any, str]:
    from transformers import CLIPImageProcessor

    if (root / "preprocessor_config.json").is_file():
        try:
            processor = CLIPImageProcessor.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise O2MError(f"{root / 'preprocessor_config.json'}: unreadable ({_short(e)})") from e
        return processor, "preprocessor_config.json"
    # CLIP's own preprocessing (its class defaults are OpenAI CLIP's mean and std), at the model's size.
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return processor, f"CLIP defaults at {image_size}px (no preprocessor_config.json)"


def _open_clip_processor(root: Path, image_size: int) -> tuple[Any, str]:
    """CLIP's preprocessing with OpenCLIP's ``preprocess_cfg`` (OpenCLIP's defaults, OpenAI CLIP's mean and std,
    bicubic, shortest-side resize and centre crop, where it is silent)."""
    import math

    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    where = root / OPEN_CLIP_CONFIG
    found = _json(where)
    pre = found.get("preprocess_cfg") if isinstance(found, dict) else None
    pre = pre if isinstance(pre, dict) else {}
    mean = pre.get("mean", [0.48145466, 0.4578275, 0.40821073])
    std = pre.get("std", [0.26862954, 0.26130258, 0.27577711])
    for name, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and math.isfinite(x) for x in v)
                and (name == "mean" or all(x > 0 for x in v))):
            raise O2MError(f"{where}: preprocess_cfg.{name} {v!r} is not three finite numbers")
    size = _size(pre.get("size", image_size), f"{where} preprocess_cfg.size")
    if size != image_size:
        raise O2MError(f"{where}: preprocess_cfg.size {size} but the vision tower takes {image_size}x{image_size}")
    modes = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}
    interp, resize = pre.get("interpolation", "bicubic"), pre.get("resize_mode", "shortest")
    if interp not in modes or resize != "shortest" or pre.get("mode", "RGB") != "RGB":
        raise O2MError(f"{where}: preprocess_cfg interpolation {interp!r}, resize_mode {resize!r} not supported "
                       "(o2m resizes the shortest side, bicubic or bilinear, then centre-crops)")
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size},
                                   image_mean=[float(x) for x in mean], image_std=[float(x) for x in std],
                                   resample=modes[interp])
    return processor, f"{OPEN_CLIP_CONFIG} preprocess_cfg ({interp})" if pre else "OpenCLIP defaults (bicubic)"
