"""DPM-Solver++ at both ends (issue 11): as many steps as T, and no denormal slowdown."""

from __future__ import annotations

import torch

from conftest import tiny_scheduler, tiny_unet
from o2mcli.diffusion.sampler import denoise, sample_images
from o2mcli.diffusion.schedulers import make_scheduler, set_steps


def test_timesteps_are_distinct_at_every_step_count() -> None:
    """diffusers' linspace spacing repeats t=500 at 1000 steps; a repeat is a 0/0 in DPM-Solver++'s update."""
    for steps in (1, 2, 7, 20, 333, 999, 1000):
        sched = make_scheduler("dpm++", tiny_scheduler("fixed", T=1000))
        set_steps(sched, steps)
        ts = [int(t) for t in sched.timesteps]
        assert len(set(ts)) == len(ts) == steps and ts == sorted(ts, reverse=True), steps


def test_dpmpp_with_as_many_steps_as_T_samples_the_shipped_teacher(in_tmp) -> None:
    """The red-team case: `--steps 1000 --scheduler dpm++` on the shipped teacher ended in "non-finite values"."""
    import numpy as np

    from conftest import cli

    res = cli("sample", "digits-teacher", "-n", "1", "--steps", "1000", "--scheduler", "dpm++", "--device", "cpu",
              "--no-png", "-o", "s")
    assert res.exit_code == 0, res.output
    with np.load(in_tmp / "s" / "samples.npz") as z:
        images = next(iter(z.values()))
    assert np.isfinite(images).all() and images.std() > 0.05  # a picture, not a constant


def test_sampling_flushes_denormals() -> None:
    """Denormal floats cost CPU kernels 2x-70x (measured); sampling turns on flush-to-zero."""
    torch.set_flush_denormal(False)
    sample_images(tiny_unet("fixed", attention=False), "dpm++", tiny_scheduler(), 2, 1, 1, 0, torch.device("cpu"),
                  show_progress=False)
    assert float(torch.tensor([1e-39]) * 1.0) == 0.0
