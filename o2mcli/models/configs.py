"""Default UNet and scheduler configurations."""

from __future__ import annotations

from typing import Any, Literal

from o2mcli.errors import O2MError

Variance = Literal["fixed", "learned"]


def unet_config(*, sample_size: int, channels: int, variance: Variance = "fixed",
                block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                norm_num_groups: int = 8, attention_level: int | None = 1,
                num_classes: int | None = None) -> dict[str, Any]:
    """A DDPM-style ``UNet2DModel`` config: attention at one level, 2C outputs for learned variance.

    ``num_classes`` K makes it class-conditional: K + 1 class embeddings, the last one the null class that
    classifier-free guidance uses (Ho & Salimans 2022) and label dropout trains.
    """
    n = len(block_out_channels)
    down = ["AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if n - 1 - i == attention_level else "UpBlock2D" for i in range(n)]
    for c in block_out_channels:
        if c % norm_num_groups:
            raise ValueError(f"block_out_channels {block_out_channels} must be multiples of norm_num_groups={norm_num_groups}")
    return {
        "_class_name": "UNet2DModel",
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels * (2 if variance == "learned" else 1),
        "block_out_channels": list(block_out_channels),
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers_per_block,
        "norm_num_groups": norm_num_groups,
        "attention_head_dim": 8,
        **({"num_class_embeds": num_classes + 1} if num_classes else {}),
    }


def scheduler_config(variance: Variance = "fixed", num_train_timesteps: int = 1000,
                     beta_schedule: str = "linear") -> dict[str, Any]:
    """A ``DDPMScheduler`` config (Ho et al. linear betas; improved-DDPM learned range when learned)."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": beta_schedule,
        "variance_type": "learned_range" if variance == "learned" else "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
    }


def is_learned_variance(unet_cfg: Any) -> bool:
    """2C output channels: the model predicts eps and the variance interpolation v.

    The one test of a learned variance, for a config dict or a diffusers ``FrozenDict`` (diffusers'
    defaults, 3 in and 3 out, where a key is missing).
    """
    return int(unet_cfg.get("out_channels", 3)) == 2 * int(unet_cfg.get("in_channels", 3))


# The google/ddpm-cifar10-32 UNet (config.json as published; 35.7M params, 6.1 GMACs), for benchmarks
# on random weights: the papers' reference teacher, without a download.
DDPM_CIFAR10_32: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def check_int_in(cfg: dict, key: str, lo: int, hi: int, where: Any, what: str) -> None:
    """``cfg[key]`` (an integer or a list of them), if present, lies in [lo, hi]; else a one-line error."""
    v = cfg.get(key)
    if v is None:
        return
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals or any(not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi for x in vals):
        raise O2MError(f"{where}: {what} {key} = {v!r}; expected integer(s) in [{lo}, {hi}]")
