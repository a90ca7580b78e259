"""Feature extractors for FID/KID, behind one interface and a name registry.

Every extractor follows clean-fid's own pipeline, so it can also be handed to clean-fid itself
(``cleanfid.fid.compute_fid(..., custom_feat_extractor=ex.model, custom_fn_resize=ex.resize)``):

1. images (N, C, H, W) in [0, 1] -> 0..255 floats, H x W x 3 (grayscale replicated, as clean-fid's
   loader converts every image to RGB);
2. ``resize``: one image at a time (clean-fid's ``custom_fn_resize``);
3. ``model``: a batch (N, 3, h, w) of 0..255 floats -> (N, dim) features (clean-fid's
   ``custom_feat_extractor``), run through ``cleanfid.fid.get_batch_features``.

Extractors:
``digits``    the 64-d feature layer of the shipped digits classifier (pre-activation, standardised
              with the training digits' statistics); 1x8x8 images only.
``inception`` clean-fid's Inception-v3 (``InceptionV3W``, the TorchScript port of the TF FID network),
              "clean" mode: PIL bicubic resize to 299 on float images. Needs the weights file
              ``inception-2015-12-05.pt`` given by path: o2m never downloads.
``auto``      ``digits`` for 1x8x8 data, else ``inception``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.registry import Registry

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_DIM = 2048
DIGITS_SHAPE = (1, 8, 8)


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


class FeatureExtractor:
    """Images in [0, 1] (N, C, H, W) -> features (N, dim), clean-fid style (see the module docstring)."""

    name: str = ""
    dim: int = 0
    description: str = ""

    def __init__(self, device: torch.device, batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size

    # clean-fid's two hooks -------------------------------------------------------------------
    def resize(self, img: np.ndarray) -> np.ndarray:
        """One H x W x 3 image of 0..255 values -> the network's input size, float32 (``custom_fn_resize``)."""
        raise NotImplementedError

    def model(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) 0..255 floats on ``device`` -> (N, dim) features (``custom_feat_extractor``)."""
        raise NotImplementedError

    # o2m's interface -----------------------------------------------------------------------------
    def check_shape(self, shape: tuple[int, int, int]) -> None:
        """Refuse image shapes (C, H, W) this extractor cannot take, with a one-line reason."""

    def classify(self, images_u8: np.ndarray) -> np.ndarray | None:
        """Predicted class per image (N, H, W, C) uint8, where the extractor is a classifier; else None."""
        return None

    def info(self) -> dict:
        """What the report records about this extractor."""
        return {"name": self.name, "dim": self.dim, "description": self.description}

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Features (N, dim) as float64 of images (N, C, H, W) in [0, 1]."""
        from cleanfid.fid import get_batch_features

        x = torch.as_tensor(images)
        if x.ndim != 4:
            raise O2MError(f"{self.name} features: expected images (N, C, H, W), got shape {tuple(x.shape)}")
        self.check_shape(tuple(x.shape[1:]))
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = (x[start:start + self.batch_size].detach().to("cpu", torch.float32) * 255.0).clamp(0, 255)
            hwc = chunk.permute(0, 2, 3, 1).numpy()
            if hwc.shape[-1] == 1:
                hwc = np.repeat(hwc, 3, axis=-1)
            resized = np.stack([self.resize(im) for im in hwc]).astype(np.float32)
            batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()
            out.append(get_batch_features(batch, self.model, self.device))
        if not out:
            return np.zeros((0, self.dim), np.float64)
        return np.concatenate(out).astype(np.float64)


# 1. digits: the shipped classifier's penultimate layer --------------------------------------------

