"""o2m prune on Stable Diffusion UNets: channel slimming, BK-SDM block removal, the text conditioning record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_refused, cli
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest
from o2mcli.models.io import load_model, unet_config_of
from o2mcli.pruning.blocks import plan_blocks
from o2mcli.pruning.importance import get_importance
from o2mcli.pruning.pruners import pruner_for
from o2mcli.stages.prune import PruneConfig, run_prune
from sd_tiny import save_tiny_sd, tiny_sd_unet

G = torch.Generator().manual_seed(3)
X = torch.randn(2, 4, 8, 8, generator=G)
T = torch.tensor([10, 900])
TEXT = torch.randn(2, 5, 32, generator=G)


def _pipeline(folder: Path, **unet_kw) -> Path:
    """The tiny SD pipeline directory, its UNet replaced by ``tiny_sd_unet(**unet_kw)`` when given."""
    save_tiny_sd(folder)
    if unet_kw:
        tiny_sd_unet(**unet_kw).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {"tiny": _pipeline(root / "tiny"),  # layers_per_block 1, two stages
            "deep": _pipeline(root / "deep", layers_per_block=2),
            "three": _pipeline(root / "three", block_out_channels=(16, 32, 32),
                               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))}


def _eps(unet, text=TEXT):
    with torch.no_grad():
        return unet(X, T, encoder_hidden_states=text).sample


def _plain(template: Path):
    """The template rebuilt by plain diffusers from its config and weights (no o2m loader)."""
    from diffusers import UNet2DConditionModel

    with safe_open(str(template / "template.safetensors"), "pt") as f:
        meta = f.metadata()
    cfg = {k: v for k, v in json.loads(meta["o2m.denoiser_config"]).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg)
    unet.load_state_dict(load_file(str(template / "template.safetensors")), strict=True)
    return unet.eval(), json.loads(meta["o2m.provenance"])


def _prune(teacher: Path, out: Path, **kw) -> Path:
    return run_prune(PruneConfig(teacher=str(teacher), throughput=False, device="cpu", out=out, **kw))


# 1. Slimming ------------------------------------------------------------------------------------------

def test_ratio_slims_and_loads_in_plain_diffusers(pipes, tmp_path: Path) -> None:
    out = run_prune(PruneConfig(teacher=str(pipes["tiny"]), ratio=0.5, device="cpu", out=tmp_path / "t",
                                throughput_batch=2, throughput_steps=1))
    plain, prov = _plain(out)
    assert list(plain.config.block_out_channels) == [16, 32]
    attn = plain.down_blocks[1].attentions[0].transformer_blocks[0]
    assert attn.attn2.to_k.in_features == 32 and attn.attn2.to_q.in_features == 32  # text width kept
    assert attn.attn1.heads == attn.attn2.heads == 8 and attn.attn1.to_q.out_features == 32  # 8 heads of 4
    assert attn.ff.net[0].proj.out_features == 2 * 4 * 32  # GEGLU: value and gate halves
    ours = load_model(out).unet
    torch.testing.assert_close(_eps(ours), _eps(plain), rtol=0, atol=0)
    assert (_eps(plain) - _eps(plain, torch.zeros_like(TEXT))).abs().mean() > 1e-3  # text still matters
    # The template names the teacher's pipeline (path and part hashes) instead of copying it.
    teacher = load_model(pipes["tiny"])
    assert prov["conditioning"] == teacher.conditioning and prov["conditioning"]["type"] == "text"
    assert load_model(out).conditioning["hashes"] == teacher.conditioning["hashes"]
    man = read_manifest(out)
    assert man.parents[0].path == str(pipes["tiny"].resolve())
    s = man.summary
    assert s["template"]["block_out_channels"] == [16, 32] and 0.2 < s["params_ratio"] < 0.35
    assert set(map(tuple, s["attention_heads"].values())) == {(8, 8)}
    assert set(map(tuple, s["attention_head_dims"].values())) == {(8, 4)}
    assert s["throughput"]["speedup"] > 0  # measured with the family's stand-in (zero) text


def test_linear_projection_and_per_stage_heads_rebuild() -> None:
    """SD 2.x's shape: linear proj_in/proj_out and one head count per stage (heads kept, each narrower)."""
    unet = tiny_sd_unet(layers_per_block=1, use_linear_projection=True, attention_head_dim=(2, 4),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    cfg = unet_config_of(unet)
    pruner = pruner_for(cfg, Path("sd2"))
    pruner.check(cfg, Path("sd2"))
    plan = pruner.plan(cfg, 0.5, None, None)
    assert plan.new_channels == (16, 32)
    outcome = pruner.prune(unet, plan, get_importance("magnitude")())
    plain = pruner.rebuild(unet, plan.new_config(cfg), Path("sd2"))
    assert plain.down_blocks[0].attentions[0].proj_in.out_features == 16
    assert outcome.heads["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [2, 2]
    assert outcome.head_dims["up_blocks.0.attentions.0.transformer_blocks.0.attn2"] == [16, 8]


def test_keep_within_heads_and_geglu_pairs() -> None:
    from o2mcli.pruning.surgery import keep_pairs, keep_within_heads

    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 9.0, 0.0, 1.0, 0.5])
    assert keep_within_heads(scores, 4, heads=2) == [1, 3, 4, 6]  # every head keeps its best two
    assert keep_pairs(scores, 4) == [0, 1]  # pair i is (i, i + 4): sums 9.1, 5.0, 1.2, 3.5
    with pytest.raises(RuntimeError):
        keep_within_heads(scores, 3, heads=2)


