"""A tiny random Stable Diffusion pipeline built offline, as diffusers' own pipeline tests build theirs.

UNet2DConditionModel with channels (32, 64), a 4-channel AutoencoderKL, a small CLIPTextModel and a CLIP
tokenizer whose vocabulary is written here (no download). Saved with ``save_pretrained`` (safetensors), it is
the SD 1.x directory layout users bring: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "digit", "three", "seven"]


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (the byte-level BPE alphabet CLIP's tokenizer uses), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over a written byte-level BPE vocabulary: the specials, every byte symbol, and WORDS."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    merges = []
    for w in WORDS:  # merge each word letter by letter, so whole words become single tokens
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged] + parts[2:]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def tiny_sd_pipeline(seed: int = 0):
    """The pipeline's parts, random but seeded: (unet, vae, text_encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, max_position_embeddings=77))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False, steps_offset=1)  # SD 1.x's scheduler
    return unet.eval(), vae.eval(), text.eval(), sched


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """The pipeline directory (safetensors weights), as ``StableDiffusionPipeline.save_pretrained`` writes it."""
    from diffusers import StableDiffusionPipeline

    unet, vae, text, sched = tiny_sd_pipeline(seed)
    tok = tiny_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


CAPTIONS = ["a red cat", "a blue dog", "a photo of a digit three", "a photo of a digit seven"]


def save_captioned(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """A captioned image folder in the ecosystem's convention: random RGB images (not square, so they are cropped)
    and metadata.jsonl naming each with one of CAPTIONS in turn."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return folder


def student_config(channels: tuple[int, int] = (16, 32)) -> dict:
    """A diffusers config for a fresh text-conditioned student of the tiny pipeline's teacher."""
    return {"_class_name": "UNet2DConditionModel", "block_out_channels": list(channels), "layers_per_block": 1,
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
            "attention_head_dim": 8, "norm_num_groups": 8}


def save_tiny_clip(folder: Path, seed: int = 0, preprocessor: bool = True) -> Path:
    """A random CLIPModel (hidden 32, 32x32 images in 8x8 patches) with its tokenizer, saved as safetensors."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(folder.parent / f".{folder.name}-vocab").save_pretrained(folder)
    if preprocessor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_sd_unet(**kw):
    """A tiny random SD-style UNet2DConditionModel (text width 32, 8 GroupNorm groups, 8x8 latents); ``kw``
    overrides its config."""
    import torch
    from diffusers import UNet2DConditionModel

    args = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    args.update(kw)
    torch.manual_seed(1)
    return UNet2DConditionModel(**args).eval()


def clip_forward(clip_dir, images, prompts):
    """(model, output) of transformers' own CLIPProcessor + CLIPModel.forward on the images and prompts: no o2m
    code, the reference the CLIP-score tests compare against."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(str(clip_dir), local_files_only=True),
                         tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True))
    inputs = proc(text=prompts, images=[Image.fromarray(im) for im in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model, model(**inputs)
