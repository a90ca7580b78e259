"""The codec a loaded model owns: the map between images and its denoiser's space, and its prompt encoder.

A pixel model's codec is the identity (:data:`PIXELS`): the sampler's output is the image, and it takes no prompts.
A latent text-to-image family (Stable Diffusion) supplies its own, built from the pipeline directory its
``conditioning`` record names (``DenoiserFamily.codec``): a VAE with its scaling, and the text encoder(s). Stages and
data code call these methods and never a family's helpers, so a new latent family brings its codec with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from o2mcli.errors import O2MError
from o2mcli.models.condition import Condition, tokens_condition


class Codec:
    """The identity codec of a pixel model; latent families subclass it."""

    # Whether :meth:`decode` maps the denoiser's samples to images (else the samples are the images, in [-1, 1]).
    latent: bool = False
    # The pipeline directory the parts come from, and each part's sha256 (what a student's record names); set per
    # instance (a latent codec's dataclass fields), so annotated only here.
    root: Optional[Path]
    hashes: dict[str, str]

    def __init__(self) -> None:
        self.root, self.hashes = None, {}

    def image_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of one image from (C, H, W) of one denoiser sample."""
        return tuple(shape)  # type: ignore[return-value]

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, C, H, W), from the denoiser's final samples (a latent codec only)."""
        raise O2MError("a pixel model's samples are its images; there is nothing to decode")

    def encode_images(self, images01: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The denoiser's space of images in [0, 1] (a latent codec only)."""
        raise O2MError("a pixel model takes images as they are; there is nothing to encode")

    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """One packed condition row per prompt (a prompt-conditioned family only; :meth:`unpack` reads them), so a
        table of prompts is one tensor whatever the family."""
        raise O2MError("this model takes no prompts")

    def unpack(self, rows: torch.Tensor) -> Condition:
        """The models' Condition of packed rows (:meth:`encode_prompts`'s): text tokens alone, unless a family's
        codec packs more (SDXL: pooled text and time ids)."""
        return tokens_condition(rows)

    def time_ids(self, geometry: torch.Tensor, resolution: int) -> Optional[torch.Tensor]:
        """Added ids of training images from their (height, width, crop top, crop left), (N, 4), resized and cropped
        to ``resolution``; None for a family without (SDXL: its six time ids)."""
        return None

    def to(self, device: torch.device | str) -> "Codec":
        """Every part on ``device``."""
        return self

    def prompts_to(self, device: torch.device | str) -> "Codec":
        """The prompt encoder(s) alone on ``device`` (embedding a prompt table while the rest stays put)."""
        return self

    def cache_record(self) -> dict[str, Any]:
        """What a latent cache made with this codec must match (its parts' sha256, and how latents are taken)."""
        raise O2MError("a pixel model needs no latent cache")

    def summary(self) -> dict[str, Any]:
        """The pipeline the parts came from, by path and sha256 (a sampling run's manifest records it)."""
        return {"path": None if self.root is None else str(Path(self.root).resolve()),
                "hashes": {k: v for k, v in self.hashes.items() if k != "unet"}}


PIXELS = Codec()
