"""Samplers from diffusers, built from a model's DDPM scheduler config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from o2mcli.diffusion.gaussian import DiffusionTerms, check_variance_type
from o2mcli.models.parametrization import check_prediction_type
from o2mcli.errors import O2MError
from o2mcli.registry import Registry


def _ddpm(cfg: dict[str, Any]):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(cfg)


def _ddim(cfg: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(cfg)


def _dpmpp(cfg: dict[str, Any]):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)


SAMPLERS: Registry[Callable[[dict[str, Any]], Any]] = Registry("--scheduler", "sampler")
SAMPLERS.register("ddpm", _ddpm)
SAMPLERS.register("ddim", _ddim)
SAMPLERS.register("dpm++", _dpmpp)


def make_scheduler(name: str, base_config: dict[str, Any]):
    """``ddpm`` (ancestral, learned variance honoured), ``ddim`` (eta 0) or ``dpm++`` (DPM-Solver++ 2M)."""
    build = SAMPLERS.resolve(name)
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name != "ddpm":
        # DDIM and DPM-Solver use only eps: the sampler loop drops learned-variance channels itself,
        # because diffusers' DPM-Solver slices a hard-coded 3 channels for learned variance.
        cfg = {k: v for k, v in cfg.items() if k != "variance_type"}
    try:
        return build(cfg)
    except NotImplementedError as e:  # e.g. DDIM and DPM-Solver have no "laplace" or "sigmoid" beta_schedule
        raise O2MError(f"--scheduler {name}: the model's scheduler config does not fit it ({e}); "
                       "try --scheduler ddpm") from e


def schedule_terms(base_config: dict[str, Any]) -> DiffusionTerms:
    """The DDPM constants of a model's scheduler config (betas as diffusers' DDPMScheduler computes them)."""
    return DiffusionTerms(_ddpm({k: v for k, v in base_config.items() if not k.startswith("_")}).betas)


def uses_learned_variance(name: str, base_config: dict[str, Any]) -> bool:
    """Only the DDPM sampler consumes the variance channels of a learned-variance model."""
    return name == "ddpm" and str(base_config.get("variance_type", "")).startswith("learned")


def scheduler_config_for_outputs(base_config: dict[str, Any], in_channels: int, out_channels: int) -> dict[str, Any]:
    """The scheduler config with the ``variance_type`` a model's output channels imply.

    A C-channel model predicts eps only: a ``learned*`` type becomes ``fixed_small`` (diffusers' DDPM
    default). A 2C-channel model learns its variance: a fixed type becomes ``learned_range`` (improved DDPM).
    """
    cfg = dict(base_config)
    learned_type = str(cfg.get("variance_type", "fixed_small")).startswith("learned")
    if out_channels == in_channels and learned_type:
        cfg["variance_type"] = "fixed_small"
    elif out_channels == 2 * in_channels and not learned_type:
        cfg["variance_type"] = "learned_range"
    return cfg


def set_steps(sched, steps: int) -> None:
    """``sched.set_timesteps(steps)``, with distinct timesteps inside [0, T - 1].

    diffusers' "linspace" spacing rounds ``linspace(0, T-1, steps+1)``, which repeats a timestep when
    steps = T (500 twice for T = 1000). DPM-Solver++'s multistep update divides by the log-SNR gap of
    consecutive steps, so a repeat is 0/0 and every image turns NaN. Then the same spacing is passed
    without repeats. "leading" spacing adds ``steps_offset`` unchecked, so a legal offset with many steps
    reaches T (an IndexError): that grid is shifted down to end at T - 1.
    """
    import inspect

    import numpy as np

    sched.set_timesteps(steps)
    T = int(sched.config.num_train_timesteps)
    ts = [int(t) for t in sched.timesteps]
    if min(ts) < 0 or max(ts) >= T or (len(set(ts)) < len(ts) and not any(
            getattr(sched.config, k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                        "use_beta_sigmas", "use_lu_lambdas"))):
        # (a solver spacing its own sigmas steps by them: a rounded timestep repeating is harmless there)
        over = max(ts) - (T - 1)
        if len(set(ts)) == len(ts) and over > 0 and min(ts) - over >= 0:
            # "leading" spacing plus steps_offset runs past the last timestep (SD's offset 1 at steps = T; an
            # IndexError in diffusers' step): the same grid, shifted down to end at T - 1.
            wanted = [t - over for t in ts]
        else:
            wanted = [int(t) for t in np.unique(np.linspace(0, T - 1, min(steps, T)).round().astype(int))[::-1]]
        if "timesteps" in inspect.signature(sched.set_timesteps).parameters:
            sched.set_timesteps(timesteps=wanted)
        else:  # DDIM takes no custom timesteps; its step reads only these and the (kept) spacing T // steps
            import torch

            sched.timesteps = torch.tensor(wanted, dtype=torch.int64)
    if hasattr(sched, "set_begin_index"):
        # Step i is timestep i: DPM-Solver otherwise finds its place by looking the first timestep up, and a
        # repeated one (Karras or beta sigmas at many steps) starts it one step late, past its last sigma.
        sched.set_begin_index(0)


def teacher_reverse_settings(sched: dict, where: Path) -> tuple[str, float | None]:
    """(variance_type, x0 clip range or None) of the teacher's reverse step, as diffusers' DDPMScheduler reads them."""
    check_prediction_type(sched.get("prediction_type"), f"{where}: scheduler config")
    if sched.get("thresholding", False):
        raise O2MError(f"{where}: scheduler config sets thresholding (dynamic thresholding) which o2m's reverse step "
                       "does not implement")
    variance = str(sched.get("variance_type", "fixed_small"))
    check_variance_type(variance, f"{where}: scheduler config")
    if not sched.get("clip_sample", True):
        return variance, None
    clip = sched.get("clip_sample_range", 1.0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0 or clip == float("inf"):
        raise O2MError(f"{where}: scheduler config clip_sample_range {clip!r} must be a positive number")
    return variance, float(clip)
