"""CLIP score (Hessel et al. 2021) of images against their prompts, from local CLIP weights only.

For image ``x`` and its prompt ``c``, with L2-normalised CLIP embeddings ``E_I(x)`` and ``E_T(c)``:

    CLIP score = 100 * max(cos(E_I(x), E_T(c)), 0), averaged over the images,

which is torchmetrics' ``CLIPScore`` (``torchmetrics.functional.multimodal.clip_score``) and the
scaling Stable Diffusion papers report (e.g. ~30 for SD v1.4 with ViT-L/14). Hessel et al.'s own
CLIP-S uses the weight 2.5 instead of 100: CLIP-S = 2.5 / 100 * this number.

Weights come from a local directory holding a transformers ``CLIPModel`` (``config.json`` with
``model_type`` "clip" and ``model.safetensors``, or a safetensors shard index) and its tokenizer
files; the image preprocessing is CLIP's (resize to the vision tower's size, centre crop, CLIP's
mean and std), read from the directory's ``preprocessor_config.json`` when present, else CLIP's
defaults at the model's ``image_size``. Everything is read with ``local_files_only=True`` and
safetensors only: o2m never downloads and never unpickles.
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
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough for a CLIP tokenizer
SCALING_TEXT = "100 * max(cos(image, text), 0), averaged (torchmetrics' CLIPScore; Hessel et al.'s CLIP-S = 0.025 x)"


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)`` of row-matched embeddings (N, D) x (N, D) -> (N,)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise O2MError(f"CLIP score: image and text embeddings must be matched (N, D), got "
                       f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    a = image_emb.double() / image_emb.double().norm(dim=-1, keepdim=True)
    b = text_emb.double() / text_emb.double().norm(dim=-1, keepdim=True)
    return (SCALE * (a * b).sum(-1)).clamp_min(0.0)


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
    """Refuse (one line) anything but a local CLIPModel directory with safetensors weights and a tokenizer.

    Returns the config and the weight files (one file, or the shards an index names), in order.
    """
    root = Path(path).expanduser()
    flag = f"--clip-weights {path}"
    if not root.exists():
        raise O2MError(f"{flag}: no such directory (a local transformers CLIPModel directory; o2m never downloads)")
    if not root.is_dir():
        raise O2MError(f"{flag}: not a directory (expected a transformers CLIPModel directory with config.json, "
                       f"{WEIGHTS} and the tokenizer files)")
    if not (root / "config.json").is_file():
        raise O2MError(f"{flag}: no config.json (expected a transformers CLIPModel directory)")
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
    if not any((root / n).is_file() for n in TOKENIZER_FILES):
        raise O2MError(f"{flag}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); save the CLIP tokenizer "
                       "or processor into the same directory")
    return cfg, files


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

    def info(self) -> dict[str, Any]:
        """What the report records about the CLIP model and the scaling."""
        return {"weights": str(self.root.resolve()), "weights_sha256": self.sha256, "image_size": self.image_size,
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
        """Mean and std of the per-image CLIP score, with the count of prompts cut to CLIP's context length."""
        if len(prompts) != len(images_u8):
            raise O2MError(f"CLIP score: {len(images_u8)} images but {len(prompts)} prompts")
        text, cut = self.text_embeddings(prompts)
        per = clip_scores(self.image_embeddings(images_u8), text)
        return {"mean": float(per.mean()), "std": float(per.std(unbiased=False)), "n": int(per.numel()),
                "truncated_prompts": int(cut)}


def _pooled(out: Any) -> torch.Tensor:
    """The projected embedding, whether transformers returns a tensor (4.x) or an output object (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(path: Path, device: torch.device | str = "cpu", batch_size: int = 32) -> ClipScorer:
    """The CLIP model, tokenizer and image processor of a local directory (checked by :func:`check_clip_dir`)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    root = Path(path).expanduser()
    cfg, files = check_clip_dir(root)
    vision = cfg.get("vision_config") or {}
    text = cfg.get("text_config") or {}
    image_size = int(vision.get("image_size", 224))
    max_tokens = int(text.get("max_position_embeddings", 77))
    with _quiet_transformers():
        try:
            model, found = CLIPModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise O2MError(f"{root}: not a loadable CLIPModel ({' '.join(str(e).split())[:200]})") from e
        # from_pretrained only warns (and initialises randomly) where weights are missing or misshapen: refuse.
        missing = sorted(k for k in found.get("missing_keys", ()) if not k.endswith("position_ids"))
        bad = sorted(str(k[0] if isinstance(k, tuple) else k) for k in found.get("mismatched_keys", ()))
        if missing or bad:
            raise O2MError(f"{root}: the weights do not match config.json ("
                           + (f"{len(missing)} missing, e.g. {missing[0]}" if missing else f"misshapen {bad[0]}")
                           + "); not a complete CLIPModel")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise O2MError(f"{root}: unreadable CLIP tokenizer ({' '.join(str(e).split())[:200]})") from e
        if (root / "preprocessor_config.json").is_file():
            try:
                processor = CLIPImageProcessor.from_pretrained(str(root), local_files_only=True)
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise O2MError(f"{root / 'preprocessor_config.json'}: unreadable "
                               f"({' '.join(str(e).split())[:200]})") from e
            preprocessing = "preprocessor_config.json"
        else:
            # CLIP's own preprocessing (its class defaults are OpenAI CLIP's mean and std), at the model's size.
            processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})
            preprocessing = f"CLIP defaults at {image_size}px (no preprocessor_config.json)"
    crop = getattr(processor, "crop_size", None)  # a dict (transformers 4.x) or a SizeDict (5.x)
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else \
        (getattr(crop, "height", None), getattr(crop, "width", None))
    if getattr(processor, "do_center_crop", True) and crop_hw != (image_size, image_size):
        raise O2MError(f"{root / 'preprocessor_config.json'}: crops to {crop_hw[0]}x{crop_hw[1]} but the vision "
                       f"tower takes {image_size}x{image_size} images")
    preprocessing += (f": resize shortest side, centre crop {image_size}, mean "
                      f"{[round(float(v), 4) for v in processor.image_mean]}, std "
                      f"{[round(float(v), 4) for v in processor.image_std]}")
    dev = torch.device(device)
    return ClipScorer(model=model.to(dev).eval(), tokenizer=tokenizer, processor=processor, root=root,
                      sha256=weights_digest(files), image_size=image_size, max_tokens=max_tokens,
                      preprocessing=preprocessing, device=dev, batch_size=batch_size)
