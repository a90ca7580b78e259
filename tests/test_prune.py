"""o2m prune: uniform channel pruning of tiny random UNets with torch-pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, cli, tiny_scheduler, tiny_unet
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest
from o2mcli.models.configs import unet_config
from o2mcli.models.io import build_unet, load_model, save_model_file, unet_config_of
from o2mcli.models.stats import count_macs, count_params
from o2mcli.pruning.importance import get_importance
from o2mcli.pruning.surgery import (attribute_mismatches, keep_channels, prune_uniform, reference_unet,
                                    timestep_columns)
from o2mcli.pruning.widths import config_macs, plan_for_macs, plan_widths

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 421, 999])


def unet8(variance: str = "fixed", attention: bool = True, head_dim: int | None = 4, seed: int = 0):
    """A random UNet with block_out_channels (8, 16), 2 GroupNorm groups, on 1x8x8 images."""
    return tiny_unet(variance, attention=attention, seed=seed, block_out_channels=(8, 16), head_dim=head_dim)


def _processors(model, proc) -> None:
    for m in model.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(proc)


def _pruned(variance="fixed", attention=True, head_dim=4, ratio=0.5, importance="magnitude"):
    u = unet8(variance, attention, head_dim)
    cfg = unet_config_of(u)
    plan = plan_widths(cfg, ratio)
    outcome = prune_uniform(u, plan, get_importance(importance)(seed=0, data=True))
    return u, plan.new_config(cfg), outcome


# 1. Shapes, honest config, attributes, equality under every attention processor --------------------

@pytest.mark.parametrize("variance", ["fixed", "learned"])
@pytest.mark.parametrize("attention, head_dim", [(True, 4), (True, None), (False, 4)])
def test_pruned_model_is_its_config(variance: str, attention: bool, head_dim, tmp_path: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    u, new_cfg, outcome = _pruned(variance, attention, head_dim)
    assert new_cfg["block_out_channels"] == [4, 8]
    assert u.config.block_out_channels == (4, 8)
    assert u.conv_out.out_channels == (2 if variance == "learned" else 1) and u.conv_in.in_channels == 1
    assert u.time_embedding.linear_1.in_features == 4 and u.time_embedding.linear_1.out_features == 16
    plain = reference_unet(new_cfg, "cpu")
    assert attribute_mismatches(u, plain) == []
    plain.load_state_dict(u.state_dict(), strict=True)
    assert count_params(u) == count_params(plain) < count_params(unet8(variance, attention, head_dim))
    if attention:
        heads = [m.heads for m in u.modules() if hasattr(m, "heads")]
        assert heads and all(h == (1 if head_dim is None else 2) for h in heads), heads
        assert set(map(tuple, outcome.heads.values())) == {(1, 1) if head_dim is None else (4, 2)}
    u.eval()
    for proc in (AttnProcessor(), AttnProcessor2_0()):
        _processors(u, proc)
        _processors(plain, proc)
        with torch.no_grad():
            torch.testing.assert_close(u(X, T).sample, plain(X, T).sample, rtol=1e-5, atol=1e-6)
    # Saved and reloaded through o2m's own loader: the same function.
    path = tmp_path / "t.safetensors"
    save_model_file(path, plain, tiny_scheduler(variance), kind="template")
    reloaded = load_model(path).unet
    _processors(reloaded, AttnProcessor2_0())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X, T).sample, plain(X, T).sample, rtol=0, atol=0)


def test_stale_attributes_are_caught() -> None:
    """The check that guards every prune: a wrong head count or Downsample2D.channels is reported."""
    u, new_cfg, _ = _pruned()
    ref = reference_unet(new_cfg)
    u.down_blocks[0].downsamplers[0].channels = 8
    u.down_blocks[1].attentions[0].heads = 4
    bad = attribute_mismatches(u, ref)
    assert any("downsamplers.0.channels" in b for b in bad) and any("attentions.0.heads" in b for b in bad)


# 2. Importance criteria and the small pure helpers --------------------------------------------------

def test_keep_channels_whole_heads_and_topk() -> None:
    scores = torch.tensor([0.1, 0.2, 5.0, 5.0, 0.3, 0.1, 1.0, 1.0])
    assert keep_channels(scores, 4, heads=4) == [2, 3, 6, 7]  # heads 1 and 3 score highest
    assert keep_channels(scores, 3) == [2, 3, 6]
    with pytest.raises(RuntimeError):
        keep_channels(scores, 3, heads=4)


def test_magnitude_keeps_the_loudest_channel() -> None:
    u = unet8()
    conv1 = u.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        conv1.weight[5] *= 100.0  # inner channel 5 of the first ResNet block
    prune_uniform(u, plan_widths(unet_config_of(u), 0.5), get_importance("magnitude")())
    norms = u.down_blocks[0].resnets[0].conv1.weight.flatten(1).norm(dim=1)
    assert norms.max() > 10 * norms.median()  # the loud channel survived (its inputs were pruned too)


def test_random_importance_is_seeded() -> None:
    def run(seed):
        u = unet8()
        prune_uniform(u, plan_widths(unet_config_of(u), 0.5), get_importance("random")(seed=seed))
        return u.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_timestep_columns_follow_frequencies() -> None:
    assert timestep_columns(16, 16, 1.0) == list(range(16))
    cols = timestep_columns(128, 96, 1.0)
    sin = cols[:48]
    assert len(cols) == 96 and sin[0] == 0 and sin[-1] == 63 and all(b > a for a, b in zip(sin, sin[1:]))
    assert cols[48:] == [64 + i for i in sin]


def test_unknown_importance_and_taylor_without_data() -> None:
    with pytest.raises(O2MError, match="unknown criterion"):
        get_importance("l1-norm")
    with pytest.raises(O2MError, match="needs --data"):
        get_importance("taylor")(data=False)


# 3. Width plans, --round-to, --target-macs -----------------------------------------------------------

def test_plan_widths_rounding_and_errors() -> None:
    cfg = unet_config_of(unet8())
    assert plan_widths(cfg, 0.5).new_channels == (4, 8)
    assert plan_widths(cfg, 0.5).round_to == 4  # lcm(2 groups, head size 4)
    assert plan_widths(cfg, 0.3, round_to=8).new_channels == (8, 8)  # 11.2 -> 8
    with pytest.raises(O2MError, match="less than one group"):
        plan_widths(cfg, 0.8)
    with pytest.raises(O2MError, match="multiple of the teacher's norm_num_groups=2"):
        plan_widths(cfg, 0.5, round_to=3)
    with pytest.raises(O2MError, match="attention_head_dim=4"):
        plan_widths(cfg, 0.5, round_to=2)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(O2MError, match="must be in"):
            plan_widths(cfg, bad)


def test_target_macs_reaches_the_budget_with_the_least_pruning() -> None:
    from o2mcli.models.configs import DDPM_CIFAR10_32 as cifar

    assert 6.0e9 < config_macs(cifar) < 6.1e9  # the papers' 6.1 G
    plan = plan_for_macs(cifar, 3.5e9)
    assert config_macs(plan.new_config(cifar)) <= 3.5e9
    less = plan_widths(cifar, plan.ratio - 0.005)
    assert less.new_channels == plan.new_channels or config_macs(less.new_config(cifar)) > 3.5e9
    with pytest.raises(O2MError, match="already costs"):
        plan_for_macs(cifar, 7e9)
    with pytest.raises(O2MError, match="below what a uniform template can reach"):
        plan_for_macs(cifar, 1e6)


def test_cifar10_ratios_match_the_papers() -> None:
    from o2mcli.models.configs import DDPM_CIFAR10_32 as cifar

    g3 = config_macs(plan_widths(cifar, 0.3).new_config(cifar)) / 1e9
    g5 = config_macs(plan_widths(cifar, 0.5).new_config(cifar)) / 1e9
    assert 3.3 <= g3 <= 3.45 and 1.35 <= g5 <= 1.6, (g3, g5)


# 4. The command: manifest, report, plain-diffusers reload, refusals ----------------------------------

@pytest.fixture
def teacher8(tmp_path: Path) -> Path:
    path = tmp_path / "teacher8.safetensors"
    save_model_file(path, unet8("learned"), tiny_scheduler("learned"), kind="teacher")
    return path


def test_prune_command_writes_a_template(in_tmp: Path, teacher8: Path) -> None:
    res = cli("prune", teacher8, "--ratio", "0.5", "--students", "4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "params" in res.stdout and "speedup" in res.stdout and "down_blocks.1" in res.stdout
    man = read_manifest(in_tmp / "template")
    assert man.kind == "template" and man.parents[0].path == str(teacher8.resolve())
    s = man.summary
    assert s["teacher"]["block_out_channels"] == [8, 16] and s["template"]["block_out_channels"] == [4, 8]
    assert s["template"]["params"] < s["teacher"]["params"] and 0 < s["macs_ratio"] < 0.5
    assert s["teacher"]["macs"] == count_macs(load_model(teacher8).unet)
    assert {b["block"] for b in s["blocks"]} >= {"conv_in", "time_embedding", "down_blocks.0", "mid_block", "conv_out"}
    assert s["throughput"]["speedup"] > 0 and s["throughput"]["device"] == "cpu"
    assert "4 students" in s["students"]
    assert sorted(p.name for p in (in_tmp / "template").iterdir()) == ["manifest.json", "template.safetensors"]
    loaded = load_model(in_tmp / "template")
    assert loaded.unet_configs[0]["block_out_channels"] == [4, 8] and loaded.unet.config.out_channels == 2
    # Chains: a second prune with no teacher named takes the newest *teacher*, never the template.
    res = cli("prune", "--ratio", "0.5", "--no-throughput")
    assert res.exit_code == 0, res.output
    assert read_manifest(in_tmp / "template-2").parents[0].path == str(teacher8.resolve())
    teacher8.unlink()
    assert_refused(cli("prune", "--ratio", "0.5"), "no teacher found here")


def test_template_loads_in_plain_diffusers(in_tmp: Path, teacher8: Path) -> None:
    assert cli("prune", teacher8, "--ratio", "0.5", "--no-throughput").exit_code == 0
    assert cli("export", "template", "-o", "exported").exit_code == 0
    code = (
        "import sys, torch\n"
        "from diffusers import UNet2DModel\n"
        "from safetensors.torch import save_file\n"
        "m = UNet2DModel.from_pretrained('exported/unet').eval()\n"
        "x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "with torch.no_grad(): y = m(x, torch.tensor([0, 421, 999])).sample\n"
        "save_file({'y': y.contiguous()}, 'plain.safetensors')\n"
        "assert not any(k.startswith('o2mcli') for k in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=in_tmp, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    y = load_file(str(in_tmp / "plain.safetensors"))["y"]
    with torch.no_grad():
        ours = load_model(in_tmp / "template").unet(X, T).sample
    torch.testing.assert_close(y, ours, rtol=1e-5, atol=1e-6)
    cfg = json.loads((in_tmp / "exported" / "unet" / "config.json").read_text())
    assert cfg["block_out_channels"] == [4, 8]


def test_taylor_importance_from_data(in_tmp: Path, teacher8: Path) -> None:
    res = cli("prune", teacher8, "--ratio", "0.5", "--importance", "taylor", "--data", "digits",
              "--taylor-batches", "2", "--batch-size", "8", "--no-throughput")
    assert res.exit_code == 0, res.output
    s = read_manifest(in_tmp / "template").summary
    assert s["taylor_loss"] > 0
    mag = cli("prune", teacher8, "--ratio", "0.5", "--no-throughput", "-o", "mag")
    assert mag.exit_code == 0
    a = load_file(str(in_tmp / "template" / "template.safetensors"))
    b = load_file(str(in_tmp / "mag" / "template.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # a different criterion keeps other channels


def test_target_macs_command(in_tmp: Path, teacher8: Path) -> None:
    budget = count_macs(load_model(teacher8).unet) * 0.5
    res = cli("prune", teacher8, "--target-macs", f"{budget / 1e6:.6f}M", "--no-throughput")
    assert res.exit_code == 0, res.output
    assert read_manifest(in_tmp / "template").summary["template"]["macs"] <= budget


@pytest.mark.parametrize("args, words", [
    (["--ratio", "0"], ["--ratio 0.0", "(0, 1)"]),
    (["--ratio", "1"], ["--ratio 1.0"]),
    (["--ratio", "-0.5"], ["--ratio -0.5"]),
    (["--ratio", "0.9"], ["less than one group"]),
    (["--ratio", "0.5", "--target-macs", "1G"], ["not both"]),
    (["--target-macs", "lots"], ["--target-macs 'lots'"]),
    (["--importance", "taylor"], ["needs --data"]),
    (["--importance", "fisher"], ["--importance", "fisher"]),
    (["--round-to", "3"], ["--round-to 3"]),
    (["--importance", "taylor", "--data", "nowhere"], ["nowhere"]),
    # (8, 16) -> (8, 8): the second block's shortcut conv has no place in a diffusers config of equal widths.
    (["--ratio", "0.5", "--round-to", "8"], ["[8, 16] -> [8, 8]", "conv_shortcut", "unequal widths"]),
])
def test_bad_options_are_refused(in_tmp: Path, teacher8: Path, args, words) -> None:
    assert_refused(cli("prune", teacher8, *args, "--no-throughput"), *words)
    assert not (in_tmp / "template").exists()


def test_bad_teachers_are_refused(in_tmp: Path, teacher8: Path) -> None:
    truncated = in_tmp / "broken.safetensors"
    truncated.write_bytes(teacher8.read_bytes()[:500])
    assert_refused(cli("prune", truncated), "broken.safetensors", "corrupt or truncated")
    cond = in_tmp / "cond"
    cond.mkdir()
    (cond / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (cond / "diffusion_pytorch_model.safetensors").write_bytes(teacher8.read_bytes())
    # A UNet2DConditionModel config whose weights are another model's (SD pruning: tests/test_sd_prune.py): the
    # default SD config implies gigabytes the file cannot hold, refused before anything is built.
    assert_refused(cli("prune", cond), "cond", "config does not describe this file's weights")
    # A UNet2DModel of a block type outside the DDPM family.
    torch.manual_seed(0)
    cfg = unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2, attention_level=None)
    cfg["down_block_types"] = ["SkipDownBlock2D", "DownBlock2D"]
    skip = in_tmp / "skip.safetensors"
    save_model_file(skip, build_unet(cfg, None, skip), tiny_scheduler(), kind="teacher")
    assert_refused(cli("prune", skip), "skip.safetensors", "SkipDownBlock2D")
    assert_refused(cli("prune", in_tmp / "missing.safetensors"), "missing.safetensors")
    assert not (in_tmp / "template").exists()


def test_refuses_to_overwrite(in_tmp: Path, teacher8: Path) -> None:
    assert cli("prune", teacher8, "--no-throughput", "--ratio", "0.5", "-o", "t").exit_code == 0
    before = (in_tmp / "t" / "template.safetensors").read_bytes()
    assert_refused(cli("prune", teacher8, "--no-throughput", "--ratio", "0.3", "-o", "t"), "t", "--force")
    assert (in_tmp / "t" / "template.safetensors").read_bytes() == before
    assert cli("prune", teacher8, "--no-throughput", "--ratio", "0.3", "-o", "t", "--force").exit_code == 0
    assert read_manifest(in_tmp / "t").config["ratio"] == 0.3


def test_shipped_teacher_prunes(in_tmp: Path) -> None:
    res = cli("prune", "digits-teacher", "--ratio", "0.5", "--no-throughput")
    assert res.exit_code == 0, res.output
    s = read_manifest(in_tmp / "template").summary
    assert s["template"]["block_out_channels"] == [16, 32, 32]
    assert s["attention_heads"]["down_blocks.1.attentions.0"] == [8, 4]


def test_block_removal_is_a_capability_a_family_declares(tiny_model_file: Path, in_tmp: Path) -> None:
    """--blocks and --drop-blocks are what a family's pruner declares (block_variants, drops_blocks), not methods every
    pruner carries: a pixel UNet offers neither, and the refusal names the families that do."""
    from o2mcli.pruning.pruners import PRUNERS, Pruner

    assert not hasattr(Pruner, "drop_blocks") and not hasattr(Pruner, "remove_blocks")
    assert [p.family for p in PRUNERS.values() if p.drops_blocks] == ["DiTTransformer2DModel"]
    assert_refused(cli("prune", str(tiny_model_file), "--blocks", "bk-base", "--no-throughput", "-o", "out"),
                   "no block-removal variants", "applies to UNet2DConditionModel")
    assert_refused(cli("prune", str(tiny_model_file), "--drop-blocks", "1", "--no-throughput", "-o", "out"),
                   "no stack of equal blocks", "applies to DiTTransformer2DModel")
    assert not (in_tmp / "out").exists()
