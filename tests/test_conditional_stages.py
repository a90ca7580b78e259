"""Class conditioning through prune, distill (O2MKD and DKDM), merge and sample: labels reach teacher and
students, the null class keeps its share, the class record travels with every artifact, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_refused, cli, crash_at_step
from o2mcli.models.configs import unet_config
from o2mcli.models.io import load_model

TINY = ["--channels", "16,32", "--norm-groups", "2", "--batch-size", "16", "--device", "cpu", "--steps", "6",
        "--save-every", "100"]
FAST = ["--steps", "4", "--batch-size", "8", "--device", "cpu", "--lr-warmup", "0"]
DKDM = ["--mode", "dkdm", "--rho", "0.01", "--init-steps", "3"]
SAMPLE = ["-n", "12", "--steps", "3", "--device", "cpu", "--no-png"]
RECORD = {"type": "class", "classes": list("0123456789"), "null_class": 10, "label_dropout": 0.1}


@pytest.fixture
def cond_template(in_tmp: Path) -> Path:
    """A tiny class-conditional digits teacher ``ct`` (10 classes + null) pruned to ``tpl``."""
    res = cli("train", *TINY, "--cond", "class", "-o", "ct")
    assert res.exit_code == 0, res.output
    res = cli("prune", "ct", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    assert res.exit_code == 0, res.output
    return in_tmp / "tpl"


def _student_json(path: Path, **kw) -> Path:
    path.write_text(json.dumps(unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2,
                                           **kw)))
    return path


# 1. prune ---------------------------------------------------------------------------------------------------------

def test_prune_narrows_the_class_embedding_with_the_time_embedding(in_tmp: Path, cond_template: Path) -> None:
    teacher, template = load_model(in_tmp / "ct"), load_model(cond_template)
    t_emb, s_emb = teacher.unet.class_embedding.weight, template.unet.class_embedding.weight
    assert t_emb.shape == (11, 64) and s_emb.shape == (11, 32)  # every class kept, width = new time_embed_dim
    assert template.unet.time_embedding.linear_2.out_features == 32
    # The kept columns are the teacher's own (the ones the time embedding kept), not a re-initialization.
    cols = [next(j for j in range(64) if torch.equal(t_emb[:, j], s_emb[:, i])) for i in range(32)]
    assert cols == sorted(set(cols))
    assert template.conditioning == RECORD
    info = cli("info", cond_template / "template.safetensors")
    assert "classes:     10 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); null class 10, label dropout 0.1" in info.output
    # Each label still changes the template's output, as it changes the teacher's.
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        a = template.unet(x, t, class_labels=torch.tensor([1, 1])).sample
        b = template.unet(x, t, class_labels=torch.tensor([7, 7])).sample
    assert not torch.allclose(a, b)


def test_taylor_ranks_with_each_images_label(in_tmp: Path, cond_template: Path, monkeypatch) -> None:
    """Taylor importance of a conditional teacher runs its conditional loss: every image with its own class."""
    import importlib

    taylor = importlib.import_module("o2mcli.pruning.importance.taylor")
    seen = []
    real = taylor.predict
    monkeypatch.setattr(taylor, "predict", lambda m, x, t, c=None: seen.append(c) or real(m, x, t, c))
    res = cli("prune", "ct", "--ratio", "0.5", "--importance", "taylor", "--data", "digits", "--taylor-batches", "2",
              "--no-throughput", "-o", "tay")
    assert res.exit_code == 0, res.output
    assert len(seen) == 2 and all(c is not None and c.max() < 10 for c in seen)


def test_prune_refuses_other_class_embeddings(in_tmp: Path, tmp_path: Path) -> None:
    from o2mcli.models.configs import scheduler_config
    from o2mcli.models.io import build_unet, save_model_file

    cfg = unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2)
    cfg["class_embed_type"] = "timestep"
    save_model_file(tmp_path / "ts.safetensors", build_unet(cfg, None, Path("x")), scheduler_config(), kind="teacher")
    assert_refused(cli("prune", tmp_path / "ts.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "p"),
                   "ts.safetensors", "class_embed_type='timestep'")
    assert not (in_tmp / "p").exists()


# 2. distill: labels reach teacher and students --------------------------------------------------------------------

def _label_spy(model: torch.nn.Module, into: list) -> None:
    model.class_embedding.register_forward_hook(lambda m, args, out: into.append(args[0].detach().cpu().clone()))


@pytest.mark.parametrize("mode", ["o2mkd", "dkdm"])
def test_teacher_and_students_see_the_same_labels(in_tmp: Path, cond_template: Path, mode: str) -> None:
    """One step: the teacher's labels are its batches' labels and each student gets its own batch's labels;
    with --label-dropout 0.5 about half are the null class."""
    from o2mcli.distill.build import make_distiller
    from o2mcli.distill.inputs import load_inputs
    from o2mcli.distill.modes import MODES
    from o2mcli.distill.plan import plan_for
    from o2mcli.models.io import unet_config_of
    from o2mcli.runtime.dist import DistState
    from o2mcli.stages.distill import DistillConfig
    from o2mcli.data import load_dataset

    cfg = DistillConfig(template=str(cond_template), mode=mode, students=2, steps=1, batch_size=64,
                        label_dropout=0.5, rho=0.05, init_steps=2, device="cpu", out=in_tmp / "s")
    _, _, tpath, teacher, student, where = load_inputs(cfg)
    m = MODES.resolve(mode)(cfg)
    m.check_inputs(teacher, tpath, unet_config_of(student), where)
    plan = plan_for(None, teacher.num_train_timesteps, 2, 0.5)
    data = load_dataset("digits") if m.data_spec() else None
    eng = make_distiller(cfg, student, teacher, plan, torch.device("cpu"), DistState(), m.make_source(teacher, data,
                                                                                                      plan, None))
    m.prepare(eng, None)
    seen_t, seen_s = [], [[] for _ in eng.students]
    _label_spy(eng.teacher, seen_t)
    for st, into in zip(eng.students, seen_s):
        _label_spy(st.raw, into)
    draws = []
    real_draw = eng.source.draw
    eng.source.draw = lambda *a: draws.append(real_draw(*a)) or draws[-1]
    eng.step()
    batches = [d.cond.labels.cpu() for d in draws]  # a class-conditional batch: a Condition of labels
    seen_t = [torch.cat(seen_t)]  # the teacher runs once per distinct batch, in draw order
    assert torch.equal(seen_t[0], torch.cat(batches))
    for saw in seen_s:  # each student trained on one of the step's batches, with that batch's labels
        assert len(saw) == 1 and any(torch.equal(saw[0], b) for b in batches)
    null = (seen_t[0] == 10).float().mean()
    assert 0.3 < null < 0.7 and seen_t[0].max() == 10 and seen_t[0].min() >= 0
    if mode == "dkdm":
        assert eng.source.y is not None and torch.equal(draws[0].cond.labels.cpu(), eng.source.y[draws[0].slots])


def test_buffer_build_and_restarts_use_each_slots_label(cond_template: Path, in_tmp: Path) -> None:
    """The shuffle-denoise build runs the teacher with every slot's own label; a slot restarting from noise
    draws a new label."""
    from o2mcli.diffusion.schedulers import schedule_terms
    from o2mcli.data.labels import LabelPlan
    from o2mcli.distill.sources.buffer import DynamicBuffer

    teacher = load_model(in_tmp / "ct")
    plan = LabelPlan(tuple("0123456789"), 10, 0.2)
    buf = DynamicBuffer((1, 8, 8), 40, schedule_terms(teacher.scheduler_config), torch.device("cpu"), labels=plan)
    seen: list = []
    _label_spy(teacher.unet, seen)
    g = torch.Generator().manual_seed(0)
    buf.initialize(teacher.unet, g, 4, 64)
    assert buf.y.shape == (40,) and set(buf.y.tolist()) <= set(range(11))
    # Every forward of the build ran on slots whose labels it used: the multiset of labels seen is drawn from y.
    assert set(torch.cat(seen).tolist()) <= set(buf.y.tolist())
    first = seen[0]
    assert torch.equal(first, buf.y[buf.t < 999])  # the first DDIM move takes every slot not left at T-1, in order
    buf.t[:] = 0  # every slot at t = 0: the next reverse step restarts them all
    buf.begin_step()
    batch = buf.draw(0, 1000, 40, g)
    old = buf.y.clone()
    buf.after_teacher(batch, torch.zeros(40, 1, 8, 8), g)
    assert buf.restarts == 40 and not torch.equal(buf.y, old) and (buf.t == 999).all()
    state = buf.state_tensors()
    assert torch.equal(state["y"], buf.y)
    del state["y"]
    with pytest.raises(Exception, match="no slot labels"):
        buf.load_state_tensors(state)


# 3. distill end to end, merge, sample ------------------------------------------------------------------------------

def test_conditional_students_through_merge_and_sample(in_tmp: Path, cond_template: Path) -> None:
    for mode_args, out in ((["-k", "2"], "o2m"), ([*DKDM, "-k", "1"], "dk")):
        res = cli("distill", cond_template, *mode_args, *FAST, "-o", out)
        assert res.exit_code == 0, res.output
        students = load_model(in_tmp / out)
        assert students.conditioning == RECORD
        man = json.loads((in_tmp / out / "manifest.json").read_text())
        assert man["summary"]["conditioning"] == RECORD and man["config"]["label_dropout"] is None
    assert cli("merge", "o2m", "-o", "merged.safetensors").exit_code == 0
    assert load_model(in_tmp / "merged.safetensors").conditioning == RECORD
    # Exported, it is a plain diffusers UNet with the label table; o2m reads the class names back.
    assert cli("export", "merged.safetensors", "-o", "pipe").exit_code == 0
    from diffusers import UNet2DModel

    assert UNet2DModel.from_pretrained(in_tmp / "pipe" / "unet").config.num_class_embeds == 11
    assert load_model(in_tmp / "pipe").conditioning == RECORD
    # Students of an unconditional run do not merge with conditional ones.
    plain = _student_json(in_tmp / "plain.json")
    assert cli("distill", "--student-config", plain, "--teacher", "digits-teacher", "-k", "1", *FAST,
               "-o", "un").exit_code == 0
    assert_refused(cli("merge", "o2m/student_0.safetensors", "un/student_0.safetensors", "--method", "average",
                       "-o", "bad.safetensors"), "conditioned differently", "unconditional", "classes 0,1,2")
    for model in ("o2m", "dk", "merged.safetensors"):
        res = cli("sample", model, "--classes", "2,5", "--guidance", "2", *SAMPLE, "-o", f"s-{model}")
        assert res.exit_code == 0, res.output
        with np.load(in_tmp / f"s-{model}" / "samples.npz") as z:
            assert z["labels"].tolist() == [2, 5] * 6


def test_conditional_resume_is_bit_exact(in_tmp: Path, cond_template: Path, monkeypatch) -> None:
    """The slots' labels are checkpointed: a crashed DKDM run resumes to the uninterrupted run's weights."""
    args = ["distill", cond_template, *DKDM, "--steps", "6", "--save-every", "2", "--batch-size", "8",
            "--device", "cpu", "--lr-warmup", "0"]
    assert cli(*args, "-o", "ref").exit_code == 0
    undo = crash_at_step(monkeypatch, 4)
    assert cli(*args, "-o", "run").exit_code == 1
    undo()
    res = cli(*args, "-o", "run", "--resume")
    assert res.exit_code == 0, res.output
    a, b = (load_file(str(in_tmp / run / "student_0.safetensors")) for run in ("ref", "run"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_student_config_for_a_conditional_teacher(in_tmp: Path, cond_template: Path, tmp_path: Path) -> None:
    good = _student_json(tmp_path / "good.json", num_classes=10)  # 10 classes + the null class = 11 embeddings
    res = cli("distill", "--student-config", good, "--teacher", "ct", "-k", "1", *FAST, "-o", "fresh")
    assert res.exit_code == 0, res.output
    assert load_model(in_tmp / "fresh").conditioning == RECORD
    assert_refused(cli("distill", "--student-config", _student_json(tmp_path / "plain.json"), "--teacher", "ct",
                       *FAST, "-o", "x"), "plain.json", "no class embedding", "num_class_embeds to 11")
    assert_refused(cli("distill", "--student-config", _student_json(tmp_path / "five.json", num_classes=4),
                       "--teacher", "ct", *FAST, "-o", "x"), "five.json", "5 class embeddings", "11")
    assert_refused(cli("distill", "--student-config", good, "--teacher", "digits-teacher", *FAST, "-o", "x"),
                   "good.json", "class-conditional student", "unconditional")
    assert not (in_tmp / "x").exists()


def test_conditional_distill_refusals(in_tmp: Path, cond_template: Path, tmp_path: Path) -> None:
    # --label-dropout needs a class-conditional teacher, and a probability.
    assert_refused(cli("distill", "--student-config", _student_json(tmp_path / "plain.json"), "--teacher",
                       "digits-teacher", "--label-dropout", "0.2", *FAST, "-o", "x"), "--label-dropout 0.2",
                   "not class-conditional")
    assert_refused(cli("distill", cond_template, "--label-dropout", "1.5", *FAST, "-o", "x"), "--label-dropout")
    # Data whose classes are not the teacher's.
    for name in ("a", "b"):
        (tmp_path / "two" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "two" / name / "x.png")
    assert_refused(cli("distill", cond_template, "--data", tmp_path / "two", *FAST, "-o", "x"),
                   "classes a, b differ from the teacher's")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "x.png")
    assert_refused(cli("distill", cond_template, "--data", tmp_path / "flat", *FAST, "-o", "x"), "no class labels")
    assert not (in_tmp / "x").exists()
