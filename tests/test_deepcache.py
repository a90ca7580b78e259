"""DeepCache at sampling time (issue #15, item 1; layer granularity: issue #25, item 3): the partial forward of every
layer branch against diffusers' own full forward, what it runs and skips (spies), its MACs against the layers it runs
counted one by one, the uniform and non-uniform 1:N schedules and their counts, the student-group owner rule,
guidance's two halves, score's averaged MACs, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_refused, cli, make_model_stage, ok, tiny_scheduler, tiny_unet
from o2mcli.diffusion.deepcache import (CachedDenoiser, DeepCacheCounts, DeepCacheSpec, full_steps, is_full_step,
                                        nonuniform_full_steps, scheduled_calls)
from o2mcli.manifest import read_manifest
from o2mcli.models.condition import Condition
from o2mcli.models.families import family_of

SAMPLE = ["--scheduler", "ddim", "--steps", "10", "--device", "cpu", "--no-png"]


def _tiny_sd_unet():
    from sd_tiny import tiny_sd_pipeline

    return tiny_sd_pipeline()[0]


def _tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel
    from sdxl_tiny import unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**{k: v for k, v in unet_config().items() if not k.startswith("_")}).eval()


def _calls(module: torch.nn.Module) -> list:
    """Append to the returned list each time ``module`` runs (a spy independent of the code under test)."""
    seen: list = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


def _skips(net) -> tuple[list[nn.Module], list[nn.Module]]:
    """Written here from diffusers' res_samples order, not taken from o2m: the module producing each skip (conv_in,
    then per down block its resnets and its downsampler) and the up resnet consuming it (up resnets in call order,
    reversed: the last one takes skip 0)."""
    producers: list[nn.Module] = [net.conv_in]
    for block in net.down_blocks:
        producers += list(block.resnets) + ([block.downsamplers[0]] if block.downsamplers is not None else [])
    consumers = [r for block in net.up_blocks for r in block.resnets][::-1]
    assert len(producers) == len(consumers)
    return producers, consumers


# 1. The partial forward ---------------------------------------------------------------------------------------------

def _check_partial_equals_full(net, x, t, cond, call_full):
    fam = family_of(net)
    ref = call_full(x, t)  # diffusers' own forward, not o2m's
    x2 = torch.randn_like(x)
    producers, consumers = _skips(net)
    n = len(producers)
    assert fam.deepcache_branches(net) == n
    mid = _calls(net.mid_block)
    ran_p, ran_c = [_calls(m) for m in producers], [_calls(m) for m in consumers]
    for b in range(n):
        full, cache = fam.deepcache_predict(net, x, t, cond, b, None)
        assert torch.equal(full, ref)  # a full step is the plain forward, bit for bit
        before = (len(mid), [len(r) for r in ran_p], [len(r) for r in ran_c])
        part, _ = fam.deepcache_predict(net, x, t, cond, b, cache)
        assert len(mid) == before[0]  # the partial step skips the mid block...
        # ...runs the layers making skips 0..b and consuming them, once each, and none deeper
        assert [len(r) - k for r, k in zip(ran_p, before[1])] == [1] * (b + 1) + [0] * (n - 1 - b)
        assert [len(r) - k for r, k in zip(ran_c, before[2])] == [1] * (b + 1) + [0] * (n - 1 - b)
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


@torch.no_grad()
@pytest.mark.parametrize("size", [8, 6])  # 6: not a multiple of the up factor 4, so upsample sizes are passed
def test_partial_equals_full_sdxl(size):
    net = _tiny_sdxl_unet()
    torch.manual_seed(1)
    x = torch.randn(2, 4, size, size)
    cond = Condition(tokens=torch.randn(2, 7, 64), pooled=torch.randn(2, 32), ids=torch.randn(2, 6) * 100)
    added = {"text_embeds": cond.pooled, "time_ids": cond.ids}
    _check_partial_equals_full(net, x, torch.tensor(300), cond,
                               lambda a, s: net(a, s, encoder_hidden_states=cond.tokens,
                                                added_cond_kwargs=added).sample)


def _module_macs(net: nn.Module, run) -> dict[str, int]:
    """MACs of each conv and linear layer (by full name) while ``run`` runs, counted here (not by o2m's counter):
    a convolution's output size x its kernel's size x input channels per group, a linear layer's output size x its
    inputs."""
    got: dict[str, int] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            per = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        elif isinstance(m, nn.Linear):
            per = m.in_features
        else:
            continue
        hooks.append(m.register_forward_hook(
            lambda _m, _i, out, n=name, k=per: got.__setitem__(n, got.get(n, 0) + out.numel() * k)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return got


def _sd1_ordered_unet():
    """The tiny SD pipeline's UNet with SD 1.x's block order: cross-attention at the shallow end, so the up layer
    consuming conv_in's skip is a resnet and a transformer, as on SD 1.x."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()


@torch.no_grad()
@pytest.mark.parametrize("make", [_tiny_sd_unet, _sd1_ordered_unet], ids=["sd-tiny", "sd1-order"])
def test_branch_0_macs_are_the_layers_it_runs_and_no_downsampler_runs(make):
    """THE done-means test: on the tiny SD UNet, branch 0's partial step costs exactly conv_in, the last up block's
    last resnet (and attention, where it has one), the output head and the time embedding (o2m's MAC count against a
    count of those layers in diffusers' own forward), and no down layer or downsampler runs in it."""
    from o2mcli.models.stats import count_deepcache_macs, count_macs

    net = make()
    fam = family_of(net)
    x, t = torch.zeros(1, 4, 8, 8), torch.tensor([500])
    text = torch.zeros(1, 77, 32)  # the MAC counter's stand-in: 77 zero tokens
    per_layer = _module_macs(net, lambda: net(x, t, encoder_hidden_states=text))
    u, r = len(net.up_blocks) - 1, len(net.up_blocks[-1].resnets) - 1
    runs = ("conv_in.", "time_embedding.", f"up_blocks.{u}.resnets.{r}.", f"up_blocks.{u}.attentions.{r}.",
            "conv_out.", "encoder_hid_proj.", "add_embedding.")
    want = sum(v for k, v in per_layer.items() if (k + ".").startswith(runs))
    has_attn = getattr(net.up_blocks[-1], "attentions", None) is not None
    assert has_attn == (make is _sd1_ordered_unet)
    assert (f"up_blocks.{u}.attentions.{r}.proj_in" in per_layer) == has_attn
    full = count_macs(net)
    assert full == sum(per_layer.values())
    got = count_deepcache_macs(net, 0)
    assert got == want and got < 0.5 * full
    # Spies: in the partial step no downsampler or down resnet runs, only conv_in makes a skip.
    _, cache = fam.deepcache_predict(net, x, t, text, 0, None)
    down = [_calls(m) for b in net.down_blocks for m in [*b.resnets, *(b.downsamplers or [])]]
    head = _calls(net.conv_in)
    fam.deepcache_predict(net, x, t, text, 0, cache)
    assert not any(down) and len(head) == 1
    assert any(b.downsamplers is not None for b in net.down_blocks)


def test_deepcache_macs_grow_with_the_branch_and_the_deepest_skips_only_the_mid_block():
    from o2mcli.models.stats import count_block_macs, count_deepcache_macs

    net = _tiny_sd_unet()
    n = family_of(net).deepcache_branches(net)
    macs = [count_deepcache_macs(net, b) for b in range(n)]
    assert macs == sorted(macs) and len(set(macs)) == n
    blocks = count_block_macs(net)
    assert macs[-1] == sum(blocks.values()) - blocks["mid_block"]


def test_branch_out_of_range_unsplittable_blocks_freeu_and_dit_refused_by_family():
    from dit_tiny import tiny_dit
    from o2mcli.errors import O2MError

    net = tiny_unet()
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(O2MError, match=r"--cache-branch 4: the UNet2DModel has 4 layer branches .*0\.\.3"):
        family_of(net).deepcache_predict(net, x, torch.tensor(1), None, 4, None)
    dit = tiny_dit()
    with pytest.raises(O2MError, match="DeepCache needs a UNet; DiTTransformer2DModel has no skip branches"):
        family_of(dit).deepcache_predict(dit, x, torch.tensor(1), None, 0, None)
    from diffusers import UNet2DModel

    sde = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      norm_num_groups=8, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                      up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))
    with pytest.raises(O2MError, match="down block 0 is a SkipDownBlock2D, which o2m cannot split by layer"):
        family_of(sde).deepcache_branches(sde)
    sd = _tiny_sd_unet()
    sd.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(O2MError, match="FreeU is enabled"):
        family_of(sd).deepcache_branches(sd)


