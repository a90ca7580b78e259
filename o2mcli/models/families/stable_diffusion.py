"""A Stable Diffusion pipeline directory's parts (issue #13): the UNet (the denoiser), and the VAE, text encoder and
tokenizer that stages use around it, read offline from safetensors, with the text and latent maps they need.

The layout is diffusers' SD 1.x / 2.x one: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``. SDXL (two text encoders, added time ids) is refused by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.fsutil import loads_bounded, sha256_file
from o2mcli.models.families.base import build_from_config

PIPELINE = "StableDiffusionPipeline"
REFUSED = {"StableDiffusionXLPipeline": "SDXL (two text encoders and added time ids) is not supported yet"}
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


@dataclass
class SDParts:
    """The pipeline's parts on one device, and each weight file's sha256 (stages refer to the unchanged VAE and
    text encoder by path and hash rather than copying them)."""

    root: Path
    unet: nn.Module | None
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    hashes: dict[str, str] = field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return loads_bounded(path.read_bytes(), str(path))
    except FileNotFoundError as e:
        raise O2MError(f"{path}: missing") from e


def is_sd_pipeline(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline directory whose index names a Stable Diffusion class."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    found = _json(index)
    return isinstance(found, dict) and str(found.get("_class_name", "")).startswith("StableDiffusion")


def _weights_path(folder: Path, name: str) -> Path:
    """A part's safetensors file; a pickle-only part is refused by name."""
    path = folder / WEIGHTS[name]
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
        if pickled:
            raise O2MError(f"{folder}: only {pickled[0]} (pickle) found; o2m loads safetensors weights only")
        raise O2MError(f"{path}: missing {name} weights")
    return path


def _checked(folder: Path, name: str, build: Callable[[dict[str, torch.Tensor] | None], nn.Module],
             allow_int: Callable[[str], bool] = lambda k: False,
             ignore: Callable[[str], bool] = lambda k: False) -> tuple[nn.Module, str]:
    """A part built by ``build(state)`` from its safetensors weights, once ``build(None)`` on the meta device has
    matched the file's header (floating-point dtypes, bytes, names and shapes; ``models.guard``), and its sha256."""
    from o2mcli.models.guard import build_checked, tensor_header

    path = _weights_path(folder, name)
    digest = sha256_file(path)
    return build_checked(build, path, folder, tensor_header(path, allow_int), ignore), digest


def check_sd_layout(root: Path) -> None:
    """The index names a pipeline class this module serves, every part is there, and weights are safetensors."""
    index = _json(root / "model_index.json")
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls in REFUSED:
        raise O2MError(f"{root}: a {cls}: {REFUSED[cls]}")
    if cls != PIPELINE:
        raise O2MError(f"{root}: model_index.json names {cls!r}; expected {PIPELINE}")
    for part in PARTS:
        if not (root / part).is_dir():
            raise O2MError(f"{root}: no {part}/ folder (a Stable Diffusion pipeline has {', '.join(PARTS)})")
    for part in WEIGHTS:
        _weights_path(root / part, part)