def test_unhandled_sd_configs_are_refused_by_name() -> None:
    pruner = pruner_for({"_class_name": "UNet2DConditionModel"}, Path("x"))
    base = unet_config_of(tiny_sd_unet())
    # (SDXL's "text_time" is handled: tests/test_sdxl.py; another added embedding is not)
    for key, value in (("addition_embed_type", "text"), ("class_embed_type", "timestep"),
                       ("time_cond_proj_dim", 256), ("transformer_layers_per_block", [1, 2])):
        with pytest.raises(O2MError, match=key):
            pruner.check({**base, key: value}, Path("x"))


# 2. BK-SDM block removal --------------------------------------------------------------------------------

def _same(student: dict, teacher: dict, pairs: dict[str, str]) -> None:
    for s, t in pairs.items():
        assert torch.equal(student[s], teacher[t]), (s, t)


def test_bk_base_and_small(pipes, tmp_path: Path) -> None:
    teacher = load_model(pipes["deep"]).unet
    tstate = teacher.state_dict()
    for variant in ("bk-base", "bk-small"):
        out = _prune(pipes["deep"], tmp_path / variant, blocks=variant)
        plain, prov = _plain(out)
        assert plain.config.layers_per_block == 1
        assert (plain.mid_block is None) == (variant == "bk-small")
        _same(plain.state_dict(), tstate, {
            "down_blocks.1.attentions.0.proj_in.weight": "down_blocks.1.attentions.0.proj_in.weight",
            "up_blocks.0.resnets.0.conv1.weight": "up_blocks.0.resnets.0.conv1.weight",
            "up_blocks.0.resnets.1.conv1.weight": "up_blocks.0.resnets.2.conv1.weight",  # the middle pair went
            "up_blocks.0.attentions.1.proj_out.weight": "up_blocks.0.attentions.2.proj_out.weight"})
        assert (_eps(plain) - _eps(plain, torch.zeros_like(TEXT))).abs().mean() > 1e-4
        rec = prov["blocks"]
        assert rec["variant"] == variant and "down_blocks.1.attentions.1" in rec["removed"]
        assert ("mid_block" in rec["removed"]) == (variant == "bk-small")
        assert rec["block_map"]["up_blocks.1"] == "up_blocks.1"
        assert prov["conditioning"]["type"] == "text" and prov["ratio"] is None
        s = read_manifest(out).summary
        assert s["template"]["params"] < s["teacher"]["params"] and s["block_removal"]["variant"] == variant
        rows = {r["block"]: r for r in s["blocks"]}
        assert rows["mid_block"]["params_kept"] == (0 if variant == "bk-small" else 1)


