"""``o2m prune`` for DiT (issue #14): whole heads (and the width with them) by ratio or MACs budget, whole blocks by
``--drop-blocks``; every template rebuilt by plain diffusers and checked; the refusals; the DiT benchmark's smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, cli, tiny_scheduler, tiny_teacher_file
from dit_tiny import tiny_dit
from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.models.io import load_model, save_model_file
from o2mcli.stages.prune import PruneConfig, make_template, run_prune

ROOT = Path(__file__).resolve().parent.parent


def dit_file(path: Path, **kw) -> Path:
    """A tiny DiT teacher (4 heads of 8, 4 blocks, 1x8x8, 10 classes) saved as an o2m file."""
    save_model_file(path, tiny_dit(0, **{"heads": 4, "layers": 4, **kw}), tiny_scheduler(), kind="teacher")
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 400, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        torch.testing.assert_close(predict(a.eval(), x, t, y), predict(b.eval(), x, t, y), rtol=1e-4, atol=1e-5)


def test_ratio_prune_rebuilds_in_plain_diffusers(tmp_path: Path) -> None:
    from diffusers import DiTTransformer2DModel

    teacher = dit_file(tmp_path / "dit.safetensors")
    out = run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "tpl"))
    tpl = load_model(out, "cpu").unet
    assert tpl.config.num_attention_heads == 2 and tpl.config.num_layers == 4
    # Plain diffusers, from the saved config and weights alone, predicts what o2m's template predicts.
    plain = DiTTransformer2DModel.from_config(dict(tpl.config))
    plain.load_state_dict(tpl.state_dict())
    _same(tpl, plain)
    s = json.loads((out / "manifest.json").read_text())["summary"]
    assert s["teacher"]["width"] == 32 and s["template"]["width"] == 16 and s["template"]["mlp_width"] == 64
    assert s["macs_ratio"] < 0.35 and s["params_ratio"] < 0.4
    assert all(len(h) == 2 for h in s["attention_heads"].values())


def test_width_halving_keeps_position_codes_exactly() -> None:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from o2mcli.pruning.pruners.dit import sincos_channels

    old, new = get_2d_sincos_pos_embed(32, 4, output_type="pt"), get_2d_sincos_pos_embed(16, 4, output_type="pt")
    torch.testing.assert_close(old[:, sincos_channels(32, 16)], new)


def test_kept_heads_and_mlp_are_the_teachers_weights() -> None:
    teacher = tiny_dit(0, heads=4, layers=2)
    tpl, s = make_template(teacher, ratio=0.5)
    from o2mcli.pruning.pruners.dit import sincos_channels

    R = sincos_channels(32, 16)
    heads = s["attention_heads"]["transformer_blocks.1"]
    rows = [h * 8 + j for h in heads for j in range(8)]
    tq = teacher.transformer_blocks[1].attn1.to_q.weight
    torch.testing.assert_close(tpl.transformer_blocks[1].attn1.to_q.weight, tq[rows][:, R])


def test_drop_blocks_keeps_first_last_and_weights() -> None:
    teacher = tiny_dit(0, layers=6)
    tpl, s = make_template(teacher, drop_blocks=3)
    rec = s["block_removal"]
    assert rec["kept"][0] == 0 and rec["kept"][-1] == 5 and len(rec["kept"]) == 3
    assert tpl.config.num_layers == 3 and s["template"]["num_layers"] == 3
    for si, ti in enumerate(rec["kept"]):
        for (k, v), (k2, v2) in zip(tpl.transformer_blocks[si].state_dict().items(),
                                    teacher.transformer_blocks[ti].state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    assert torch.equal(tpl.proj_out_2.weight, teacher.proj_out_2.weight)


def test_drop_blocks_with_ratio_via_cli(tmp_path: Path) -> None:
    teacher = dit_file(tmp_path / "dit.safetensors")
    r = cli("prune", teacher, "--drop-blocks", "2", "--ratio", "0.5", "--no-throughput", "-o", tmp_path / "tpl")
    assert r.exit_code == 0, r.output
    assert "heads 4 -> 2" in r.output and "blocks 4 -> 2" in r.output
    tpl = load_model(tmp_path / "tpl", "cpu").unet
    assert tpl.config.num_layers == 2 and tpl.config.num_attention_heads == 2
    prov = json.loads((tmp_path / "tpl" / "manifest.json").read_text())["summary"]["block_removal"]
    assert prov["removed"] == ["transformer_blocks.1", "transformer_blocks.2"]


def test_target_macs_picks_most_heads_in_budget() -> None:
    teacher = tiny_dit(0, heads=4, layers=2)
    full = make_template(teacher, ratio=0.25)[1]["teacher"]["macs"]
    tpl, s = make_template(teacher, target_macs=0.8 * full)
    assert s["template"]["macs"] <= 0.8 * full and tpl.config.num_attention_heads == 3


def test_taylor_and_random_importance() -> None:
    teacher = tiny_dit(0, heads=4, layers=2)

    def grads(student):
        x = torch.randn(2, 1, 8, 8)
        predict(student, x, torch.tensor([10, 500]), torch.tensor([1, 2])).pow(2).mean().backward()
        return {}

    a = make_template(teacher, ratio=0.5, importance="taylor", data=True, gradients=grads)[0]
    b = make_template(teacher, ratio=0.5, importance="random", seed=3)[0]
    assert a.config.num_attention_heads == b.config.num_attention_heads == 2


def test_taylor_from_digits_via_cli(tmp_path: Path) -> None:
    teacher = dit_file(tmp_path / "dit.safetensors")
    r = cli("prune", teacher, "--ratio", "0.5", "--importance", "taylor", "--data", "digits", "--taylor-batches", "2",
            "-b", "8", "--no-throughput", "-o", tmp_path / "tpl")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "tpl" / "manifest.json").read_text())["summary"]
    assert s["template"]["num_attention_heads"] == 2 and s["taylor_loss"] > 0


def test_refusals(tmp_path: Path) -> None:
    teacher = dit_file(tmp_path / "dit.safetensors")
    for args, words in ((("--drop-blocks", "3"), ("--drop-blocks 3", "at least 2")),
                        (("--ratio", "0.1"), ("removes no head",)),
                        (("--ratio", "0.5", "--round-to", "8"), ("--round-to", "whole heads")),
                        (("--drop-blocks", "1", "--blocks", "bk-base"), ("--drop-blocks",))):
        r = cli("prune", teacher, *args, "--no-throughput", "-o", tmp_path / "x")
        assert_refused(r, *words)
    unet = tiny_teacher_file(tmp_path / "unet.safetensors")
    assert_refused(cli("prune", unet, "--drop-blocks", "1", "--no-throughput", "-o", tmp_path / "y"),
                   "--drop-blocks", "UNet2DModel")
    with pytest.raises(O2MError, match="at least 2"):
        make_template(tiny_dit(0, layers=2), drop_blocks=1)


def test_bench_dit_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dit.py"), "--tiny", "--out",
                        str(tmp_path / "b")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {row["model"] for row in rows} >= {"DiT teacher", "DiT ratio 0.5", "DiT drop-blocks"}
    assert "| model |" in (tmp_path / "b.md").read_text()
