"""Default UNet and scheduler configurations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from o2mcli.errors import O2MError
from o2mcli.models.parametrization import check_prediction_type

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
                     beta_schedule: str = "linear", prediction_type: str = "epsilon") -> dict[str, Any]:
    """A ``DDPMScheduler`` config (Ho et al. linear betas; improved-DDPM learned range when learned; eps- or
    v-prediction)."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": beta_schedule,
        "variance_type": "learned_range" if variance == "learned" else "fixed_small",
        "clip_sample": True,
        "prediction_type": prediction_type,
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


def check_int_in(cfg: dict, key: str, lo: int, hi: int, where: Any, what: str, many: bool = False) -> None:
    """``cfg[key]``, if present, is an integer in [lo, hi] (with ``many``, also a non-empty list of them, as UNet
    configs give per-block values); else a one-line error."""
    v = cfg.get(key)
    if v is None:
        return
    if isinstance(v, (list, tuple)) and not many:
        raise O2MError(f"{where}: {what} {key} = {v!r}; expected one integer in [{lo}, {hi}]")
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals or any(not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi for x in vals):
        raise O2MError(f"{where}: {what} {key} = {v!r}; expected integer(s) in [{lo}, {hi}]")


# Scheduler configs ------------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")  # diffusers' DDPMScheduler


# The other scheduler-config fields that o2m's samplers (diffusers' DDPM, DDIM, PNDM, Euler, Euler ancestral, UniPC
# and DPM-Solver++ schedulers) or o2m itself read, and what each may be: a value outside these crashes diffusers
# mid-sampling (an index past T, a quantile outside [0, 1]) or silently changes what the model means.
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
SCHED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                        "learned_range")  # diffusers' names; the reverse step refuses the ones it cannot reproduce
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")  # DPM-Solver maps the last three to midpoint
DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear", "log_linear")  # Euler's sigma interpolation between training timesteps
SCHED_FLAGS = ("clip_sample", "thresholding", "set_alpha_to_one", "lower_order_final", "euler_at_final",
               "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "skip_prk_steps",
               "predict_x0")
SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")  # diffusers takes one at most
SCHED_OFF = {  # flags o2m's eps-prediction DDPM models cannot take: why
    "rescale_betas_zero_snr": "zero terminal SNR makes alpha_bar 0 at the last step, where an eps model gives no x0 "
                              "(it needs v-prediction)",
    "use_flow_sigmas": "flow-matching sigmas are not a DDPM's",
    "use_dynamic_shifting": "dynamic shifting is for flow-matching models",
}