def test_bk_tiny_and_blocks_with_ratio(pipes, tmp_path: Path) -> None:
    tstate = load_model(pipes["three"]).unet.state_dict()
    out = _prune(pipes["three"], tmp_path / "tiny", blocks="bk-tiny")
    plain, prov = _plain(out)
    assert list(plain.config.block_out_channels) == [16, 32] and plain.mid_block is None
    assert plain.config.down_block_types == ["CrossAttnDownBlock2D"] * 2
    assert plain.down_blocks[1].downsamplers is None
    _same(plain.state_dict(), tstate, {
        "up_blocks.0.resnets.1.conv1.weight": "up_blocks.1.resnets.2.conv1.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "up_blocks.1.attentions.0.proj_in.weight": "up_blocks.2.attentions.0.proj_in.weight"})
    rec = prov["blocks"]
    assert {"down_blocks.3", "up_blocks.0", "down_blocks.1.downsamplers.0", "mid_block"} - set(rec["removed"]) \
        == {"down_blocks.3"}  # three stages: the innermost is down_blocks.2
    assert "down_blocks.2" in rec["removed"] and rec["block_map"]["up_blocks.0"] == "up_blocks.1"
    assert "down_blocks.1" not in rec["feature_pairs"] and rec["notes"]
    _eps(plain)
    # Blocks first, then slimming what remains.
    both = _prune(pipes["three"], tmp_path / "both", blocks="bk-small", ratio=0.5)
    plain, prov = _plain(both)
    assert list(plain.config.block_out_channels) == [8, 16, 16] and plain.config.layers_per_block == 1
    assert plain.mid_block is None and prov["ratio"] == 0.5 and prov["blocks"]["variant"] == "bk-small"
    s = read_manifest(both).summary
    assert s["teacher"]["block_out_channels"] == [16, 32, 32] and s["ratio"] == 0.5
    assert {r["block"]: r["channels"] for r in s["blocks"]}["down_blocks.1"] == [32, 16]
    _eps(plain)


def test_bk_params_on_sd_v1_config() -> None:
    """BK-SDM's U-Nets: 0.58 B / 0.49 B / 0.33 B params against SD-v1.4's 0.86 B (counted on the meta device)."""
    from o2mcli.pruning.widths import reference_unet

    sd = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
          "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280],
          "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8}

    def billions(cfg):
        return sum(p.numel() for p in reference_unet(cfg).parameters()) / 1e9

    assert round(billions(sd), 2) == 0.86
    got = [round(billions(plan_blocks(sd, v, Path("sd")).config), 2) for v in ("bk-base", "bk-small", "bk-tiny")]
    assert got == [0.58, 0.48, 0.32]  # BK-SDM's model cards: 579 M, 482 M, 323 M


# 3. The command's refusals ------------------------------------------------------------------------------

def test_cli_refusals(pipes, in_tmp: Path) -> None:
    from conftest import tiny_teacher_file

    assert_refused(cli("prune", pipes["deep"], "--blocks", "bk-huge", "--no-throughput"), "--blocks", "bk-huge")
    assert_refused(cli("prune", pipes["deep"], "--blocks", "bk-tiny", "--no-throughput"), "bk-tiny", "at least 3")
    assert_refused(cli("prune", pipes["tiny"], "--blocks", "bk-base", "--no-throughput"), "layers_per_block 2")
    assert_refused(cli("prune", pipes["tiny"], "--importance", "taylor", "--data", "digits", "--no-throughput"),
                   "taylor", "Stable Diffusion")
    ddpm = tiny_teacher_file(in_tmp / "ddpm.safetensors")
    assert_refused(cli("prune", ddpm, "--blocks", "bk-base", "--no-throughput"), "UNet2DModel", "bk-base")
    assert not (in_tmp / "template").exists()
    res = cli("prune", pipes["deep"], "--blocks", "bk-small", "--no-throughput")
    assert res.exit_code == 0, res.output
    assert "blocks bk-small" in res.stdout and "mid_block>-" in res.stdout


# 4. The benchmark stays runnable ------------------------------------------------------------------------

def test_sd_benchmark_runs_tiny(tmp_path: Path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sd.py"
    res = subprocess.run([sys.executable, str(bench), "--tiny", "--steps", "1", "--device", "cpu",
                          "--out", str(tmp_path / "sd")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "sd.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "ratio 0.3", "ratio 0.5", "bk-base", "bk-small", "bk-tiny"}
    params = [rows[k]["params"] for k in ("bk-tiny", "bk-small", "bk-base", "teacher")]
    assert params == sorted(set(params))
    assert rows["ratio 0.5"]["macs_ratio"] < rows["ratio 0.3"]["macs_ratio"] < 1
    assert all(r["speedup"] > 0 and r["macs_G_cfg"] == round(2 * r["macs"] / 1e9, 3) for r in rows.values())
    assert "| bk-tiny |" in (tmp_path / "sd.md").read_text() and "| bk-tiny |" in res.stdout
