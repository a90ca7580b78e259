"""o2m distill with a DiT on either side (issue #14): UNet -> DiT, DiT -> UNet, DiT -> smaller DiT, in O2MKD and DKDM;
class labels across families, feature KD between token maps and UNet blocks, resume, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, cli, crash_at_step, tiny_scheduler, tiny_teacher_file, tiny_unet
from dit_tiny import dit_config, tiny_dit
from o2mcli.models.configs import unet_config
from o2mcli.models.io import load_model, save_model_file

FAST = ["--steps", "3", "--batch-size", "4", "--device", "cpu", "--lr-warmup", "0", "-k", "1", "--log-every", "1"]
DKDM = ["--mode", "dkdm", "--rho", "0.01", "--init-steps", "2", "--init-batch", "64"]
RECORD = {"type": "class", "classes": list("0123456789"), "null_class": 10, "label_dropout": 0.1}


def _json(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def _unet_json(path: Path, **kw) -> Path:
    return _json(path, unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2, **kw))


def _dit_teacher(path: Path, conditioning: dict | None, **kw) -> Path:
    """A tiny DiT saved as an o2m teacher; ``conditioning`` None records it as unconditional (null class only)."""
    prov = {"conditioning": conditioning}
    save_model_file(path, tiny_dit(seed=1, **kw), tiny_scheduler(T=20), kind="teacher", provenance=prov)
    return path


def _ok(res) -> None:
    assert res.exit_code == 0, res.output


def _student(out: Path):
    return load_model(out / "student_0.safetensors")


# 1. UNet teacher -> DiT student -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["o2mkd", "dkdm"])
def test_unconditional_unet_teacher_to_dit(in_tmp: Path, mode: str) -> None:
    """An unconditional teacher's DiT student always gets the null class; it is written as unconditional."""
    tiny_teacher_file(in_tmp / "t.safetensors", T=20)
    cfg = _json(in_tmp / "dit.json", dit_config(classes=1))
    extra = DKDM if mode == "dkdm" else []
    _ok(cli("distill", "--student-config", cfg, "--teacher", "t.safetensors", *extra, *FAST, "-o", "s"))
    st = _student(in_tmp / "s")
    assert type(st.unet).__name__ == "DiTTransformer2DModel" and st.conditioning is None


@pytest.mark.parametrize("mode", ["o2mkd", "dkdm"])
def test_class_conditional_unet_teacher_to_dit(in_tmp: Path, mode: str, monkeypatch) -> None:
    """digits-cond-teacher (num_class_embeds 11) -> a DiT of 10 classes: labels reach teacher and student alike."""
    from o2mcli.distill.engine import Distiller

    seen: list[torch.Tensor] = []
    real = Distiller._run_teacher

    def spy(self, keys, batches, *rest):
        seen.extend(batches[r].cond for r in keys)
        return real(self, keys, batches, *rest)

    monkeypatch.setattr(Distiller, "_run_teacher", spy)
    cfg = _json(in_tmp / "dit.json", dit_config(classes=10))
    extra = DKDM if mode == "dkdm" else []
    _ok(cli("distill", "--student-config", cfg, "--teacher", "digits-cond-teacher", *extra, *FAST,
            "--steps", "2", "-o", "s"))
    assert seen and all(c is not None and int(c.labels.max()) <= 10 for c in seen)  # Conditions of labels
    assert _student(in_tmp / "s").conditioning == RECORD


# 2. DiT teacher -> UNet student, DiT -> DiT -------------------------------------------------------------------------

def test_unconditional_dit_teacher_to_unet(in_tmp: Path) -> None:
    _dit_teacher(in_tmp / "dt.safetensors", None, classes=1)
    _ok(cli("distill", "--student-config", _unet_json(in_tmp / "u.json"), "--teacher", "dt.safetensors", *FAST,
            "-o", "s"))
    st = _student(in_tmp / "s")
    assert type(st.unet).__name__ == "UNet2DModel" and st.conditioning is None


def test_class_conditional_dit_teacher_to_unet_dkdm(in_tmp: Path) -> None:
    _dit_teacher(in_tmp / "dt.safetensors", RECORD)
    _ok(cli("distill", "--student-config", _unet_json(in_tmp / "u.json", num_classes=10), "--teacher",
            "dt.safetensors", *DKDM, *FAST, "-o", "s"))
    assert _student(in_tmp / "s").conditioning == RECORD


def test_dit_teacher_to_smaller_dit_feature_kd(in_tmp: Path) -> None:
    """DiT -> a narrower, shallower DiT: its blocks pair with the teacher's by name, projections bridge widths."""
    _dit_teacher(in_tmp / "dt.safetensors", RECORD)
    small = _json(in_tmp / "small.json", dit_config(classes=10, head_dim=4, layers=2))
    _ok(cli("distill", "--student-config", small, "--teacher", "dt.safetensors", "--kd", "feat", *FAST, "-o", "s"))
    st = _student(in_tmp / "s")
    assert len(st.unet.transformer_blocks) == 2 and st.conditioning == RECORD


