"""A tiny random Stable Diffusion XL pipeline built offline, as diffusers' own SDXL pipeline tests build theirs.

An SDXL-shaped UNet2DConditionModel (channels (32, 64), ``addition_embed_type`` "text_time", per-stage transformer
depths), a 4-channel AutoencoderKL, two small CLIP text encoders (the second with a projection: the pooled text),
and two CLIP tokenizers written here (no download). Saved with ``save_pretrained`` (safetensors), it is the layout
users bring: model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_tiny import tiny_tokenizer

TEXT_1, TEXT_2, PROJECTION, TIME_DIM = 32, 32, 32, 8  # the UNet reads 64-wide tokens and 32 + 6 x 8 added inputs


def unet_config(channels: tuple[int, ...] = (16, 32, 32)) -> dict:
    """An SDXL-shaped UNet config for the tiny pipeline's encoders: SDXL's three stages (no attention, then
    transformer stacks of depth 2 and 8 where SDXL has 2 and 10), two resnets a stage, a cross-attention mid block;
    a student of other widths shares the rest."""
    return {"_class_name": "UNet2DConditionModel", "block_out_channels": list(channels), "layers_per_block": 2,
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": [1, 2, 2],
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_DIM,
            "transformer_layers_per_block": [1, 2, 8],
            "projection_class_embeddings_input_dim": PROJECTION + 6 * TIME_DIM,
            "cross_attention_dim": TEXT_1 + TEXT_2, "norm_num_groups": 8}


def _text_config(hidden: int, projection: int = 0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77,
                          projection_dim=projection or hidden, hidden_act="gelu")


def save_tiny_sdxl(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """The pipeline directory (safetensors weights), as ``StableDiffusionXLPipeline.save_pretrained`` writes it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = {k: v for k, v in unet_config().items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**cfg).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025).eval()
    text = CLIPTextModel(_text_config(TEXT_1)).eval()
    text_2 = CLIPTextModelWithProjection(_text_config(TEXT_2, PROJECTION)).eval()
    tok = tiny_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    tok_2 = tiny_tokenizer(folder.parent / f".{folder.name}-tokenizer-2")
    # SDXL's own scheduler: scaled-linear betas, Euler by default in its pipeline (o2m samples with its own)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, prediction_type=prediction_type,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