def check_scheduler_config(sched: Any, where: Path) -> int:
    """A DDPM scheduler config diffusers can build and o2m can use, every field o2m's samplers read in its range
    (a crafted ``steps_offset`` indexed past T mid-sampling); returns T."""
    def number(key: str, lo: float, hi: float, lo_open: bool, say: str, inf_ok: bool = False) -> None:
        v = sched.get(key)
        if v is None:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and (
            math.isfinite(v) or inf_ok) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            raise O2MError(f"{where}: scheduler config {key} = {v!r}; expected {say}")

    def one_of(key: str, allowed: tuple[str | None, ...], default: str) -> None:
        v = sched.get(key, default)
        if v not in allowed:
            raise O2MError(f"{where}: scheduler config {key} {v!r} is unknown; expected one of "
                           f"{', '.join('null' if a is None else a for a in allowed)}")

    if not isinstance(sched, dict):
        raise O2MError(f"{where}: the scheduler config is a JSON {type(sched).__name__}, expected an object")
    check_int_in(sched, "num_train_timesteps", 2, 100_000, where, "scheduler config")
    T = int(sched.get("num_train_timesteps", 1000))
    bs = sched.get("beta_schedule", "linear")
    if bs not in BETA_SCHEDULES:
        raise O2MError(f"{where}: scheduler config beta_schedule {bs!r} is unknown; expected one of "
                       f"{', '.join(BETA_SCHEDULES)}")
    for key in ("beta_start", "beta_end"):
        number(key, 0, 1 - 1e-12, True, "a number in (0, 1)")
    check_prediction_type(sched.get("prediction_type"), f"{where}: scheduler config")
    if sched.get("trained_betas") is not None:
        raise O2MError(f"{where}: scheduler config trained_betas is not supported; use a beta_schedule")
    if sched.get("_class_name") is not None and not isinstance(sched["_class_name"], str):
        raise O2MError(f"{where}: scheduler config _class_name = {sched['_class_name']!r}; expected a class name")
    for key in (*SCHED_FLAGS, *SCHED_OFF):
        if sched.get(key) is not None and not isinstance(sched[key], bool):
            raise O2MError(f"{where}: scheduler config {key} = {sched[key]!r}; expected true or false")
    for key, why in SCHED_OFF.items():
        if sched.get(key):
            raise O2MError(f"{where}: scheduler config sets {key}, which o2m does not support ({why})")
    on = [k for k in SIGMA_SPACINGS if sched.get(k)]
    if len(on) > 1:
        raise O2MError(f"{where}: scheduler config sets {' and '.join(on)}; diffusers takes one sigma spacing at most")
    # steps_offset shifts diffusers' "leading" grid: past T - 1 its timesteps index beyond the schedule
    check_int_in(sched, "steps_offset", 0, T - 1, where, "scheduler config")
    one_of("timestep_spacing", TIMESTEP_SPACINGS, "leading")
    one_of("variance_type", (*SCHED_VARIANCE_TYPES, None), "fixed_small")  # null: a DPM-Solver config's default
    one_of("solver_type", SOLVER_TYPES, "midpoint")
    one_of("algorithm_type", DPM_ALGORITHMS, "dpmsolver++")
    one_of("final_sigmas_type", FINAL_SIGMAS_TYPES, "zero")
    if sched.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver") and sched.get("final_sigmas_type",
                                                                                     "zero") == "zero":
        raise O2MError(f"{where}: scheduler config algorithm_type {sched['algorithm_type']!r} needs "
                       "final_sigmas_type 'sigma_min' (diffusers refuses 'zero' for it)")
    check_int_in(sched, "solver_order", 1, 3, where, "scheduler config")
    one_of("interpolation_type", INTERPOLATION_TYPES, "linear")
    if sched.get("timestep_type", "discrete") != "discrete":  # Euler's "continuous": EDM's c_noise = log(sigma) / 4
        raise O2MError(f"{where}: scheduler config timestep_type {sched['timestep_type']!r}: o2m's models take "
                       "discrete DDPM timesteps (expected 'discrete')")
    corrector = sched.get("disable_corrector", [])  # UniPC: the steps that skip its corrector
    if not isinstance(corrector, list) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                              for i in corrector):
        raise O2MError(f"{where}: scheduler config disable_corrector = {corrector!r}; expected a list of step "
                       "indices")
    if sched.get("solver_p") is not None:
        raise O2MError(f"{where}: scheduler config solver_p (UniPC's outside predictor) is not supported")
    number("clip_sample_range", 0, math.inf, True, "a positive finite number (x0 is clipped to [-range, range])")
    number("dynamic_thresholding_ratio", 0, 1, True, "a quantile in (0, 1]")
    number("sample_max_value", 1, math.inf, False, "a finite number >= 1 (the dynamic threshold's upper bound)")
    number("flow_shift", 0, math.inf, True, "a positive finite number")
    number("lambda_min_clipped", -math.inf, 0, False, "a number <= 0, or -inf (no clipping)", inf_ok=True)
    for key in ("sigma_min", "sigma_max"):  # Euler's Karras range (Karras et al. 2022, Eq. 5)
        number(key, 0, math.inf, True, "a positive finite number")
    if sched.get("sigma_min") is not None and sched.get("sigma_max") is not None and \
            not sched["sigma_min"] < sched["sigma_max"]:
        raise O2MError(f"{where}: scheduler config sigma_min {sched['sigma_min']!r} is not below sigma_max "
                       f"{sched['sigma_max']!r}")
    return T