# 2. The schedule ----------------------------------------------------------------------------------------------------

def test_schedule_counts():
    assert [i for i in range(10) if is_full_step(i, 3)] == [0, 3, 6, 9]
    assert all(is_full_step(i, 1) for i in range(5))
    assert full_steps(10, 3) == [0, 3, 6, 9] and scheduled_calls(10, 3) == (4, 6)


@pytest.mark.parametrize("steps,n", [(50, 5), (50, 3), (10, 3), (10, 10), (7, 1), (100, 2), (25, 4), (3, 2)])
def test_nonuniform_schedule(steps, n):
    got = nonuniform_full_steps(steps, n)
    assert got == nonuniform_full_steps(steps, n) == full_steps(steps, n, "nonuniform")  # deterministic
    assert got[0] == 0 and got == sorted(set(got)) and got[-1] < steps  # step 0 full, distinct, in range
    assert len(got) == math.ceil(steps / n) == len(full_steps(steps, n))  # as many full steps as uniform 1:N
    assert scheduled_calls(steps, n, "nonuniform") == scheduled_calls(steps, n)


def test_nonuniform_is_dense_around_the_center():
    got = nonuniform_full_steps(50, 5)  # 10 full steps, center 10
    gaps = np.diff(got)
    assert got != full_steps(50, 5) and gaps.min() < 5 < gaps.max()
    near = min(range(len(got)), key=lambda i: abs(got[i] - 10))
    assert gaps[max(near - 1, 0)] <= gaps[-1]  # tighter around step 10 than at the end
    assert nonuniform_full_steps(50, 5, center=40) != got


