"""``--kd feat``: BK-SDM's block-output feature KD plus output KD, with FitNets projections for slimmed students."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_teacher_file
from o2mcli.distill.features import FeatureTap, matched_points
from o2mcli.distill.losses import KD_LOSSES, build_kd_loss
from o2mcli.distill.losses.base import Outputs
from o2mcli.distill.losses.feat import FeatureKD
from o2mcli.models.denoise import predict
from o2mcli.models.io import load_model
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "4", "--log-every", "1", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """A (4, 8) template pruned from a random (8, 16) teacher, as o2m prune writes it."""
    teacher = tiny_teacher_file(tmp_path / "teacher.safetensors")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


def outputs_of(unet: torch.nn.Module, points: list[str], x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None = None) -> Outputs:
    tap = FeatureTap(unet, points)
    try:
        eps = predict(unet, x, t, cond)
        return Outputs(eps=eps[:, :x.shape[1]], features={n: f.float() for n, f in tap.pop().items()})
    finally:
        tap.remove()


# 1. The loss on hand-made features ----------------------------------------------------------------------

def test_zero_for_identical_positive_otherwise_and_bk_sdm_weights() -> None:
    g = torch.Generator().manual_seed(0)
    feats = {"down_blocks.0": torch.randn(2, 4, 8, 8, generator=g), "mid_block": torch.randn(2, 8, 4, 4, generator=g)}
    eps = torch.randn(2, 1, 8, 8, generator=g)
    kd = build_kd_loss("feat", {"down_blocks.0": 4, "mid_block": 8}, {"down_blocks.0": 4, "mid_block": 8}, g)
    assert KD_LOSSES.resolve("feat") is FeatureKD and kd.needs_features and kd.needs_teacher
    assert len(kd.proj) == 0  # equal widths (BK-SDM's block-removed students): the identity, no parameters
    same = Outputs(eps=eps, features=feats)
    assert float(kd(same, Outputs(eps=eps.clone(), features={k: v.clone() for k, v in feats.items()}))) == 0.0
    shifted = {k: v + 0.5 for k, v in feats.items()}
    # BK-SDM: sum over blocks of the per-block MSE, plus the output MSE, both weighted 1.
    got = kd(Outputs(eps=eps + 1.0, features=shifted), same)
    assert float(got) == pytest.approx(1.0 + 2 * 0.25, rel=1e-6)
    assert float(kd.feature_loss(Outputs(eps=eps, features=shifted), same)) == pytest.approx(0.5, rel=1e-6)
    assert float(kd.output_loss(Outputs(eps=eps + 1.0, features=feats), same)) == pytest.approx(1.0, rel=1e-6)


def test_projection_for_narrower_students_is_learned_and_seeded() -> None:
    s_ch, t_ch = {"down_blocks.0": 4, "up_blocks.1": 8}, {"down_blocks.0": 8, "up_blocks.1": 8}
    a = FeatureKD(s_ch, t_ch, torch.Generator().manual_seed(3))
    b = FeatureKD(s_ch, t_ch, torch.Generator().manual_seed(3))
    c = FeatureKD(s_ch, t_ch, torch.Generator().manual_seed(4))
    assert list(a.proj) == ["down_blocks__0"]  # only the narrower block is projected
    assert a.proj["down_blocks__0"].weight.shape == (8, 4, 1, 1)
    assert torch.equal(a.proj["down_blocks__0"].weight, b.proj["down_blocks__0"].weight)
    assert not torch.equal(a.proj["down_blocks__0"].weight, c.proj["down_blocks__0"].weight)
    g = torch.Generator().manual_seed(0)
    s_feats = {"down_blocks.0": torch.randn(2, 4, 8, 8, generator=g, requires_grad=True),
               "up_blocks.1": torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)}
    t_feats = {"down_blocks.0": torch.randn(2, 8, 8, 8, generator=g),
               "up_blocks.1": torch.randn(2, 8, 8, 8, generator=g)}
    eps = torch.zeros(2, 1, 8, 8)
    loss = a(Outputs(eps=eps, features=s_feats), Outputs(eps=eps, features=t_feats))
    assert float(loss) > 0
    loss.backward()
    assert all(float(f.grad.abs().sum()) > 0 for f in s_feats.values())
    assert float(a.proj["down_blocks__0"].weight.grad.abs().sum()) > 0
    # The projected student feature equals the teacher's: zero loss, whatever the width.
    target = {"down_blocks.0": a.projected("down_blocks.0", s_feats["down_blocks.0"]).detach(),
              "up_blocks.1": s_feats["up_blocks.1"].detach()}
    assert float(a.feature_loss(Outputs(eps=eps, features=s_feats), Outputs(eps=eps, features=target))) == 0.0


# 2. On real UNets ------------------------------------------------------------------------------------------

def test_pruned_unet2d_student_gets_gradients_through_projections(template: Path) -> None:
    teacher = load_model(template.parent / "teacher.safetensors").unet
    student = load_model(template).unet.train()
    names, s_ch, t_ch = matched_points(student, teacher)
    assert s_ch != t_ch and len(names) >= 3  # (4, 8) student, (8, 16) teacher
    kd = build_kd_loss("feat", s_ch, t_ch, torch.Generator().manual_seed(0))
    assert set(kd.proj) == {k.replace(".", "__") for k in names if s_ch[k] != t_ch[k]}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g)
    with torch.no_grad():
        t_out = outputs_of(teacher, names, x, t)
    loss = kd(outputs_of(student, names, x, t), t_out)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert all(float(p.weight.grad.abs().sum()) > 0 for p in kd.proj.values())
    assert all(p.grad is None for p in teacher.parameters())


def test_unet2d_condition_model_identity_and_projection(tmp_path: Path) -> None:
    """Stable Diffusion's UNet: zero against itself; a half-width copy is projected and trained."""
    from diffusers import UNet2DConditionModel

    from sd_tiny import tiny_sd_pipeline

    teacher = tiny_sd_pipeline(0)[0]
    cfg = dict(teacher.config)
    cfg["block_out_channels"] = (16, 32)
    torch.manual_seed(1)
    narrow = UNet2DConditionModel.from_config(cfg).train()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    text = torch.randn(2, 77, 32, generator=g)

    names, s_ch, t_ch = matched_points(copy.deepcopy(teacher), teacher)
    assert "mid_block" in names and s_ch == t_ch
    kd = build_kd_loss("feat", s_ch, t_ch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_out = outputs_of(teacher, names, x, t, text)
        assert float(kd(outputs_of(copy.deepcopy(teacher), names, x, t, text), t_out)) == pytest.approx(0.0, abs=1e-10)

    names, s_ch, t_ch = matched_points(narrow, teacher)
    assert all(s_ch[n] * 2 == t_ch[n] for n in names)
    kd = build_kd_loss("feat", s_ch, t_ch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_out = outputs_of(teacher, names, x, t, text)
    loss = kd(outputs_of(narrow, names, x, t, text), t_out)
    assert float(loss) > 0
    loss.backward()
    assert len(kd.proj) == len(names) and all(float(p.weight.grad.abs().sum()) > 0 for p in kd.proj.values())
    assert sum(float(p.grad.abs().sum()) for p in narrow.parameters() if p.grad is not None) > 0


# 3. The engine and the command ----------------------------------------------------------------------------

def test_engine_step_trains_student_and_projections(template: Path) -> None:
    """One engine step (L_diff + alpha * L_KD): the optimizer sees the FitNets heads and moves them."""
    from diffusers import DDPMScheduler

    from o2mcli.diffusion.gaussian import DiffusionTerms
    from o2mcli.distill.engine import Distiller, Hyper, Student
    from o2mcli.distill.objective import Objective
    from o2mcli.distill.plan import TimestepPlan
    from o2mcli.distill.sources import ImageSource
    from o2mcli.runtime.dist import DistState

    teacher = load_model(template.parent / "teacher.safetensors").unet
    _, s_ch, t_ch = matched_points(load_model(template).unet, teacher)
    terms = DiffusionTerms(DDPMScheduler().betas)
    hyper = Hyper(batch_size=4, lr=1e-2, lr_warmup=0)
    st = Student(0, load_model(template).unet.train(), build_kd_loss("feat", s_ch, t_ch,
                 torch.Generator().manual_seed(0)), hyper, DistState())
    heads = {k: v.clone() for k, v in st.kd.state_dict().items()}
    weights = {k: v.clone() for k, v in st.raw.state_dict().items()}
    assert heads and all(any(p is q for q in st.params) for p in st.kd.parameters())
    eng = Distiller(teacher=teacher, students=[st], source=ImageSource(torch.rand(12, 1, 8, 8), terms,
                    torch.device("cpu")), plan=TimestepPlan((0, 1000), 0.0), objective=Objective(alpha=1.0),
                    terms=terms, hyper=hyper, device=torch.device("cpu"), dist=DistState(),
                    gen_plan=torch.Generator().manual_seed(0), gen_data=torch.Generator().manual_seed(1))
    (parts,) = eng.step()
    assert float(parts["kd"]) > 0 and float(parts["loss"]) == pytest.approx(float(parts["diff"] + parts["kd"]))
    assert all(not torch.equal(v, heads[k]) for k, v in st.kd.state_dict().items())
    assert any(not torch.equal(v, weights[k]) for k, v in st.raw.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_kd_feat_runs(in_tmp: Path, template: Path) -> None:
    res = cli("distill", template, "-k", "2", "--kd", "feat", "--steps", "2", *FAST, "-o", "feat")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (in_tmp / "feat" / "metrics.jsonl").read_text().splitlines()]
    assert {r["student"] for r in rows} == {0, 1} and all(r["kd"] > 0 and r["loss"] >= r["kd"] for r in rows)
    from o2mcli.manifest import read_manifest

    assert read_manifest(in_tmp / "feat").config["kd"] == "feat"


def test_dkdm_objective_adds_only_the_feature_part() -> None:
    """DKDM's L'_simple is output KD already: --kd feat there adds alpha * L_featKD, not the output term twice."""
    from o2mcli.distill.objective import Objective
    from o2mcli.distill.sources.base import Batch

    g = torch.Generator().manual_seed(0)
    kd = FeatureKD({"a": 4}, {"a": 4}, g)
    s = Outputs(eps=torch.randn(2, 1, 4, 4, generator=g), v=None, features={"a": torch.randn(2, 4, 2, 2, generator=g)})
    t = Outputs(eps=torch.randn(2, 1, 4, 4, generator=g), v=None, features={"a": torch.randn(2, 4, 2, 2, generator=g)})
    batch = Batch(x_t=torch.zeros(2, 1, 4, 4), t=torch.tensor([1, 2]))
    total, parts = Objective(alpha=0.5, base="output")(kd, s, t, batch, None)
    simple = ((s.eps - t.eps) ** 2).mean()
    assert torch.allclose(parts["simple"], simple)
    assert torch.allclose(parts["kd"], kd.feature_loss(s, t))
    assert torch.allclose(total, simple + 0.5 * kd.feature_loss(s, t))