class DigitsExtractor(FeatureExtractor):
    """The 64-d feature layer (before the ReLU and the logits) of ``o2mcli/assets/digits_classifier.safetensors``."""

    name = "digits"

    def __init__(self, device: torch.device, batch_size: int = 256, weights: Optional[Path] = None) -> None:
        from o2mcli.scoring.classifier import ASSET, FEATURE_DIM, load_classifier

        super().__init__(device, batch_size)
        self.weights = Path(weights) if weights else ASSET
        net, meta = load_classifier(self.weights)
        self.net = net.to(device).eval()
        self.meta = meta
        self.dim = FEATURE_DIM
        self.description = (f"{self.dim}-d feature layer of the shipped digits classifier, pre-activation, "
                            f"standardised on the training digits; held-out accuracy {meta.get('heldout_accuracy', '?')}")

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if tuple(int(s) for s in shape) != DIGITS_SHAPE:
            raise O2MError(f"the digits feature extractor takes 1x8x8 images (the bundled digits), got "
                           f"{_fmt_shape(shape)} images; use --features inception for other data")

    def resize(self, img: np.ndarray) -> np.ndarray:
        return np.asarray(img, dtype=np.float32)  # the classifier sees the images at their own 8x8 size

    @torch.no_grad()
    def classify(self, images_u8: np.ndarray) -> np.ndarray:
        """The digits classifier's argmax (it was trained on the digits, independently of any diffusion model)."""
        x = torch.from_numpy(np.ascontiguousarray(images_u8.transpose(0, 3, 1, 2))).float().mean(1, keepdim=True)
        out = [self.net(b.to(self.device) / 255.0).argmax(1).cpu() for b in x.split(self.batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def model(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != (3, 8, 8):
            raise O2MError(f"the digits feature extractor takes 8x8 images, got {_fmt_shape(batch.shape[2:])}")
        gray = batch.float().mean(1, keepdim=True) / 255.0  # exact for replicated grayscale
        return self.net.features(gray.to(self.device))

    def info(self) -> dict:
        from o2mcli.fsutil import sha256_file

        return {**super().info(), "weights": str(self.weights), "weights_sha256": sha256_file(self.weights),
                "architecture": self.meta.get("architecture")}


# 2. inception: clean-fid's TorchScript Inception-v3, loaded from a local file ---------------------

def inception_offline_help() -> str:
    """How to provide the Inception weights without o2m downloading anything."""
    from cleanfid.downloads_helper import inception_url

    return (f"on a machine with network access download {inception_url} (the file clean-fid fetches, "
            f"e.g. curl -LO {inception_url}), copy {INCEPTION_FILE} here and pass "
            f"--inception-weights PATH/{INCEPTION_FILE}; o2m never downloads. For 1x8x8 digits, "
            "--features digits needs no download")


def load_inception(weights: Optional[Path], device: torch.device) -> nn.Module:
    """clean-fid's ``InceptionV3W`` wrapper around a local ``inception-2015-12-05.pt``, never downloading."""
    from cleanfid.inception_torchscript import InceptionV3W

    if weights is None:
        raise O2MError(f"--features inception needs clean-fid's Inception weights: {inception_offline_help()}")
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise O2MError(f"--inception-weights {weights}: no such file; {inception_offline_help()}")
    try:
        if path.name == INCEPTION_FILE:
            # clean-fid's own constructor, with the download switched off.
            wrapper = InceptionV3W(str(path.parent), download=False, resize_inside=False)
        else:
            # Same wrapper for a file saved under another name (its constructor joins the fixed name).
            wrapper = InceptionV3W.__new__(InceptionV3W)
            nn.Module.__init__(wrapper)
            wrapper.base = torch.jit.load(str(path), map_location="cpu").eval()
            wrapper.layers = wrapper.base.layers
            wrapper.resize_inside = False
    except (RuntimeError, ValueError, OSError, AttributeError) as e:
        raise O2MError(f"{path}: not clean-fid's TorchScript Inception ({INCEPTION_FILE}): "
                       f"{' '.join(str(e).split())[:160]}") from e
    return wrapper.to(device).eval()


class InceptionExtractor(FeatureExtractor):
    """2048-d pool features of clean-fid's Inception-v3, "clean" mode (PIL bicubic resize to 299)."""

    name = "inception"
    dim = INCEPTION_DIM

    def __init__(self, device: torch.device, batch_size: int = 32, weights: Optional[Path] = None) -> None:
        from cleanfid.resize import build_resizer

        super().__init__(device, batch_size)
        self.net = load_inception(weights, device)
        self.weights = Path(weights)
        self._resize = build_resizer("clean")
        self.description = (f"{self.dim}-d pool3 features of clean-fid's Inception-v3 ({INCEPTION_FILE}), "
                            "clean-fid 'clean' mode: PIL bicubic resize to 299x299")

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if int(shape[0]) not in (1, 3):
            raise O2MError(f"the inception feature extractor takes grayscale or RGB images, got "
                           f"{_fmt_shape(shape)} ({int(shape[0])} channels)")

    def resize(self, img: np.ndarray) -> np.ndarray:
        return self._resize(np.asarray(img, dtype=np.float32))

    @torch.no_grad()
    def model(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.float().to(self.device))

    def info(self) -> dict:
        from o2mcli.fsutil import sha256_file

        w = self.weights / INCEPTION_FILE if self.weights.is_dir() else self.weights
        return {**super().info(), "weights": str(w.resolve()), "weights_sha256": sha256_file(w)}


# 3. The registry -------------------------------------------------------------------------------------

EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("--features", "feature extractor", extra=("auto",))
EXTRACTORS.register("digits", lambda device, inception_weights=None: DigitsExtractor(device))
EXTRACTORS.register("inception", lambda device, inception_weights=None: InceptionExtractor(device,
                                                                                          weights=inception_weights))


def available() -> list[str]:
    """Names accepted by ``--features``."""
    return EXTRACTORS.names()


def resolve_name(name: str, shape: Optional[tuple[int, int, int]] = None) -> str:
    """``auto`` -> ``digits`` for 1x8x8 images, else ``inception``; other names are checked."""
    if name == "auto":
        if shape is None:
            raise O2MError("--features auto needs the image shape to choose an extractor")
        return "digits" if tuple(int(s) for s in shape) == DIGITS_SHAPE else "inception"
    EXTRACTORS.resolve(name)  # an unknown name is the one-line error
    return name


def get_extractor(name: str, inception_weights: Optional[Path] = None, device: torch.device | str = "cpu",
                  shape: Optional[tuple[int, int, int]] = None) -> FeatureExtractor:
    """The extractor called ``name`` (``auto`` chooses by ``shape``) on ``device``."""
    from o2mcli.devices import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return EXTRACTORS[resolve_name(name, shape)](dev, inception_weights=inception_weights)