def test_cached_denoiser_follows_the_nonuniform_schedule():
    net = tiny_unet()
    steps = 12
    spec = DeepCacheSpec(4, 1, "nonuniform")
    call = CachedDenoiser(spec, steps=steps)
    head = _calls(net.mid_block)
    with torch.no_grad():
        for i in range(steps):
            call(net, torch.randn(1, 1, 8, 8), torch.tensor(999 - 80 * i))
    assert len(head) == call.counts.full == 3 and call.counts.partial == 9
    from o2mcli.errors import O2MError

    with pytest.raises(O2MError, match="needs the trajectory's number of steps"):
        CachedDenoiser(spec)


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
    assert man.summary["deepcache"] == {"interval": 3, "branch": 0, "branch_unit": "layer", "schedule": "uniform",
                                        "full_calls": 8, "partial_calls": 12}


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

    ok("sample", tiny_model_file, *SAMPLE, "-n", "20", "-b", "8", "--deepcache", "3", "-o", tmp_path / "dc")
    ok("sample", tiny_model_file, *SAMPLE, "-n", "20", "-b", "8", "-o", tmp_path / "plain")
    ok("score", tmp_path / "dc", tmp_path / "plain", "--throughput-batch", "4", "--throughput-steps", "4",
       "--throughput-repeats", "1", "--device", "cpu", "-o", tmp_path / "sc")
    rows = {r["name"]: r for r in json.loads((tmp_path / "sc" / "report.json").read_text())["rows"]}
    dc = rows["dc"]["deepcache"]
    assert rows["plain"]["deepcache"] is None
    assert (dc["full_calls"], dc["partial_calls"]) == (12, 18)  # 3 batches x (4 full, 6 partial)
    # Independently: a partial step of layer branch 0 runs the time embedding, conv_in, the last up block's last
    # resnet (and attention) and the head, so its MACs are those layers' MACs in diffusers' full forward.
    net = load_model(tiny_model_file, torch.device("cpu")).unet
    per_layer = _module_macs(net, lambda: net(torch.zeros(1, 1, 8, 8), torch.tensor([500])))
    u, r = len(net.up_blocks) - 1, len(net.up_blocks[-1].resnets) - 1
    runs = ("time_embedding.", "conv_in.", f"up_blocks.{u}.resnets.{r}.", f"up_blocks.{u}.attentions.{r}.",
            "conv_out.")
    full_macs = sum(per_layer.values())
    partial_macs = sum(v for k, v in per_layer.items() if (k + ".").startswith(runs))
    assert partial_macs < 0.5 * full_macs
    assert rows["dc"]["macs"] == rows["plain"]["macs"] == full_macs
    assert dc["partial_macs"] == partial_macs
    assert dc["macs"] == pytest.approx((12 * full_macs + 18 * partial_macs) / 30)
    assert (dc["branch_unit"], dc["schedule"]) == ("layer", "uniform")
    assert rows["dc"]["throughput"]["deepcache"] == {"interval": 3, "branch": 0, "branch_unit": "layer",
                                                     "schedule": "uniform"}
    assert "deepcache" not in rows["plain"]["throughput"]
    md = (tmp_path / "sc" / "report.md").read_text()
    assert "MACs w/ DeepCache (G)" in md and "DeepCache N=3 B=0 uniform" in md


