"""A Stable Diffusion pipeline directory's parts (issue #13): the UNet (the denoiser), and the VAE, text encoder and
tokenizer that stages use around it, read offline from safetensors, with the text and latent maps they need.

The layout is diffusers' SD 1.x / 2.x one: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``. SDXL (two text encoders, added time ids) is refused by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.fsutil import loads_bounded, sha256_file
from o2mcli.models.codec import Codec
from o2mcli.models.conditioning import pipeline_record
from o2mcli.models.configs import check_int_in
from o2mcli.models.families.base import build_from_config

PIPELINE = "StableDiffusionPipeline"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ENCODERS = (("text_encoder", "tokenizer"),)  # each text encoder's folder and its tokenizer's
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
# A tokenizer whose vocabulary is smaller than a byte-level BPE's alphabet cannot spell prompts (CLIP's has 49408)
MIN_VOCAB = 256
# Words of one length with distinct first letters: any working tokenizer encodes them apart, even when it keeps a
# single token of each (model_max_length 3); one that maps unknown text to one id (or to nothing) does not.
PROBES = ("cat", "dog", "sun", "red")
# UNet config keys whose inputs a StableDiffusionPipeline never passes (it gives text embeddings alone): the forward
# pass needs them, or ignores the text
EXTRA_INPUTS = (("addition_embed_type", "added embeddings (SDXL: pooled text and time ids)"),
                ("class_embed_type", "class labels"), ("num_class_embeds", "class labels"),
                ("encoder_hid_dim_type", "projected image or text embeddings"))


# Decoded a few latents at a time: SD's decoder at 512 px holds gigabytes of activations per handful of images.
DECODE_BATCH = 8


@dataclass
class SDParts(Codec):
    """The pipeline's parts on one device, and each weight file's sha256 (stages refer to the unchanged VAE and
    text encoder by path and hash rather than copying them): the codec of a Stable Diffusion UNet."""

    root: Path
    unet: nn.Module | None
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    hashes: dict[str, str] = field(default_factory=dict)
    latent = True
    encoders = ENCODERS  # (text encoder, tokenizer) folders, in the order their hashes and files are handled

    @property
    def factor(self) -> int:
        """How many pixels one latent spans per side (SD's VAE: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = shape
        return int(self.vae.config.out_channels), self.factor * h, self.factor * w

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a ``size`` x ``size`` denoiser input."""
        return int(self.vae.config.latent_channels), size, size

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        z = samples.to(next(self.vae.parameters()).dtype)
        return torch.cat([decode_latents(self.vae, z[i:i + DECODE_BATCH]) for i in range(0, len(z), DECODE_BATCH)])

    def encode_images(self, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_images(self.vae, images01, generator)

    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Text embeddings (N, L, D), see :func:`encode_prompts`."""
        return encode_prompts(self, prompts, batch_size)

    def to(self, device: torch.device | str) -> "SDParts":
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    def prompts_to(self, device: torch.device | str) -> "SDParts":
        self.text_encoder.to(device)
        return self

    def cache_record(self) -> dict[str, Any]:
        parts = ["vae", *(name for pair in self.encoders for name in pair)]
        return {**{p: self.hashes[p] for p in parts}, "latent": "posterior mean"}

    def make_pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        """A ``StableDiffusionPipeline`` of ``unet`` and these parts (no safety checker: o2m's students are research
        models, and diffusers would otherwise ask for one), once ``unet`` is checked to fit them."""
        from diffusers import StableDiffusionPipeline

        # (a foreign UNet given --pipeline records no hashes: else a broken pipeline)
        check_unets_fit(Path(self.root), [({**unet.config, "_class_name": type(unet).__name__},
                                           "the UNet to export")])
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def copy_parts(self, folder: Path) -> None:
        """The VAE, text encoder(s) and tokenizer(s) files copied byte for byte into an export: they are unchanged,
        and transformers re-serialises a tokenizer with its load arguments (``local_files_only``), which would change
        its sha256. So the export's parts hash as the teacher's, and it serves as ``--pipeline`` for any other
        student of that teacher."""
        import shutil

        src = Path(self.root)
        for part in ("vae", *(enc for enc, _ in self.encoders)):
            for name in ("config.json", WEIGHTS[part]):
                shutil.copyfile(src / part / name, folder / part / name)
        for _, tok in self.encoders:
            shutil.rmtree(folder / tok)
            (folder / tok).mkdir()
            for f in sorted(p for p in (src / tok).iterdir() if p.is_file()):
                shutil.copyfile(f, folder / tok / f.name)


def _json(path: Path) -> Any:
    try:
        return loads_bounded(path.read_bytes(), str(path))
    except FileNotFoundError as e:
        raise O2MError(f"{path}: missing") from e


def is_sd_pipeline(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline directory whose index names a Stable Diffusion class (SDXL's are
    ``stable_diffusion_xl``'s)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    found = _json(index)
    name = str(found.get("_class_name", "")) if isinstance(found, dict) else ""
    return name.startswith("StableDiffusion") and not name.startswith("StableDiffusionXL")


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


def check_sd_layout(root: Path, models: Sequence[tuple[Any, Path | str]] = ()) -> None:
    """The index names a pipeline class this module serves, every part is there, weights are safetensors, and the
    parts fit each other and ``models`` (``check_sd_parts``)."""
    _check_files(root)
    check_sd_parts(root, models)


def _check_files(root: Path) -> None:
    """The index names a pipeline class this module serves, every part is there, and weights are safetensors."""
    index = _json(root / "model_index.json")
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls != PIPELINE:
        raise O2MError(f"{root}: model_index.json names {cls!r}; expected {PIPELINE}")
    for part in PARTS:
        if not (root / part).is_dir():
            raise O2MError(f"{root}: no {part}/ folder (a Stable Diffusion pipeline has {', '.join(PARTS)})")
    for part in ("unet", "vae", "text_encoder"):
        _weights_path(root / part, part)


def _defaults(cls: Any) -> dict[str, Any]:
    """A diffusers class's constructor defaults: what ``from_config`` uses for a key a config leaves out."""
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _config(folder: Path, cls: Any) -> dict[str, Any]:
    """A part's ``config.json`` (bounded JSON, an object) over its class's defaults."""
    found = _json(folder / "config.json")
    if not isinstance(found, dict):
        raise O2MError(f"{folder / 'config.json'}: a JSON {type(found).__name__}, expected an object")
    return {**_defaults(cls), **found}


def _text_config(root: Path, part: str = "text_encoder") -> Any:
    """A text encoder's ``CLIPTextConfig`` (bounded JSON; transformers' defaults for what it leaves out)."""
    from transformers import CLIPTextConfig

    folder = root / part
    found = _json(folder / "config.json")
    if not isinstance(found, dict):
        raise O2MError(f"{folder / 'config.json'}: a JSON {type(found).__name__}, expected an object")
    try:
        config = CLIPTextConfig.from_dict(found)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise O2MError(f"{folder}: invalid CLIP text config ({e})") from e
    sizes = {k: getattr(config, k, None) for k in ("hidden_size", "max_position_embeddings", "vocab_size")}
    for key, hi in (("hidden_size", 16384), ("max_position_embeddings", 16384), ("vocab_size", 10_000_000)):
        check_int_in(sizes, key, 1, hi, folder, "CLIP text config")
    return config


def check_text_only(cfg: dict[str, Any], where: Path | str, allow_text_time: bool = False) -> None:
    """A UNet a StableDiffusionPipeline can drive: one that takes the text embeddings and nothing else (SDXL's
    UNet, with added text and time embeddings, needs inputs this pipeline never passes). ``allow_text_time``: SDXL's
    added pooled text and time ids are taken too (the family feeds them; an SDXL pipeline passes them)."""
    for key, what in EXTRA_INPUTS:
        if allow_text_time and key == "addition_embed_type" and cfg.get(key) == "text_time":
            continue
        if cfg.get(key) is not None:
            raise O2MError(f"{where}: {key} {cfg[key]!r} needs {what}, which a StableDiffusionPipeline does not "
                           "pass (text embeddings only); an SDXL UNet needs its StableDiffusionXLPipeline")


def _cross_dims(cfg: dict[str, Any]) -> list[Any]:
    """The text widths a UNet config attends to (diffusers allows one per block)."""
    d = cfg.get("cross_attention_dim", 1280)
    return list(d) if isinstance(d, (list, tuple)) else [d]


def load_tokenizer(root: Path, part: str = "tokenizer") -> Any:
    """The pipeline's CLIP tokenizer (``part``), offline; files it cannot read, or its vocabulary missing, are one
    line."""
    from transformers import CLIPTokenizer

    folder = root / part
    files = {p.name for p in folder.iterdir() if p.is_file()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        have = ", ".join(sorted(files)) or "nothing"
        raise O2MError(f"{folder}: no vocabulary (neither tokenizer.json nor vocab.json with merges.txt; it holds "
                       f"{have})")
    for name in sorted(files):
        if name.endswith(".json"):
            _json(folder / name)  # bounded size and depth before transformers parses it
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is a refusal, not a crash
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise O2MError(f"{folder}: not a readable CLIP tokenizer ({type(e).__name__}: {reason})") from e


def check_tokenizer(tokenizer: Any, folder: Path, text: Any, text_where: Path) -> None:
    """A tokenizer the text encoder can take (every id inside its vocabulary, every sequence inside its positions)
    that tells prompts apart: a degenerate one (a handful of tokens, every prompt the same ids) would have
    prompts silently ignored."""
    vocab = tokenizer.get_vocab()
    if len(vocab) < MIN_VOCAB:
        raise O2MError(f"{folder}: a vocabulary of {len(vocab)} tokens (at least {MIN_VOCAB}, a byte-level BPE's "
                       "alphabet, are needed to spell prompts; CLIP's has 49408): are its vocabulary files missing?")
    top = max(vocab.values())
    if top >= text.vocab_size:
        raise O2MError(f"{folder}: token ids up to {top} but {text_where} has vocab_size {text.vocab_size} (ids past "
                       "it index outside its embedding table)")
    length = tokenizer.model_max_length
    if not isinstance(length, int) or not 3 <= length <= text.max_position_embeddings:
        unset = " (tokenizer_config.json does not set it?)" if isinstance(length, int) and length > 1e9 else ""
        raise O2MError(f"{folder}: model_max_length {length}{unset} but {text_where} has max_position_embeddings "
                       f"{text.max_position_embeddings} (expected 3 to {text.max_position_embeddings}; SD: 77)")
    if tokenizer.pad_token_id is None:
        raise O2MError(f"{folder}: no padding token; Stable Diffusion pads every prompt to model_max_length")
    try:
        ids = tokenizer(list(PROBES), padding="max_length", max_length=length, truncation=True).input_ids
    except Exception as e:  # noqa: BLE001 - a foreign tokenizer failing on plain words is a refusal
        raise O2MError(f"{folder}: cannot encode plain words ({type(e).__name__}: {str(e)[:200]})") from e
    bad = [i for row in ids for i in row if not 0 <= i < text.vocab_size]
    if bad:
        raise O2MError(f"{folder}: encodes {PROBES[0]!r} and the like to ids such as {bad[0]}, outside {text_where}'s "
                       f"vocab_size {text.vocab_size}")
    same = [(i, j) for i in range(len(PROBES)) for j in range(i + 1, len(PROBES)) if ids[i] == ids[j]]
    if same:
        i, j = same[0]
        raise O2MError(f"{folder}: encodes the distinct prompts {PROBES[i]!r} and {PROBES[j]!r} to the same ids "
                       f"({', '.join(map(str, ids[i][:4]))}, ...), so prompts would be ignored (a broken or partial "
                       "vocabulary)")


def check_sd_parts(root: Path, models: Sequence[tuple[Any, Path | str]] = ()) -> Any:
    """Check the pipeline's parts against each other from their configs, before any weight is read: the scheduler
    config, the tokenizer against the text encoder (``check_tokenizer``), the VAE (RGB, scaled latents), and each
    UNet against both (``check_unets_fit``): the pipeline's own and ``models``, the (config, where) of the models the
    parts will serve. A mismatch would fail mid-run, or for a tokenizer silently ignore prompts. Returns the
    tokenizer."""
    from o2mcli.models.configs import check_scheduler_config

    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        check_scheduler_config(_json(sched), sched)
    text = _text_config(root)
    tokenizer = load_tokenizer(root)
    check_tokenizer(tokenizer, root / "tokenizer", text, root / "text_encoder")
    check_unets_fit(root, [(_unet_config(root), root / "unet"), *models], text)
    return tokenizer


def _vae_config(root: Path) -> dict[str, Any]:
    """The VAE's config over AutoencoderKL's defaults: RGB in and out, a positive scale and no shift (o2m's latent
    maps divide by ``scaling_factor`` alone, as SD 1.x/2.x do)."""
    from diffusers import AutoencoderKL

    where = root / "vae"
    vae = _config(where, AutoencoderKL)
    for key in ("latent_channels", "in_channels", "out_channels"):
        check_int_in(vae, key, 1, 64, where, "VAE config")
    if vae["in_channels"] != 3 or vae["out_channels"] != 3:
        raise O2MError(f"{where}: in_channels {vae['in_channels']}, out_channels {vae['out_channels']}; a Stable "
                       "Diffusion VAE encodes and decodes RGB images (3 and 3)")
    scale = vae.get("scaling_factor")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and 0 < scale < float("inf")):
        raise O2MError(f"{where}: scaling_factor {scale!r}; expected a positive finite number (SD 1.x: 0.18215)")
    if vae.get("shift_factor") not in (None, 0, 0.0):
        raise O2MError(f"{where}: shift_factor {vae['shift_factor']!r} (an SD3/Flux VAE); o2m's latents are "
                       "scaled only, as SD 1.x/2.x's")
    return vae


def check_unets_fit(root: Path, models: Sequence[tuple[Any, Path | str]], text: Any = None) -> None:
    """Each UNet config of ``models`` ((config, where)) fits the pipeline at ``root``: a text-only
    UNet2DConditionModel whose ``cross_attention_dim`` is the text encoder's width (it attends to the last hidden
    state) and whose channels are the VAE's ``latent_channels`` (out: twice that with a learned variance)."""
    from diffusers import UNet2DConditionModel

    from o2mcli.models.families.unet2d import TEXT_BOUNDS, check_unet_sizes

    text = _text_config(root) if text is None else text
    vae = _vae_config(root)
    latent = vae["latent_channels"]
    for cfg, where in models:
        check_unet_sizes(cfg, where, extra=TEXT_BOUNDS)
        if cfg.get("_class_name") != "UNet2DConditionModel":
            raise O2MError(f"{where}: a {cfg.get('_class_name') or 'UNet2DModel'}; a Stable Diffusion pipeline's "
                           "UNet is a UNet2DConditionModel")
        check_text_only(cfg, where)
        cfg = {**_defaults(UNet2DConditionModel), **cfg}
        for d in _cross_dims(cfg):
            if d != text.hidden_size:
                raise O2MError(f"{root / 'text_encoder'}: hidden_size {text.hidden_size} but {where} takes "
                               f"cross_attention_dim {d} (its cross-attention reads the text encoder's last hidden "
                               "state)")
        if cfg["in_channels"] != latent or cfg["out_channels"] not in (latent, 2 * latent):
            raise O2MError(f"{root / 'vae'}: latent_channels {latent} but {where} has in_channels "
                           f"{cfg['in_channels']} and out_channels {cfg['out_channels']} (expected {latent} in, "
                           f"{latent} out or {2 * latent} with a learned variance)")


def _unet_config(root: Path) -> dict[str, Any]:
    """The pipeline's own UNet config (bounded JSON, an object)."""
    cfg = _json(root / "unet" / "config.json")
    if not isinstance(cfg, dict):
        raise O2MError(f"{root / 'unet' / 'config.json'}: a JSON {type(cfg).__name__}, expected an object")
    return cfg


def tokenizer_digest(folder: Path) -> str:
    """sha256 over the tokenizer folder's files (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def aux_hashes(root: Path, encoders: Sequence[tuple[str, str]] = ENCODERS) -> dict[str, str]:
    """The sha256 of the parts around the UNet (the VAE, each text encoder and its tokenizer): what a student refers
    to."""
    out = {"vae": sha256_file(_weights_path(root / "vae", "vae"))}
    for enc, tok in encoders:
        out[enc] = sha256_file(_weights_path(root / enc, enc))
        out[tok] = tokenizer_digest(root / tok)
    return out


def text_conditioning(root: Path) -> dict[str, Any]:
    """The ``conditioning`` record of a model from the pipeline at ``root``: the pipeline by path and hashes."""
    return pipeline_record(root, aux_hashes(root))


def _load_vae(root: Path) -> tuple[nn.Module, str]:
    from diffusers import AutoencoderKL

    cfg = _json(root / "vae" / "config.json")
    return _checked(root / "vae", "vae", lambda state: build_from_config(AutoencoderKL, cfg, state, root / "vae"))


def _load_text(root: Path, part: str = "text_encoder", model_cls: Any = None) -> tuple[nn.Module, str]:
    """A text encoder (``model_cls``, default ``CLIPTextModel``) from ``root/part``, and its weights' sha256."""
    from transformers import CLIPTextModel

    model_cls = model_cls or CLIPTextModel
    config = _text_config(root, part)

    def build(state: dict[str, torch.Tensor] | None) -> nn.Module:
        try:
            text = model_cls(config)
        except (TypeError, ValueError, KeyError) as e:
            raise O2MError(f"{root / part}: invalid CLIP text config ({e})") from e
        if state is not None:
            state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
            text.load_state_dict(state, strict=False)  # names and shapes matched by the guard, position_ids aside
        return text

    # position_ids: an integer buffer older exports carry (newer transformers rebuild it); the only non-float tensor
    position_ids = lambda k: k.endswith("position_ids")  # noqa: E731
    text, digest = _checked(root / part, part, build, allow_int=position_ids, ignore=position_ids)
    return text, digest


def load_sd_parts(path: Path, device: torch.device | str = "cpu", unet: bool = True,
                  models: Sequence[tuple[Any, Path | str]] = ()) -> SDParts:
    """Every part of a Stable Diffusion pipeline directory, built from its configs and exactly matching weights
    once the configs fit each other and ``models`` (``check_sd_parts``); ``unet=False``: all but the UNet, which o2m
    loads as a model input."""
    from diffusers import UNet2DConditionModel

    from o2mcli.models.families.unet2d import TEXT_BOUNDS, check_unet_sizes

    root = Path(path)
    _check_files(root)
    tokenizer = check_sd_parts(root, models)
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
    text, hashes["text_encoder"] = _load_text(root)
    hashes["tokenizer"] = tokenizer_digest(root / "tokenizer")
    sched = _json(root / "scheduler" / "scheduler_config.json")
    return SDParts(root=root, unet=model, vae=vae.to(device).eval(), text_encoder=text.to(device).eval(),
                   tokenizer=tokenizer, scheduler_config=sched, hashes=hashes)


def resolve_parts(conditioning: dict[str, Any], where: Path, pipeline: Path | None = None,
                  device: torch.device | str = "cpu", models: Sequence[tuple[Any, Path | str]] = ()) -> SDParts:
    """The VAE, text encoder and tokenizer a text-conditioned model uses: from ``pipeline`` (``--pipeline``) or the
    pipeline its provenance names, refused unless they are the ones it was made with (sha256) and they fit each
    other and ``models``, the (config, where) of the UNets they will serve (``check_sd_parts``)."""
    root = Path(pipeline) if pipeline is not None else (
        Path(conditioning["pipeline"]) if conditioning.get("pipeline") else None)
    if root is None:
        raise O2MError(f"{where}: a Stable Diffusion UNet that does not name its pipeline; pass --pipeline DIR "
                       "(the pipeline whose VAE and text encoder it was trained with)")
    if not (root / "model_index.json").is_file():
        how = "" if pipeline is not None else " (recorded in its provenance); pass --pipeline DIR"
        raise O2MError(f"{where}: its pipeline {root} is not a Stable Diffusion pipeline directory{how}")
    _check_files(root)
    want = conditioning.get("hashes") or {}
    have = aux_hashes(root)
    for part, digest in want.items():
        if have.get(part) != digest:
            raise O2MError(f"{root}: its {part} differs from the one {where} was made with (sha256 "
                           f"{str(have.get(part))[:12]}, recorded {str(digest)[:12]})")
    return load_sd_parts(root, device, unet=False, models=models)


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
    """Scaled latents of images in [0, 1], (N, 3, H, W): the VAE posterior's mean (what the latent cache stores), or
    with ``generator`` a draw from the posterior, as SD's training does."""
    dist = vae.encode(images01 * 2 - 1).latent_dist
    z = dist.mean if generator is None else dist.mean + dist.std * torch.randn(
        dist.mean.shape, generator=generator).to(dist.mean.device)
    return z * latent_scale(vae)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), from scaled latents."""
    return (vae.decode(latents / latent_scale(vae)).sample / 2 + 0.5).clamp(0, 1)


class SDPipelineFormat:
    """A ``StableDiffusionPipeline`` directory as a model input (``models.io.load_model``): the UNet in ``unet/`` is
    the denoiser, its codec's parts (VAE, text encoder, tokenizer) stay in the directory, named by path and hash."""

    name = PIPELINE

    def claims(self, root: Path) -> bool:
        """Whether ``root``'s index names a Stable Diffusion class (one this format serves, or refuses by name)."""
        return is_sd_pipeline(root)

    def check_layout(self, root: Path) -> None:
        check_sd_layout(root)

    def conditioning(self, root: Path) -> dict[str, Any]:
        return text_conditioning(root)