# 3. Feature KD across families ----------------------------------------------------------------------------------------

def test_dit_tokens_become_patch_grids_and_pair_by_depth() -> None:
    from o2mcli.distill.features import FeatureTap, feature_match

    dit, unet = tiny_dit(layers=3), tiny_unet(block_out_channels=(8, 16))
    tap = FeatureTap(dit, ["transformer_blocks.0"])
    dit(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), class_labels=torch.tensor([0, 10]))
    f = tap.pop()["transformer_blocks.0"]
    assert f.shape == (2, 16, 4, 4)  # (B, width, 8/2, 8/2)
    names, s_ch, t_ch, pairs = feature_match(dit, unet)
    # Relative depth over each side's points (DiT: 0, 1/2, 1; UNet: down 0, 1/4, mid 1/2, up 3/4, 1), the teacher's
    # restricted to the 4x4 ones (down_blocks.0/1, mid_block): the last DiT block takes the deepest of them.
    assert names == [f"transformer_blocks.{i}" for i in range(3)]
    assert pairs == {"transformer_blocks.0": "down_blocks.0", "transformer_blocks.1": "mid_block",
                     "transformer_blocks.2": "mid_block"}
    assert set(s_ch.values()) == {16} and t_ch == {"transformer_blocks.0": 8, "transformer_blocks.1": 16,
                                                   "transformer_blocks.2": 16}
    *_, back = feature_match(unet, dit)  # the other way: the UNet's 4x4 blocks take DiT blocks (ties: shallower)
    assert back == {"down_blocks.0": "transformer_blocks.0", "down_blocks.1": "transformer_blocks.0",
                    "mid_block": "transformer_blocks.1"}


@pytest.mark.parametrize("kd", ["at", "sp", "crd", "feat"])
def test_feature_kd_between_unet_teacher_and_dit_student(in_tmp: Path, kd: str) -> None:
    tiny_teacher_file(in_tmp / "t.safetensors", T=20)
    cfg = _json(in_tmp / "dit.json", dit_config(classes=1))
    _ok(cli("distill", "--student-config", cfg, "--teacher", "t.safetensors", "--kd", kd, *FAST, "-o", "s"))
    rows = [json.loads(line) for line in (in_tmp / "s" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] == r["loss"] for r in rows)


def test_feature_kd_between_dit_teacher_and_unet_student(in_tmp: Path) -> None:
    _dit_teacher(in_tmp / "dt.safetensors", None, classes=1)
    _ok(cli("distill", "--student-config", _unet_json(in_tmp / "u.json"), "--teacher", "dt.safetensors",
            "--kd", "feat", *FAST, "-o", "s"))


# 4. Resume ------------------------------------------------------------------------------------------------------------

def test_dit_student_resumes_bit_for_bit(in_tmp: Path, monkeypatch) -> None:
    tiny_teacher_file(in_tmp / "t.safetensors", T=20)
    cfg = _json(in_tmp / "dit.json", dit_config(classes=1))
    args = ["distill", "--student-config", cfg, "--teacher", "t.safetensors", *DKDM, *FAST, "--steps", "4",
            "--save-every", "2"]
    _ok(cli(*args, "-o", "ref"))
    undo = crash_at_step(monkeypatch, 3)
    assert cli(*args, "-o", "run").exit_code == 1
    assert json.loads((in_tmp / "run.partial" / "checkpoint.json").read_text())["step"] == 2
    undo()
    _ok(cli(*args, "-o", "run", "--resume"))
    a, b = (load_file(str(in_tmp / run / "student_0.safetensors")) for run in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# 5. Refusals ----------------------------------------------------------------------------------------------------------

def test_dit_student_whose_label_table_does_not_fit(in_tmp: Path) -> None:
    cfg = _json(in_tmp / "dit5.json", dit_config(classes=5))
    assert_refused(cli("distill", "--student-config", cfg, "--teacher", "digits-cond-teacher", *FAST, "-o", "s"),
                   "dit5.json", "5 classes (num_embeds_ada_norm)", "has 11 class embeddings", "use 10")


def test_class_conditional_dit_teacher_refuses_an_unconditional_unet(in_tmp: Path) -> None:
    """The student cannot take labels: distilling only the teacher's null-class branch is refused (see inputs.py)."""
    _dit_teacher(in_tmp / "dt.safetensors", RECORD)
    assert_refused(cli("distill", "--student-config", _unet_json(in_tmp / "u.json"), "--teacher", "dt.safetensors",
                       *FAST, "-o", "s"), "u.json", "no class embedding", "class-conditional", "num_class_embeds to 11")


def test_dit_student_of_another_size_is_refused(in_tmp: Path) -> None:
    cfg = _json(in_tmp / "dit16.json", dit_config(classes=1, size=16))
    assert_refused(cli("distill", "--student-config", cfg, "--teacher", "digits-teacher", *FAST, "-o", "s"),
                   "dit16.json", "1x16^2", "1x8^2")
