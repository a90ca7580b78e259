"""SDXL block-removal patterns (KOALA-1B/700M, SSD-1B, Segmind-Vega) on a tiny random SDXL-shaped U-Net, and on the
real SDXL base config on the meta device (parameter counts against the published ones)."""

from __future__ import annotations

import re

import pytest
import torch

from o2mcli.errors import O2MError
from o2mcli.pruning.pruners.sdxl_blocks import (PUBLISHED_PARAMS, SDXL_BASE_CONFIG, SDXL_VARIANTS, keep_layers,
                                        remove_sdxl_blocks, sdxl_removal_config)

WHERE = "teacher-unet"
DEPTHS = [1, 2, 8]  # SDXL's [1, 2, 10] scaled down: the innermost stacks still deeper than every pattern keeps


def tiny_sdxl_config(**kw) -> dict:
    """SDXL's structure (3 stages, text_time, linear projections, 2 resnets a stage) at tiny widths."""
    cfg = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
           "block_out_channels": [32, 64, 128], "layers_per_block": 2,
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
           "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": list(DEPTHS),
           "attention_head_dim": [1, 2, 4], "cross_attention_dim": 32, "use_linear_projection": True,
           "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
           "projection_class_embeddings_input_dim": 16 + 6 * 8, "norm_num_groups": 8}
    cfg.update(kw)
    return cfg


def _unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


@pytest.fixture(scope="module")
def teacher():
    return _unet(tiny_sdxl_config())


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 5, 32, generator=g),
            {"text_embeds": torch.randn(batch, 16, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)})


def _depths(unet, block: str) -> list[int]:
    return [len(a.transformer_blocks) for a in getattr(unet.get_submodule(block), "attentions", [])]


# Transformer depth of every student attention with the teacher's depths [1, 2, 8] ("full" stacks keep 2 and 8).
EXPECTED = {
    "koala-1b": {"down_blocks.1": [2], "down_blocks.2": [6], "mid_block": [6], "up_blocks.0": [6, 6],
                 "up_blocks.1": [2, 2]},
    "koala-700m": {"down_blocks.1": [2], "down_blocks.2": [5], "mid_block": None, "up_blocks.0": [5, 5],
                   "up_blocks.1": [2, 2]},
    "ssd-1b": {"down_blocks.1": [2, 2], "down_blocks.2": [4, 4], "mid_block": [], "up_blocks.0": [4, 4, 8],
               "up_blocks.1": [2, 1, 1]},
    "vega": {"down_blocks.1": [1, 1], "down_blocks.2": [2, 2], "mid_block": [], "up_blocks.0": [2, 2, 2],
             "up_blocks.1": [1, 1, 1]},
}


