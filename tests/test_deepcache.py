"""DeepCache at sampling time (issue #15, item 1): the partial forward against diffusers' own full forward, the
1:N schedule and its counts, the student-group owner rule, guidance's two halves, score's averaged MACs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, make_model_stage, ok, tiny_scheduler, tiny_unet
from o2mcli.diffusion.deepcache import CachedDenoiser, DeepCacheCounts, DeepCacheSpec, is_full_step
from o2mcli.manifest import read_manifest
from o2mcli.models.families import family_of

SAMPLE = ["--scheduler", "ddim", "--steps", "10", "--device", "cpu", "--no-png"]


def _tiny_sd_unet():
    from sd_tiny import tiny_sd_pipeline

    return tiny_sd_pipeline()[0]


def _calls(module: torch.nn.Module) -> list:
    """Append to the returned list each time ``module`` runs (a spy independent of the code under test)."""
    seen: list = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


# 1. The partial forward ---------------------------------------------------------------------------------------------

def _check_partial_equals_full(net, x, t, cond, call_full):
    fam = family_of(net)
    ref = call_full(x, t)  # diffusers' own forward, not o2m's
    x2 = torch.randn_like(x)
    mid = _calls(net.mid_block)
    for b in range(len(net.down_blocks)):
        full, cache = fam.deepcache_predict(net, x, t, cond, b, None)
        assert torch.equal(full, ref)  # a full step is the plain forward, bit for bit
        before = len(mid)
        part, _ = fam.deepcache_predict(net, x, t, cond, b, cache)
        assert len(mid) == before  # the partial step skips the deep blocks...
        torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-6)  # ...and, on a fresh cache, equals the full step
        # A stale cache (computed at another input) is used, not ignored: the output moves off the full forward.
        _, stale = fam.deepcache_predict(net, x2, t, cond, b, None)
        moved, _ = fam.deepcache_predict(net, x, t, cond, b, stale)
        assert not torch.allclose(moved, ref, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("channels,classes", [((4, 8), None), ((4, 8, 8), None), ((4, 8), 3)])
def test_partial_equals_full_unet2d(channels, classes):
    from o2mcli.models.configs import unet_config
    from o2mcli.models.io import build_unet

    torch.manual_seed(0)
    if classes is None:
        net = tiny_unet(block_out_channels=channels)
        labels = None
    else:
        cfg = unet_config(sample_size=8, channels=1, block_out_channels=channels, norm_num_groups=2,
                          num_classes=classes)
        net = build_unet(cfg, None, Path("c"))
        labels = torch.tensor([0, 2])
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor(600)
    _check_partial_equals_full(net, x, t, labels,
                               lambda a, s: net(a, s, class_labels=labels).sample)


@torch.no_grad()
def test_partial_equals_full_unet2d_condition():
    net = _tiny_sd_unet()
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 7, 32)
    _check_partial_equals_full(net, x, torch.tensor(300), text,
                               lambda a, s: net(a, s, encoder_hidden_states=text).sample)


def test_branch_out_of_range_and_dit_refused_by_family():
    from dit_tiny import tiny_dit
    from o2mcli.errors import O2MError

    net = tiny_unet()
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(O2MError, match="2 down blocks"):
        family_of(net).deepcache_predict(net, x, torch.tensor(1), None, 2, None)
    dit = tiny_dit()
    with pytest.raises(O2MError, match="DeepCache needs a UNet; DiTTransformer2DModel has no skip branches"):
        family_of(dit).deepcache_predict(dit, x, torch.tensor(1), None, 0, None)


# 2. The schedule ----------------------------------------------------------------------------------------------------

def test_schedule_counts():
    assert [i for i in range(10) if is_full_step(i, 3)] == [0, 3, 6, 9]
    assert all(is_full_step(i, 1) for i in range(5))


def test_n1_is_bitwise_plain_sampling(tiny_model_file):
    from o2mcli.diffusion.sampler import sample_images
    from o2mcli.models.io import load_model

    loaded = load_model(tiny_model_file, torch.device("cpu"))
    args = (loaded.unet, "ddim", loaded.scheduler_config, 6, 5, 3, 0, torch.device("cpu"))
    plain = sample_images(*args, show_progress=False)
    counts = DeepCacheCounts()
    one = sample_images(*args, show_progress=False, deepcache=DeepCacheSpec(1), counts=counts)
    assert np.array_equal(plain, one)
    assert (counts.full, counts.partial) == (12, 0)  # 2 batches x 6 steps
    three = sample_images(*args, show_progress=False, deepcache=DeepCacheSpec(3))
    assert not np.array_equal(plain, three)  # caching does change the trajectory (quality: the FID in the notes)


def test_n3_on_the_teacher_counts_and_manifest(tmp_path):
    from o2mcli.chain import BUILTIN_MODELS
    from o2mcli.models.io import load_model

    # Spy on the shipped teacher's deep and shallow blocks, independently of the sampler's own counts.
    loaded = load_model(BUILTIN_MODELS["digits-teacher"], torch.device("cpu"))
    mid, head = _calls(loaded.unet.mid_block), _calls(loaded.unet.conv_out)
    from o2mcli.diffusion.sampler import sample_images

    counts = DeepCacheCounts()
    sample_images(loaded.unet, "ddim", loaded.scheduler_config, 10, 4, 4, 0, torch.device("cpu"),
                  show_progress=False, deepcache=DeepCacheSpec(3), counts=counts)
    assert (len(mid), len(head)) == (4, 10)
    assert (counts.full, counts.partial) == (4, 6)

    out = ok("sample", "digits-teacher", *SAMPLE, "-n", "6", "-b", "4", "--deepcache", "3", "-o", tmp_path / "s")
    assert "4 full" not in out and "8 full, 12 partial" in out  # two batches of 10 steps
    man = read_manifest(tmp_path / "s")
    assert man.config["deepcache"] == 3 and man.config["cache_branch"] is None
    assert man.summary["deepcache"] == {"interval": 3, "branch": 0, "full_calls": 8, "partial_calls": 12}


@pytest.mark.parametrize("kind", ["class", "text"])
def test_guidance_cache_holds_both_halves(kind):
    """Guided DeepCache on the concatenated batch equals two separate caches, one per branch, combined by hand."""
    from o2mcli.diffusion.sampler import denoise
    from o2mcli.diffusion.schedulers import make_scheduler, set_steps
    from o2mcli.models.configs import unet_config
    from o2mcli.models.io import build_unet

    torch.manual_seed(0)
    if kind == "class":
        net = build_unet(unet_config(sample_size=8, channels=1, block_out_channels=(4, 8), norm_num_groups=2,
                                     num_classes=3), None, Path("c"))
        noise = torch.randn(2, 1, 8, 8)
        cond, uncond, uncond_rows = torch.tensor([0, 2]), 3, torch.tensor([3, 3])
    else:
        net = _tiny_sd_unet()
        noise = torch.randn(2, 4, 8, 8)
        cond, uncond = torch.randn(2, 7, 32), torch.randn(1, 7, 32)
        uncond_rows = uncond.expand(2, 7, 32)
    sc, w, spec = tiny_scheduler(), 3.0, DeepCacheSpec(2)
    with torch.no_grad():
        counts = DeepCacheCounts()
        got = denoise(net, "ddim", sc, 5, noise, cond=cond, guidance=w, uncond=uncond, deepcache=spec, counts=counts)
        sched = make_scheduler("ddim", sc)
        set_steps(sched, 5)
        cond_cache, uncond_cache = CachedDenoiser(spec), CachedDenoiser(spec)
        x = noise.clone()
        for t in sched.timesteps:
            e_c = cond_cache(net, x, t, cond)
            e_u = uncond_cache(net, x, t, uncond_rows)
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
        want = x.clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # batched vs split float rounding, x w
    assert (counts.full, counts.partial) == (3, 2)  # one call per step: both halves share it
    assert cond_cache.counts.partial == 2


def test_group_owner_change_forces_a_full_step(tmp_path):
    from o2mcli.diffusion.schedulers import make_scheduler, set_steps

    stage = make_model_stage(tmp_path / "students", "students", ranges=((0, 500), (500, 1000)))
    ok("sample", stage, *SAMPLE, "-n", "2", "--deepcache", "3", "-o", tmp_path / "s")
    # Expected from the schedule: full where 3 divides the step or the serving student changed.
    sched = make_scheduler("ddim", tiny_scheduler())
    set_steps(sched, 10)
    owner = [int(int(t) >= 500) for t in sched.timesteps]
    full = sum(1 for i in range(10) if i % 3 == 0 or owner[i] != owner[i - 1])
    assert 0 < sum(owner) < 10 and full > 4  # the change falls off the 1:3 grid, so it adds a full step
    s = read_manifest(tmp_path / "s").summary
    assert s["deepcache"]["full_calls"] == full and s["deepcache"]["partial_calls"] == 10 - full
    assert s["served"] == [2 * (10 - sum(owner)), 2 * sum(owner)]


# 3. score -----------------------------------------------------------------------------------------------------------

def test_score_averages_macs_over_the_calls_made(tmp_path, tiny_model_file):
    from o2mcli.models.io import load_model
    from o2mcli.models.stats import count_block_macs

    ok("sample", tiny_model_file, *SAMPLE, "-n", "20", "-b", "8", "--deepcache", "3", "-o", tmp_path / "dc")
    ok("sample", tiny_model_file, *SAMPLE, "-n", "20", "-b", "8", "-o", tmp_path / "plain")
    ok("score", tmp_path / "dc", tmp_path / "plain", "--throughput-batch", "4", "--throughput-steps", "4",
       "--throughput-repeats", "1", "--device", "cpu", "-o", tmp_path / "sc")
    rows = {r["name"]: r for r in json.loads((tmp_path / "sc" / "report.json").read_text())["rows"]}
    dc = rows["dc"]["deepcache"]
    assert rows["plain"]["deepcache"] is None
    assert (dc["full_calls"], dc["partial_calls"]) == (12, 18)  # 3 batches x (4 full, 6 partial)
    # Independently: a partial step of branch 0 runs the embedding, conv_in, down block 0, the last up block and
    # the head, so its MACs are those blocks' MACs in the full forward.
    blocks = count_block_macs(load_model(tiny_model_file, torch.device("cpu")).unet)
    full_macs = sum(blocks.values())
    partial_macs = sum(v for k, v in blocks.items()
                       if k in ("time_embedding", "conv_in", "down_blocks.0", "up_blocks.1", "conv_out"))
    assert partial_macs < full_macs
    assert rows["dc"]["macs"] == rows["plain"]["macs"] == full_macs
    assert dc["partial_macs"] == partial_macs
    assert dc["macs"] == pytest.approx((12 * full_macs + 18 * partial_macs) / 30)
    assert rows["dc"]["throughput"]["deepcache"] == {"interval": 3, "branch": 0}
    assert "deepcache" not in rows["plain"]["throughput"]
    md = (tmp_path / "sc" / "report.md").read_text()
    assert "MACs w/ DeepCache (G)" in md and "DeepCache N=3 B=0" in md


# 4. Refusals --------------------------------------------------------------------------------------------------------

def test_refusals(tmp_path, tiny_model_file):
    from dit_tiny import tiny_dit
    from o2mcli.models.io import save_model_file

    dit = tmp_path / "dit.safetensors"
    save_model_file(dit, tiny_dit(), tiny_scheduler(), kind="teacher")
    assert_refused(cli("sample", dit, *SAMPLE, "-n", "1", "--deepcache", "3", "-o", tmp_path / "a"),
                   "dit.safetensors", "DeepCache needs a UNet", "no skip branches")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache", "3", "--cache-branch", "2",
                       "-o", tmp_path / "b"), "--cache-branch 2", "2 down blocks", "0..1")
    for n in ("0", "-1"):
        assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache", n, "-o", tmp_path / "c"),
                       f"--deepcache {n}")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--cache-branch", "1", "-o", tmp_path / "d"),
                   "--cache-branch 1", "--deepcache")
    assert not any((tmp_path / x).exists() for x in "abcd")
    from o2mcli.errors import O2MError

    with pytest.raises(O2MError, match="at least 1"):
        DeepCacheSpec(0)
    with pytest.raises(O2MError, match="0 or more"):
        DeepCacheSpec(2, -1)


def test_stable_diffusion_cli_guided(tmp_path):
    """A text model end to end: guided (7.5, one batched call per step), counts in the manifest, N=1 = plain."""
    pytest.importorskip("transformers")
    from sd_tiny import save_tiny_sd

    sd = save_tiny_sd(tmp_path / "sd")
    args = ["--prompt", "a red cat", "-n", "2", "--steps", "4", "--device", "cpu", "--no-png"]
    ok("sample", sd, *args, "-o", tmp_path / "plain")
    ok("sample", sd, *args, "--deepcache", "1", "-o", tmp_path / "n1")
    ok("sample", sd, *args, "--deepcache", "2", "--cache-branch", "1", "-o", tmp_path / "n2")
    s = read_manifest(tmp_path / "n2").summary
    assert s["guidance"] == 7.5
    assert s["deepcache"] == {"interval": 2, "branch": 1, "full_calls": 2, "partial_calls": 2}
    images = {d: np.load(tmp_path / d / "samples.npz")["images"] for d in ("plain", "n1", "n2")}
    assert np.array_equal(images["plain"], images["n1"])
    assert not np.array_equal(images["plain"], images["n2"])


def test_an_interval_past_the_steps_is_noted_once_the_run_is_good(in_tmp: Path, tiny_model_file: Path) -> None:
    """--deepcache N >= --steps: the cache is never refreshed; said before sampling (and never for a refused run,
    tests/test_family_contract.py)."""
    r = cli("sample", str(tiny_model_file), "-n", "2", "--steps", "3", "--deepcache", "5", "--device", "cpu",
            "--no-png", "-o", "s")
    assert r.exit_code == 0 and "--deepcache 5 is not below --steps 3" in r.stderr