def test_nonuniform_sampling_is_recorded_and_scored(tmp_path, tiny_model_file):
    out = ok("sample", tiny_model_file, *SAMPLE, "-n", "4", "--deepcache", "4", "--cache-branch", "2",
             "--deepcache-schedule", "nonuniform", "-o", tmp_path / "nu")
    full = len(nonuniform_full_steps(10, 4))
    assert f"DeepCache N=4 B=2 nonuniform: {full} full, {10 - full} partial calls" in out
    man = read_manifest(tmp_path / "nu")
    assert man.config["deepcache_schedule"] == "nonuniform"
    assert man.summary["deepcache"] == {"interval": 4, "branch": 2, "branch_unit": "layer", "schedule": "nonuniform",
                                        "full_calls": full, "partial_calls": 10 - full}
    ok("score", tmp_path / "nu", "--throughput-batch", "2", "--throughput-steps", "3", "--throughput-repeats", "1",
       "--device", "cpu", "-o", tmp_path / "sc")
    row = json.loads((tmp_path / "sc" / "report.json").read_text())["rows"][0]
    assert row["deepcache"]["schedule"] == "nonuniform" and row["throughput"]["deepcache"]["schedule"] == "nonuniform"
    assert "DeepCache N=4 B=2 nonuniform" in (tmp_path / "sc" / "report.md").read_text()


def test_samples_from_an_earlier_o2m_block_pair_branch_are_refused_unless_nothing_was_partial():
    """Earlier o2m's branch counted down/up block pairs and its record has no branch_unit: score cannot cost what
    ran, so it says to re-sample (one line); a record with no partial call costs the same either way."""
    from o2mcli.errors import O2MError
    from o2mcli.stages.score import deepcache_of

    old = {"interval": 3, "branch": 1, "full_calls": 4, "partial_calls": 6}
    man = SimpleNamespace(config={"deepcache": 3, "cache_branch": 1}, summary={"deepcache": old})
    with pytest.raises(O2MError, match="earlier o2m.*block pairs.*re-sample it") as e:
        deepcache_of(man, Path("old"))
    assert "\n" not in str(e.value)
    man.summary["deepcache"] = {**old, "full_calls": 10, "partial_calls": 0}
    assert deepcache_of(man, Path("old")) == DeepCacheSpec(3, 1)
    man.summary["deepcache"] = {**old, "branch_unit": "layer", "schedule": "nonuniform"}
    assert deepcache_of(man, Path("new")) == DeepCacheSpec(3, 1, "nonuniform")


# 4. Refusals --------------------------------------------------------------------------------------------------------

def test_refusals(tmp_path, tiny_model_file):
    from dit_tiny import tiny_dit
    from o2mcli.models.io import save_model_file

    dit = tmp_path / "dit.safetensors"
    save_model_file(dit, tiny_dit(), tiny_scheduler(), kind="teacher")
    assert_refused(cli("sample", dit, *SAMPLE, "-n", "1", "--deepcache", "3", "-o", tmp_path / "a"),
                   "dit.safetensors", "DeepCache needs a UNet", "no skip branches")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache", "3", "--cache-branch", "4",
                       "-o", tmp_path / "b"), "--cache-branch 4", "UNet2DModel", "4 layer branches", "0..3")
    for n in ("0", "-1"):
        assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache", n, "-o", tmp_path / "c"),
                       f"--deepcache {n}")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--cache-branch", "1", "-o", tmp_path / "d"),
                   "--cache-branch 1", "--deepcache")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache-schedule", "nonuniform",
                       "-o", tmp_path / "e"), "--deepcache-schedule 'nonuniform'", "--deepcache")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-n", "1", "--deepcache", "2", "--deepcache-schedule",
                       "random", "-o", tmp_path / "f"), "--deepcache-schedule", "random")
    assert not any((tmp_path / x).exists() for x in "abcdef")
    from o2mcli.errors import O2MError

    with pytest.raises(O2MError, match="at least 1"):
        DeepCacheSpec(0)
    with pytest.raises(O2MError, match="0 or more"):
        DeepCacheSpec(2, -1)
    with pytest.raises(O2MError, match="uniform, nonuniform"):
        DeepCacheSpec(2, 0, "quadratic")


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
    assert s["deepcache"] == {"interval": 2, "branch": 1, "branch_unit": "layer", "schedule": "uniform",
                              "full_calls": 2, "partial_calls": 2}
    images = {d: np.load(tmp_path / d / "samples.npz")["images"] for d in ("plain", "n1", "n2")}
    assert np.array_equal(images["plain"], images["n1"])
    assert not np.array_equal(images["plain"], images["n2"])


def test_an_interval_past_the_steps_is_noted_once_the_run_is_good(in_tmp: Path, tiny_model_file: Path) -> None:
    """--deepcache N >= --steps: the cache is never refreshed; said before sampling (and never for a refused run,
    tests/test_family_contract.py)."""
    r = cli("sample", str(tiny_model_file), "-n", "2", "--steps", "3", "--deepcache", "5", "--device", "cpu",
            "--no-png", "-o", "s")
    assert r.exit_code == 0 and "--deepcache 5 is not below --steps 3" in r.stderr