def tokenizer_digest(folder: Path) -> str:
    """sha256 over the tokenizer folder's files (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def aux_hashes(root: Path) -> dict[str, str]:
    """The sha256 of the parts around the UNet (VAE, text encoder, tokenizer): what a student refers to."""
    return {"vae": sha256_file(_weights_path(root / "vae", "vae")),
            "text_encoder": sha256_file(_weights_path(root / "text_encoder", "text_encoder")),
            "tokenizer": tokenizer_digest(root / "tokenizer")}


def text_conditioning(root: Path) -> dict[str, Any]:
    """The ``conditioning`` record of a model from the pipeline at ``root``: the pipeline by path and hashes."""
    return {"type": "text", "pipeline": str(Path(root).resolve()), "hashes": aux_hashes(root),
            "caption_dropout": None}


def _load_vae(root: Path) -> tuple[nn.Module, str]:
    from diffusers import AutoencoderKL

    cfg = _json(root / "vae" / "config.json")
    return _checked(root / "vae", "vae", lambda state: build_from_config(AutoencoderKL, cfg, state, root / "vae"))


def _load_text(root: Path) -> tuple[nn.Module, Any, str]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    try:
        config = CLIPTextConfig.from_json_file(str(root / "text_encoder" / "config.json"))
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise O2MError(f"{root / 'text_encoder'}: invalid CLIP text config ({e})") from e

    def build(state: dict[str, torch.Tensor] | None) -> nn.Module:
        try:
            text = CLIPTextModel(config)
        except (TypeError, ValueError, KeyError) as e:
            raise O2MError(f"{root / 'text_encoder'}: invalid CLIP text config ({e})") from e
        if state is not None:
            state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
            text.load_state_dict(state, strict=False)  # names and shapes matched by the guard, position_ids aside
        return text

    # position_ids: an integer buffer older exports carry (newer transformers rebuild it); the only non-float tensor
    position_ids = lambda k: k.endswith("position_ids")  # noqa: E731
    text, digest = _checked(root / "text_encoder", "text_encoder", build, allow_int=position_ids, ignore=position_ids)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    except (OSError, ValueError) as e:
        raise O2MError(f"{root / 'tokenizer'}: not a readable CLIP tokenizer ({e})") from e
    return text, tokenizer, digest


def load_sd_parts(path: Path, device: torch.device | str = "cpu", unet: bool = True) -> SDParts:
    """Every part of a Stable Diffusion pipeline directory, built from its configs and exactly matching weights
    (``unet=False``: all but the UNet, which o2m loads as a model input)."""
    from diffusers import UNet2DConditionModel

    from o2mcli.models.families.unet2d import TEXT_BOUNDS, check_unet_sizes

    root = Path(path)
    check_sd_layout(root)
    hashes = {}
    model = None
    if unet:
        # (the family's own checks, built here without importing the family, which imports this module)
        cfg = _json(root / "unet" / "config.json")
        check_unet_sizes(cfg, root / "unet", extra=TEXT_BOUNDS)
        model, hashes["unet"] = _checked(root / "unet", "unet", lambda state: build_from_config(
            UNet2DConditionModel, cfg, state, root / "unet"))
        model = model.to(device).eval()
    vae, hashes["vae"] = _load_vae(root)
    text, tokenizer, hashes["text_encoder"] = _load_text(root)
    hashes["tokenizer"] = tokenizer_digest(root / "tokenizer")
    sched = _json(root / "scheduler" / "scheduler_config.json")
    return SDParts(root=root, unet=model, vae=vae.to(device).eval(), text_encoder=text.to(device).eval(),
                   tokenizer=tokenizer, scheduler_config=sched, hashes=hashes)


def resolve_parts(conditioning: dict[str, Any], where: Path, pipeline: Path | None = None,
                  device: torch.device | str = "cpu") -> SDParts:
    """The VAE, text encoder and tokenizer a text-conditioned model uses: from ``pipeline`` (``--pipeline``) or the
    pipeline its provenance names, refused unless they are the ones it was made with (sha256)."""
    root = Path(pipeline) if pipeline is not None else (
        Path(conditioning["pipeline"]) if conditioning.get("pipeline") else None)
    if root is None:
        raise O2MError(f"{where}: a Stable Diffusion UNet that does not name its pipeline; pass --pipeline DIR "
                       "(the pipeline whose VAE and text encoder it was trained with)")
    if not (root / "model_index.json").is_file():
        how = "" if pipeline is not None else " (recorded in its provenance); pass --pipeline DIR"
        raise O2MError(f"{where}: its pipeline {root} is not a Stable Diffusion pipeline directory{how}")
    check_sd_layout(root)
    want = conditioning.get("hashes") or {}
    have = aux_hashes(root)
    for part, digest in want.items():
        if have.get(part) != digest:
            raise O2MError(f"{root}: its {part} differs from the one {where} was made with (sha256 "
                           f"{str(have.get(part))[:12]}, recorded {str(digest)[:12]})")
    return load_sd_parts(root, device, unet=False)


# The maps around the denoiser -------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(parts: SDParts, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Text embeddings (N, L, D): the text encoder's last hidden state over max-length padded tokens (SD's
    conditioning; the empty prompt "" gives the unconditional branch of classifier-free guidance)."""
    tok, dev = parts.tokenizer, next(parts.text_encoder.parameters()).device
    out = []
    for lo in range(0, len(prompts), batch_size):
        ids = tok(prompts[lo:lo + batch_size], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(dev)
        out.append(parts.text_encoder(ids)[0])
    return torch.cat(out)


def latent_scale(vae: nn.Module) -> float:
    """The factor that brings the VAE's latents to unit variance (SD 1.x: 0.18215)."""
    return float(getattr(vae.config, "scaling_factor", 0.18215))


@torch.no_grad()
def encode_images(vae: nn.Module, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of images in [0, 1], (N, 3, H, W): a draw from the VAE posterior (its mean without a
    generator), as SD's training does."""
    dist = vae.encode(images01 * 2 - 1).latent_dist
    z = dist.mean if generator is None else dist.mean + dist.std * torch.randn(
        dist.mean.shape, generator=generator).to(dist.mean.device)
    return z * latent_scale(vae)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), from scaled latents."""
    return (vae.decode(latents / latent_scale(vae)).sample / 2 + 0.5).clamp(0, 1)
