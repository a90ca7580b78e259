"""Text conditioning in a distillation run (issue #13): prompts or captions turned, once, into the embedding table a
``TextPlan`` indexes, and a captioned folder turned into cached latents.

A training step never runs the VAE encoder or the text encoder: O2MKD trains on the latent cache
(``data/latent_cache.py``) with each image's caption embedding; DKDM gives every buffer slot a prompt of
``--prompts``. Either condition is replaced by the empty prompt's embedding with the caption dropout (the teacher's
recorded one, else SD's 0.1), so the students learn the unconditional branch that classifier-free guidance needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from o2mcli.data.base import ImageSet
from o2mcli.data.labels import TextPlan, text_plan
from o2mcli.errors import O2MError

DEFAULT_CAPTION_DROPOUT = 0.1  # Stable Diffusion 1.x's training drops 10% of the captions


@dataclass(frozen=True)
class LatentSet(ImageSet):
    """Cached latents (N, C, h, w), already in the model's range, with caption ``i`` labelling latent ``i``."""

    def to_model_range(self) -> torch.Tensor:
        """Scaled VAE latents are what the UNet denoises: no change."""
        return self.images


def caption_dropout(conditioning: dict[str, Any], override: Optional[float]) -> float:
    """``--label-dropout`` if given, else the teacher's recorded caption dropout, else SD's 0.1."""
    if override is not None:
        return float(override)
    found = conditioning.get("caption_dropout")
    return DEFAULT_CAPTION_DROPOUT if found is None else float(found)


@torch.no_grad()
def prompt_plan(parts: Any, prompts: list[str], dropout: float, conditioning: dict[str, Any],
                device: torch.device | str = "cpu") -> TextPlan:
    """A plan over ``prompts``: their embeddings and the empty prompt's, from the pipeline's text encoder."""
    from o2mcli.models.families.stable_diffusion import encode_prompts

    parts.text_encoder.to(device)
    emb = encode_prompts(parts, list(prompts) + [""]).float().cpu()
    parts.text_encoder.to("cpu")
    return text_plan(list(prompts), emb[:-1], emb[-1:], dropout, conditioning)


def vae_factor(vae: Any) -> int:
    """How many pixels one latent spans per side (SD's VAE: 8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_cache_dir(data: Path, out: Path, resolution: int) -> Path:
    """Beside the run: ``<out's folder>/<data folder>.latents-<resolution>`` (runs in one folder share it)."""
    return Path(out).resolve().parent / f"{Path(data).resolve().name}.latents-{resolution}"


def captioned_latents(data: Path, parts: Any, latent_size: int, dropout: float, conditioning: dict[str, Any],
                      cache: Optional[Path], out: Path, device: torch.device | str = "cpu"
                      ) -> tuple[LatentSet, TextPlan]:
    """The folder's latents (from the cache, built first if missing or made from other inputs) and the plan over
    its captions; each image is resized and centre-cropped to ``latent_size`` times the VAE's factor."""
    from o2mcli.data.captions import read_captions
    from o2mcli.data.latent_cache import build_cache, load_cache
    from o2mcli.models.families.stable_diffusion import encode_images, encode_prompts

    data = Path(data)
    if not data.is_dir():
        raise O2MError(f"--data {data}: not a folder; a Stable Diffusion teacher distils on a folder of images with "
                       "captions (metadata.jsonl: file_name and text)")
    items = read_captions(data)
    resolution = latent_size * vae_factor(parts.vae)
    cache = Path(cache) if cache is not None else default_cache_dir(data, out, resolution)
    record = {"vae": conditioning["hashes"]["vae"], "text_encoder": conditioning["hashes"]["text_encoder"],
              "tokenizer": conditioning["hashes"]["tokenizer"], "latent": "posterior mean"}
    parts.vae.to(device)
    parts.text_encoder.to(device)
    print(f"latent cache {cache}: {len(items)} captioned images at {resolution}px (built once, then reused)",
          file=sys.stderr)
    build_cache(cache, items, lambda x: encode_images(parts.vae, x.to(device)),
                lambda texts: encode_prompts(parts, texts), record, resolution)
    latents, text = load_cache(cache)
    with torch.no_grad():
        null = encode_prompts(parts, [""]).float().cpu()
    parts.vae.to("cpu")
    parts.text_encoder.to("cpu")
    captions = [it.text for it in items]
    from o2mcli.data.latent_cache import INDEX
    from o2mcli.fsutil import sha256_file

    latent_set = LatentSet(images=latents.float(), name=data.name, source=str(data.resolve()),
                           sha256=sha256_file(cache / INDEX), labels=torch.arange(len(items)),
                           classes=tuple(captions))
    return latent_set, text_plan(captions, text, null, dropout, conditioning)