@pytest.mark.parametrize("variant", SDXL_VARIANTS)
def test_student_is_plain_diffusers_and_copies_the_teacher(teacher, variant: str) -> None:
    from diffusers import UNet2DConditionModel

    student, plan = remove_sdxl_blocks(teacher, variant, WHERE)
    # The config alone, through plain diffusers, describes the student exactly.
    fresh = UNet2DConditionModel.from_config({k: v for k, v in plan.config.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    # Every tensor is its mapped teacher tensor, and the map covers the student.
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    assert set(plan.key_map) == set(s_state)
    for k, v in s_state.items():
        assert torch.equal(v, t_state[plan.key_map[k]]), k
    # The published architecture.
    for block, depths in EXPECTED[variant].items():
        if depths is None:
            assert student.mid_block is None
            continue
        assert _depths(student, block) == depths, block
    n_res = 1 if variant.startswith("koala") else 2
    assert len(student.down_blocks[2].resnets) == n_res and len(student.up_blocks[0].resnets) == n_res + 1
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    # It runs on SDXL's inputs and gives the teacher's output shape.
    x, t, text, added = _inputs()
    with torch.no_grad():
        out = student(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        ref = teacher(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    assert out.shape == ref.shape == x.shape and torch.isfinite(out).all()


def test_which_teacher_layers_initialize_the_student(teacher) -> None:
    student, plan = remove_sdxl_blocks(teacher, "koala-1b", WHERE)
    km = plan.key_map
    # A stack of 8 cut to 6: the first 5 layers and the last.
    assert keep_layers(8, 6) == (0, 1, 2, 3, 4, 7) and keep_layers(10, 1) == (9,) and keep_layers(2, 2) == (0, 1)
    assert km["down_blocks.2.attentions.0.transformer_blocks.4.attn1.to_q.weight"] == \
        "down_blocks.2.attentions.0.transformer_blocks.4.attn1.to_q.weight"
    assert km["down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q.weight"] == \
        "down_blocks.2.attentions.0.transformer_blocks.7.attn1.to_q.weight"
    assert km["mid_block.attentions.0.transformer_blocks.5.ff.net.2.weight"] == \
        "mid_block.attentions.0.transformer_blocks.7.ff.net.2.weight"
    # BK-SDM-style pairs: up stages keep pairs 0 and 2, down stages pair 0.
    assert plan.layer_map["up_blocks.1.resnets.1"] == "up_blocks.1.resnets.2"
    assert plan.layer_map["up_blocks.0.attentions.1.transformer_blocks.0"] == \
        "up_blocks.0.attentions.2.transformer_blocks.0"
    assert plan.layer_map["down_blocks.1.resnets.0"] == "down_blocks.1.resnets.0"
    assert "down_blocks.1.resnets.1" in plan.removed and "down_blocks.2.attentions.1" in plan.removed
    assert "up_blocks.0.resnets.1" in plan.removed and "mid_block" not in plan.removed
    # The teacher's time and text_time embeddings carry over.
    assert km["add_embedding.linear_1.weight"] == "add_embedding.linear_1.weight"

    ssd = sdxl_removal_config(tiny_sdxl_config(), "ssd-1b", WHERE)
    assert ssd.layer_map["mid_block.resnets.0"] == "mid_block.resnets.0"
    assert "mid_block.attentions.0" in ssd.removed and "mid_block.resnets.1" in ssd.removed
    assert ssd.layer_map["up_blocks.1.attentions.2.transformer_blocks.0"] == \
        "up_blocks.1.attentions.2.transformer_blocks.1"  # 2 -> 1 keeps the last
    assert "mid_block" in sdxl_removal_config(tiny_sdxl_config(), "koala-700m", WHERE).removed


@pytest.mark.parametrize("variant", SDXL_VARIANTS)
def test_feature_pairs_are_self_attentions_of_the_same_shape(teacher, variant: str) -> None:
    from diffusers.models.attention_processor import Attention

    student, plan = remove_sdxl_blocks(teacher, variant, WHERE)
    n_attn = sum(len(getattr(b, "attentions", [])) for b in [*student.down_blocks, *student.up_blocks]) + \
        (len(student.mid_block.attentions) if student.mid_block is not None and
         hasattr(student.mid_block, "attentions") else 0)
    assert len(plan.feature_pairs) == n_attn > 0  # one point per kept transformer stack
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for net, names, tag in ((student, plan.feature_pairs.keys(), "s"), (teacher, plan.feature_pairs.values(), "t")):
        for name in names:
            mod = net.get_submodule(name)
            assert isinstance(mod, Attention) and name.endswith(".attn1") and mod.is_cross_attention is False
            # each stack's last layer, paired with the teacher layer it was initialized from
            stack = re.sub(r"\.transformer_blocks\.\d+\.attn1$", "", name)
            assert int(name.split(".")[-2]) == len(net.get_submodule(stack).transformer_blocks) - 1
            hooks.append(mod.register_forward_hook(lambda m, i, o, k=f"{tag}:{name}": got.__setitem__(k, o)))
    x, t, text, added = _inputs(1)
    try:
        with torch.no_grad():
            student(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
            teacher(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    for s, tname in plan.feature_pairs.items():
        assert got[f"s:{s}"].shape == got[f"t:{tname}"].shape


def _refusal(cfg: dict, variant: str) -> str:
    with pytest.raises(O2MError) as e:
        sdxl_removal_config(cfg, variant, WHERE)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line_and_name_the_problem() -> None:
    msg = _refusal(tiny_sdxl_config(addition_embed_type=None), "koala-1b")
    assert msg.startswith(WHERE) and "addition_embed_type" in msg and "text_time" in msg
    msg = _refusal(tiny_sdxl_config(block_out_channels=[32, 64, 128, 128],
                                    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                                    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]), "vega")
    assert msg.startswith(WHERE) and "3 stages" in msg and "has 4" in msg
    msg = _refusal(tiny_sdxl_config(transformer_layers_per_block=[1, 2, 3]), "koala-1b")
    assert msg.startswith(WHERE) and "keeps 6" in msg and "only 3" in msg
    msg = _refusal(tiny_sdxl_config(transformer_layers_per_block=[1, 2, 3]), "ssd-1b")
    assert "keeps 4" in msg and "only 3" in msg
    assert "layers_per_block 2" in _refusal(tiny_sdxl_config(layers_per_block=1), "ssd-1b")
    assert "mid block" in _refusal(tiny_sdxl_config(mid_block_type=None), "koala-700m")
    assert "asymmetric" in _refusal(tiny_sdxl_config(reverse_transformer_layers_per_block=[8, 2, 1]), "vega")
    msg = _refusal(tiny_sdxl_config(), "bk-tiny")
    assert "unknown" in msg and "koala-700m" in msg
    # An SD 1.x U-Net (no text_time, 4 stages): refused before anything is built.
    from tests.sd_tiny import tiny_sd_unet

    sd = {**dict(tiny_sd_unet().config), "_class_name": "UNet2DConditionModel"}
    assert "addition_embed_type" in _refusal(sd, "koala-1b")


# Published U-Net parameter counts (see o2mcli/pruning/pruners/sdxl_blocks.py for the sources) and the absolute tolerance
# each gets from its precision: the KOALA card gives whole millions (2,567M, 1,161M, 782M: under 1M off either way,
# rounded or cut), Segmind "745M" for Vega (the same) and "1.3B" for SSD-1B (a tenth of a billion: under 50M off).
TOLERANCE = {"sdxl": 1_000_000, "koala-1b": 1_000_000, "koala-700m": 1_000_000, "vega": 1_000_000,
             "ssd-1b": 50_000_000}


def test_real_sdxl_config_on_meta_matches_published_params() -> None:
    from diffusers import UNet2DConditionModel

    def count(cfg: dict) -> int:
        with torch.device("meta"):
            net = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        return sum(p.numel() for p in net.parameters())

    got = {"sdxl": count(SDXL_BASE_CONFIG)}
    assert got["sdxl"] == 2_567_463_684  # SDXL base 1.0's U-Net, exactly
    plans = {v: sdxl_removal_config(SDXL_BASE_CONFIG, v, "sdxl-base") for v in SDXL_VARIANTS}
    for v, plan in plans.items():
        got[v] = count(plan.config)
    for name, n in got.items():
        assert abs(n - PUBLISHED_PARAMS[name]) < TOLERANCE[name], (name, n)
    assert got["koala-1b"] == 1_161_184_324 and got["koala-700m"] == 782_822_724
    assert got["ssd-1b"] == 1_331_334_404 and got["vega"] == 745_225_604
    # The released diffusers configs' depth fields (SSD-1B: asymmetric up path; Vega: symmetric [1, 1, 2]).
    ssd = plans["ssd-1b"].config
    assert ssd["transformer_layers_per_block"] == [1, 2, 4] and ssd["mid_block_type"] == "UNetMidBlock2D"
    assert ssd["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], 1]
    assert plans["vega"].config["transformer_layers_per_block"] == [1, 1, 2]
    assert plans["vega"].config["reverse_transformer_layers_per_block"] is None
    assert plans["koala-700m"].config["mid_block_type"] is None and plans["koala-700m"].config["layers_per_block"] == 1
    assert plans["koala-1b"].config["transformer_layers_per_block"] == [1, 2, 6]
    # Segmind's Vega write-up gives the blocks too: down 247M, mid 31M, up 460M.
    from o2mcli.models.stats import count_block_params

    with torch.device("meta"):
        vega = UNet2DConditionModel.from_config({k: v for k, v in plans["vega"].config.items() if k[0] != "_"})
    blocks = count_block_params(vega)
    part = {p: sum(n for k, n in blocks.items() if k.startswith(p)) for p in ("down_blocks", "mid_block", "up_blocks")}
    assert all(abs(part[p] - pub) < 1_000_000 for p, pub in
               (("down_blocks", 247e6), ("mid_block", 31e6), ("up_blocks", 460e6))), part
    assert plans["koala-1b"].feature_pairs["mid_block.attentions.0.transformer_blocks.5.attn1"] == \
        "mid_block.attentions.0.transformer_blocks.9.attn1"
