"""One contract for every model family o2m serves, as diffusers' model tester mixins give every model one battery.

``CASES`` is the table: one row per (family, conditioning or parametrization) o2m serves. Every check below runs
on every row, each check its own test function, so a failure names the check and the case (``test_prune[dit-class]``).
The expensive artifacts of a row (its teacher, template, students, merge, samples, export) are built once, lazily,
by the module-scoped ``chain`` fixture and shared by the row's checks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, ok, tiny_scheduler, tiny_teacher_file
from dit_tiny import tiny_dit
from o2mcli.models.denoise import input_shape, predict
from o2mcli.models.families import FAMILIES, PIPELINES
from o2mcli.models.io import load_model, save_model_file

RECORD = {"type": "class", "classes": list("0123456789"), "null_class": 10, "label_dropout": 0.1}

# The smallest settings that still run each stage's code: two optimizer steps, batches of 4, a 2-step DKDM buffer.
DISTILL = ["--steps", "2", "-b", "4", "--lr-warmup", "0", "--device", "cpu", "--log-every", "1"]
O2MKD = ["-k", "2"]
DKDM = ["--mode", "dkdm", "-k", "1", "--rho", "0.01", "--init-steps", "2", "--init-batch", "64"]
N_SAMPLES = 2
SAMPLE = ["-n", str(N_SAMPLES), "--steps", "2", "-b", str(N_SAMPLES), "--device", "cpu", "--no-png"]


# 1. How each row's tiny teacher is built (each writes into ``root`` and returns the teacher's path) ------------------

def _pixel_uncond(root: Path) -> Path:
    return tiny_teacher_file(root / "teacher.safetensors")


def _pixel_class(root: Path) -> Path:
    """A (8, 16) UNet2DModel on 1x8x8 digits with 10 classes and the null class (11 embeddings), o2m's record."""
    from o2mcli.models.configs import unet_config
    from o2mcli.models.io import build_unet

    torch.manual_seed(0)
    cfg = unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2, num_classes=10)
    cfg["attention_head_dim"] = 4  # as conftest's tiny UNets: room to prune (8, 16) to (4, 8)
    unet = build_unet(cfg, None, Path("tiny"))
    return save_model_file(root / "teacher.safetensors", unet, tiny_scheduler(), kind="teacher",
                           provenance={"conditioning": RECORD})


def _pixel_v_learned(root: Path) -> Path:
    from test_vpred import _v_teacher  # a learned-variance (2C outputs) v-prediction UNet2DModel

    return _v_teacher(root / "teacher.safetensors", "learned")


def _dit_class(root: Path) -> Path:
    save_model_file(root / "teacher.safetensors", tiny_dit(1, heads=4, layers=2), tiny_scheduler(), kind="teacher",
                    provenance={"conditioning": RECORD})
    return root / "teacher.safetensors"


def _text_data(root: Path) -> None:
    """What a text row's distill reads: captioned images (O2MKD) and a prompt file (DKDM)."""
    from sd_tiny import CAPTIONS, save_captioned

    save_captioned(root / "caps", n=8)
    (root / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")


def _sd1(root: Path) -> Path:
    from sd_tiny import save_tiny_sd

    _text_data(root)
    return save_tiny_sd(root / "sd")


def _sd2_v(root: Path) -> Path:
    from test_vpred import _sd_v  # the tiny pipeline with SD 2.x's v-prediction, trailing scheduler

    _text_data(root)
    return _sd_v(root / "sd")


def _sdxl(root: Path) -> Path:
    from sdxl_tiny import save_tiny_sdxl

    _text_data(root)
    return save_tiny_sdxl(root / "sdxl")


# 2. The table ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """Extra CLI arguments a row's models must refuse, and the words the one-line error must name."""

    name: str
    args: tuple[str, ...]
    words: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One row of the contract.

    To add a family (or a new conditioning or parametrization of one): write a ``build(root) -> teacher path``
    function that saves a tiny random teacher (seconds on a CPU; reuse the tiny fixtures in conftest, sd_tiny,
    dit_tiny), then append a ``Case`` to ``CASES`` naming its diffusers ``_class_name`` (``family``, a key of
    ``o2mcli.models.families.FAMILIES``), the extra arguments each stage needs (``distill_args`` for O2MKD,
    ``dkdm_args`` for DKDM, ``sample_args``), the images ``o2m sample`` writes, the plain diffusers class that loads
    ``o2m export``'s output (``export_class``) and the conditions its models must refuse (``wrong_sample``,
    ``wrong_dkdm``).
    ``test_every_served_family_has_a_case`` fails until a family whose ``not_yet`` is None has a row.
    """

    id: str
    family: str
    build: Callable[[Path], Path]
    cond: Optional[str]  # None, "class" (labels 0..9, null class 10) or "text" (the tiny CLIP text encoder's)
    prediction_type: str
    learned_variance: bool
    sample_args: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C) of each image in samples.npz
    export_class: str  # the diffusers class whose from_pretrained loads the export, local files only
    wrong_sample: tuple[Refusal, ...]  # conditions ``o2m sample`` must refuse for this row's models
    wrong_dkdm: Refusal  # what ``o2m distill --mode dkdm`` must refuse (instead of dkdm_args)
    distill_args: tuple[str, ...] = ()  # O2MKD's data (default: the bundled 8x8 digits, with their labels)
    dkdm_args: tuple[str, ...] = ()
    deepcache: bool = True  # False: the family has no skip branches and --deepcache is refused


# Conditions a row's models do not take.
CLASS_FOR_UNCOND = Refusal("class", ("--class", "3"), ("--class", "not class-conditional"))
GUIDANCE_FOR_UNCOND = Refusal("guidance", ("--guidance", "3"), ("--guidance", "not class-conditional"))
PROMPT_FOR_PIXEL = Refusal("prompt", ("--prompt", "a red cat"), ("--prompt", "not text-conditioned"))
CLASS_OUT_OF_RANGE = Refusal("class-10", ("--class", "10"), ("--class 10", "classes 0..9"))
CLASS_FOR_TEXT = Refusal("class", ("--class", "3", "--prompt", "a red cat"), ("--class", "text-conditioned"))
NO_PROMPT_FOR_TEXT = Refusal("no-prompt", (), ("samples from prompts", "--prompt"))
PROMPTS_FOR_PIXEL_DKDM = Refusal("prompts", ("--prompts", "prompts.txt"), ("--prompts", "not text-conditioned"))
NO_PROMPTS_FOR_TEXT_DKDM = Refusal("no-prompts", (), ("--prompts", "data-free from a prompt list"))

CLASS = ("--class", "3", "--guidance", "2")  # the null class's branch runs too
PROMPT = ("--prompt", "a red cat")

PIXEL = dict(image_shape=(8, 8, 1), wrong_dkdm=PROMPTS_FOR_PIXEL_DKDM)
TEXT = dict(family="UNet2DConditionModel", cond="text", sample_args=PROMPT, image_shape=(16, 16, 3),
            export_class="StableDiffusionPipeline", wrong_sample=(CLASS_FOR_TEXT, NO_PROMPT_FOR_TEXT),
            wrong_dkdm=NO_PROMPTS_FOR_TEXT_DKDM, distill_args=("--data", "caps"),
            dkdm_args=("--prompts", "prompts.txt"))

CASES = [
    Case("unet-uncond", family="UNet2DModel", build=_pixel_uncond, cond=None, prediction_type="epsilon",
         learned_variance=False, sample_args=(), export_class="DDPMPipeline",
         wrong_sample=(CLASS_FOR_UNCOND, GUIDANCE_FOR_UNCOND, PROMPT_FOR_PIXEL), **PIXEL),
    Case("unet-class", family="UNet2DModel", build=_pixel_class, cond="class", prediction_type="epsilon",
         learned_variance=False, sample_args=CLASS, export_class="DDPMPipeline",
         wrong_sample=(PROMPT_FOR_PIXEL, CLASS_OUT_OF_RANGE), **PIXEL),
    Case("unet-v-learned", family="UNet2DModel", build=_pixel_v_learned, cond=None, prediction_type="v_prediction",
         learned_variance=True, sample_args=(), export_class="DDPMPipeline",
         wrong_sample=(CLASS_FOR_UNCOND, PROMPT_FOR_PIXEL), **PIXEL),
    Case("dit-class", family="DiTTransformer2DModel", build=_dit_class, cond="class", prediction_type="epsilon",
         learned_variance=False, sample_args=CLASS, export_class="DiTTransformer2DModel",  # no pixel DiT pipeline
         wrong_sample=(PROMPT_FOR_PIXEL, CLASS_OUT_OF_RANGE), deepcache=False, **PIXEL),
    Case("sd1-text", build=_sd1, prediction_type="epsilon", learned_variance=False, **TEXT),
    Case("sd2-v-text", build=_sd2_v, prediction_type="v_prediction", learned_variance=False, **TEXT),
    Case("sdxl-text", build=_sdxl, prediction_type="epsilon", learned_variance=False,
         **{**TEXT, "export_class": "StableDiffusionXLPipeline"}),
]
"""The contract's rows, one per (family, conditioning or parametrization) o2m serves. To add one, write its tiny
teacher's ``build`` function and append a ``Case`` (its docstring lists the fields); every check then runs on it."""
IDS = [c.id for c in CASES]


def by_case(fn):
    return pytest.mark.parametrize("case", CASES, ids=IDS)(fn)


# 3. Each row's artifacts, built once and shared by its checks ------------------------------------------------------

class Chain:
    """A row's stages run on demand in its own directory: teacher -> template -> students / free -> merged ->
    samples, export. A stage that failed is not rerun: the checks that need it fail naming it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple[str, str], Path] = {}
        self.failed: dict[tuple[str, str], str] = {}

    def dir(self, case: Case) -> Path:
        d = self.root / case.id
        d.mkdir(exist_ok=True)
        return d

    def get(self, case: Case, stage: str) -> Path:
        key = (case.id, stage)
        if key in self.failed:
            pytest.fail(f"{case.id}: stage {stage} failed earlier: {self.failed[key]}")
        if key not in self.done:
            import os

            old = os.getcwd()
            os.chdir(self.dir(case))
            try:
                self.done[key] = getattr(self, f"_{stage}")(case).resolve()
            except BaseException as e:  # noqa: BLE001 (pytest's Failed included: remembered, re-raised)
                self.failed[key] = f"{type(e).__name__}: {str(e)[:1500]}"
                raise
            finally:
                os.chdir(old)
                from o2mcli.outputs import release_all

                release_all()
        return self.done[key]

    def _teacher(self, case: Case) -> Path:
        return case.build(Path(".").resolve())

    def _template(self, case: Case) -> Path:
        ok("prune", self.get(case, "teacher"), "--ratio", "0.5", "--no-throughput", "-o", "tpl")
        return Path("tpl")

    def _students(self, case: Case) -> Path:
        ok("distill", self.get(case, "template"), *O2MKD, *case.distill_args, *DISTILL, "-o", "st")
        return Path("st")

    def _free(self, case: Case) -> Path:
        ok("distill", self.get(case, "template"), *DKDM, *case.dkdm_args, *DISTILL, "-o", "free")
        return Path("free")

    def _merged(self, case: Case) -> Path:
        ok("merge", self.get(case, "students"), "-o", "merged.safetensors")
        return Path("merged.safetensors")

    def _samples(self, case: Case) -> Path:
        ok("sample", self.get(case, "students"), *case.sample_args, *SAMPLE, "-o", "samples")
        return Path("samples")

    def _export(self, case: Case) -> Path:
        ok("export", self.get(case, "merged"), "-o", "pipe")
        return Path("pipe")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return Chain(tmp_path_factory.mktemp("contract"))


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _predict(case: Case, model: torch.nn.Module) -> torch.Tensor:
    """o2m's own predict on a random batch of 2 at t = 10 and 900, with a condition of the row's kind: class labels
    (the null class among them) or text embeddings of the width the model cross-attends to. Checks the shape:
    (B, C or 2C, H, W) for the model's (C, H, W)."""
    g = torch.Generator().manual_seed(0)
    c, h, w = input_shape(model)
    cond = {"class": torch.tensor([3, 10]), None: None}.get(case.cond)
    if case.cond == "text":
        cond = torch.randn(2, 77, model.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = predict(model, torch.randn(2, c, h, w, generator=g), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 2 * c if case.learned_variance else c, h, w)
    return out


# 4. The battery ----------------------------------------------------------------------------------------------------

def test_every_served_family_has_a_case() -> None:
    served = {name for name in FAMILIES if FAMILIES[name].not_yet is None}
    assert served, "no family is served"
    missing = served - {c.family for c in CASES}
    assert not missing, f"families without a contract row (add a Case to CASES): {sorted(missing)}"
    assert {c.family for c in CASES} <= set(FAMILIES), "a row names a family o2m does not register"
    # and every pipeline format (SD, SDXL: a codec of their own) exports in some row
    missing = set(PIPELINES) - {c.export_class for c in CASES}
    assert not missing, f"pipeline formats without a contract row (add a Case to CASES): {sorted(missing)}"
    assert len(set(IDS)) == len(IDS)


@by_case
def test_info(case: Case, chain: Chain) -> None:
    teacher = chain.get(case, "teacher")
    d = json.loads(ok("info", teacher, "--json"))
    assert d["class"] == case.family
    loaded = load_model(teacher)
    assert type(loaded.unet).__name__ == case.family
    assert d["params"] == _params(loaded.unet) > 0
    assert loaded.scheduler_config.get("prediction_type", "epsilon") == case.prediction_type
    kind = (loaded.conditioning or {}).get("type")
    assert kind == case.cond, loaded.conditioning
    text = ok("info", teacher)
    assert case.family in text and "params" in text


@by_case
def test_predict_shapes(case: Case, chain: Chain) -> None:
    assert torch.isfinite(_predict(case, load_model(chain.get(case, "teacher")).unet)).all()


@by_case
def test_prune(case: Case, chain: Chain) -> None:
    teacher, template = load_model(chain.get(case, "teacher")), load_model(chain.get(case, "template"))
    assert type(template.unet).__name__ == case.family
    assert _params(template.unet) < 0.6 * _params(teacher.unet)
    assert input_shape(template.unet) == input_shape(teacher.unet)
    assert template.scheduler_config.get("prediction_type", "epsilon") == case.prediction_type
    assert (template.conditioning or {}).get("type") == case.cond
    _predict(case, template.unet)  # the teacher's output channels (2C with a learned variance)


@by_case
@pytest.mark.parametrize("mode", ["o2mkd", "dkdm"])
def test_distill(case: Case, chain: Chain, mode: str) -> None:
    out = chain.get(case, "students" if mode == "o2mkd" else "free")
    st = load_model(out)
    assert st.kind == "students"
    assert len(st.ranges) == (2 if mode == "o2mkd" else 1)
    assert st.ranges[0][0] == 0 and st.ranges[-1][1] == st.num_train_timesteps
    assert all(type(m).__name__ == case.family for m in (st.unet.students if st.is_group else [st.unet]))
    assert st.scheduler_config.get("prediction_type", "epsilon") == case.prediction_type
    assert (st.conditioning or {}).get("type") == case.cond
    files = sorted(p.name for p in out.glob("student_*.safetensors"))
    assert len(files) == len(st.ranges), files
    # Each student took its optimizer steps: its weights moved away from the template it started from.
    start = load_model(chain.get(case, "template")).unet.state_dict()
    for m in (st.unet.students if st.is_group else [st.unet]):
        got = m.state_dict()
        assert got.keys() == start.keys()
        assert any(not torch.equal(got[k], start[k]) for k in start)
    if case.cond == "class":
        assert st.conditioning == RECORD


@by_case
def test_merge(case: Case, chain: Chain) -> None:
    merged = load_model(chain.get(case, "merged"))
    students = load_model(chain.get(case, "students"))
    assert not merged.is_group and type(merged.unet).__name__ == case.family
    assert merged.ranges == [(0, merged.num_train_timesteps)]
    a, b = (m.state_dict() for m in students.unet.students)
    mean = {k: (a[k].float() + b[k].float()) / 2 for k in a}  # task arithmetic with lambda 1/K: the average
    got = merged.unet.state_dict()
    assert got.keys() == mean.keys()
    assert all(torch.allclose(got[k].float(), mean[k], atol=1e-6) for k in mean)
    assert (merged.conditioning or {}).get("type") == case.cond


@by_case
def test_sample(case: Case, chain: Chain) -> None:
    d = chain.get(case, "samples")
    with np.load(d / "samples.npz", allow_pickle=False) as z:
        images = z["images"]
        extra = {k: z[k] for k in z.files if k != "images"}
    assert images.shape == (N_SAMPLES, *case.image_shape) and images.dtype == np.uint8
    # uint8 cannot hold a NaN: a model gone non-finite comes out as one flat value, so the images must vary.
    assert images.min() < images.max()
    summary = json.loads((d / "manifest.json").read_text())["summary"]
    guided = summary.get("guidance", 1.0) > 1  # class rows ask for --guidance 2, text rows get 7.5
    assert guided == (case.cond is not None)
    # 2 steps over the 2 students' ranges: each student serves one step of every image (twice when guided).
    assert summary["served"] == [N_SAMPLES * (2 if guided else 1)] * 2, summary["served"]
    if case.cond == "class":
        assert extra["labels"].tolist() == [3] * N_SAMPLES
    if case.cond == "text":
        assert list(extra["prompts"]) == ["a red cat"] * N_SAMPLES


def _plain_diffusers_sample(case: Case, folder: Path) -> np.ndarray:
    """One image at 2 steps from the exported folder with diffusers alone (local files only)."""
    import diffusers

    loader = getattr(diffusers, case.export_class)
    g = torch.Generator().manual_seed(0)
    if case.cond == "text":
        pipe = loader.from_pretrained(folder, local_files_only=True)
        assert pipe.scheduler.config.prediction_type == case.prediction_type
        return pipe("a red cat", num_inference_steps=2, output_type="np", height=16, width=16, generator=g).images
    if issubclass(loader, diffusers.DiffusionPipeline):
        pipe = loader.from_pretrained(folder, local_files_only=True)
        model, scheduler = pipe.unet, pipe.scheduler
        if case.cond is None:  # DDPMPipeline takes no labels: the plain call is what users run
            assert scheduler.config.prediction_type == case.prediction_type
            return pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=g).images
    else:  # a model directory (DiT: diffusers has no pixel-space DiT pipeline) with its scheduler config beside it
        model = loader.from_pretrained(folder, local_files_only=True)
        scheduler = diffusers.DDPMScheduler.from_pretrained(folder, local_files_only=True)
    # Class-conditional: the denoising loop of DDPMPipeline, with the label the model's table takes.
    assert scheduler.config.prediction_type == case.prediction_type
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(1, c, s, s, generator=g)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t.reshape(1), class_labels=torch.tensor([3])).sample
            x = scheduler.step(out, t, x, generator=g).prev_sample
    return x.clamp(-1, 1).numpy()


@by_case
def test_export_loads_in_plain_diffusers(case: Case, chain: Chain) -> None:
    folder = chain.get(case, "export")
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    images = _plain_diffusers_sample(case, folder)
    assert images.shape[0] == 1 and np.isfinite(images).all()
    # The exported denoiser is the merged model, tensor for tensor.
    from safetensors.torch import load_file

    weights = next(p for p in (folder / "unet" / "diffusion_pytorch_model.safetensors",
                               folder / "diffusion_pytorch_model.safetensors") if p.is_file())
    exported, merged = load_file(str(weights)), load_model(chain.get(case, "merged")).unet.state_dict()
    assert exported.keys() == merged.keys()
    assert all(torch.equal(exported[k].float(), merged[k].float()) for k in merged)


@by_case
def test_export_reads_back_in_o2m(case: Case, chain: Chain) -> None:
    """o2m loads its own export as the row's family, with its conditioning and parametrization, and samples it."""
    folder = chain.get(case, "export")
    back, merged = load_model(folder), load_model(chain.get(case, "merged"))
    assert type(back.unet).__name__ == case.family
    assert back.scheduler_config.get("prediction_type", "epsilon") == case.prediction_type
    if case.cond == "class":
        assert back.conditioning == merged.conditioning == RECORD
    else:
        assert (back.conditioning or {}).get("type") == case.cond
    out = chain.dir(case) / "s-export"
    ok("sample", folder, *case.sample_args, *SAMPLE, "-o", out)
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["images"].shape == (N_SAMPLES, *case.image_shape)


@by_case
def test_info_on_every_artifact(case: Case, chain: Chain) -> None:
    """``o2m info`` reads every output of the chain (integrity ok), and names the family of each single model."""
    for stage in ("template", "students", "free", "merged", "export", "samples"):
        d = json.loads(ok("info", chain.get(case, stage), "--json"))
        assert d.get("integrity", "ok") == "ok", (stage, d.get("integrity"))
        if stage in ("merged", "export"):
            assert d["class"] == case.family, stage
        else:
            assert d["kind"] == {"free": "students"}.get(stage, stage)


@by_case
@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++"])
def test_sample_schedulers(case: Case, chain: Chain, scheduler: str) -> None:
    """The merged model samples with every scheduler (ddim is the chain's own sample)."""
    merged = chain.get(case, "merged")
    out = chain.dir(case) / f"s-{scheduler}"
    ok("sample", merged, *case.sample_args, *SAMPLE, "--scheduler", scheduler, "-o", out)
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        images = z["images"]
    assert images.shape == (N_SAMPLES, *case.image_shape) and images.min() < images.max()


@by_case
def test_deepcache(case: Case, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A UNet family samples with DeepCache; a family without skip branches refuses it by name (one line)."""
    merged = chain.get(case, "merged")
    args = ("sample", merged, *case.sample_args, *SAMPLE, "--steps", "3", "--deepcache", "2")
    if not case.deepcache:
        _refused_writing_nothing(case, chain, monkeypatch, (*args, "-o", "bad-out"),
                                 ("DeepCache needs a UNet", case.family))
        return
    out = chain.dir(case) / "s-deepcache"
    ok(*args, "-o", out)
    dc = json.loads((out / "manifest.json").read_text())["summary"]["deepcache"]
    assert dc["interval"] == 2 and dc["full_calls"] >= 1 and dc["partial_calls"] >= 1, dc


# (The advisory note on N >= --steps comes only once every input is checked: a refusal is one line.)
@pytest.mark.parametrize("case", [c for c in CASES if not c.deepcache], ids=[c.id for c in CASES if not c.deepcache])
def test_deepcache_refusal_is_one_line(case: Case, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    merged = chain.get(case, "merged")  # SAMPLE has --steps 2
    _refused_writing_nothing(case, chain, monkeypatch, ("sample", merged, *case.sample_args, *SAMPLE,
                                                        "--deepcache", "2", "-o", "bad-out"),
                             ("DeepCache needs a UNet", case.family))


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _pickled(case: Case, chain: Chain, source: str) -> Path:
    """A copy of the row's teacher or export whose denoiser weights are a pickle (.bin) file instead of
    safetensors: an o2m file renamed, or in a diffusers directory (pipeline or model) the weights file renamed."""
    model = chain.get(case, source)
    root = chain.dir(case) / f"pickled-{source}"
    made = root / (model.stem + ".bin" if model.is_file() else model.name)
    if made.exists():
        return made
    if model.is_file():
        root.mkdir(exist_ok=True)
        shutil.copy(model, made)
        return made
    shutil.copytree(model, made)
    weights = next(made.glob("unet/*.safetensors"), None) or next(made.glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    return made


@by_case
@pytest.mark.parametrize("source", ["teacher", "export"])
@pytest.mark.parametrize("command", ["info", "prune", "sample"])
def test_refuses_pickled_weights(case: Case, chain: Chain, source: str, command: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _pickled(case, chain, source)
    args = {"info": (), "prune": ("--ratio", "0.5", "--no-throughput", "-o", "bad-out"),
            "sample": (*case.sample_args, *SAMPLE, "-o", "bad-out")}[command]
    _refused_writing_nothing(case, chain, monkeypatch, (command, bad, *args), ("pickle", bad.name))


def _refused_writing_nothing(case: Case, chain: Chain, monkeypatch: pytest.MonkeyPatch, args, words) -> None:
    """``o2m *args`` in the row's directory: exit 2, one ``error:`` line naming ``words``, and no file added or
    changed there."""
    monkeypatch.chdir(chain.dir(case))
    before = _files(chain.dir(case))
    assert_refused(cli(*args), *words)
    assert _files(chain.dir(case)) == before


@pytest.mark.parametrize("case, refusal", [pytest.param(c, r, id=f"{c.id}-{r.name}")
                                           for c in CASES for r in c.wrong_sample])
def test_refuses_a_wrong_condition_in_sample(case: Case, refusal: Refusal, chain: Chain,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    students = chain.get(case, "students")
    _refused_writing_nothing(case, chain, monkeypatch, ("sample", students, *refusal.args, *SAMPLE, "-o", "bad-out"),
                             refusal.words)


@by_case
def test_refuses_a_wrong_condition_in_dkdm(case: Case, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    template = chain.get(case, "template")
    if case.cond != "text":  # the prompt file a pixel row is (wrongly) given
        (chain.dir(case) / "prompts.txt").write_text("a red cat\n")
    r = case.wrong_dkdm
    _refused_writing_nothing(case, chain, monkeypatch, ("distill", template, *DKDM, *r.args, *DISTILL,
                                                        "-o", "bad-out"), r.words)


@by_case
def test_refuses_to_export_a_group_of_students(case: Case, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    students = chain.get(case, "students")
    _refused_writing_nothing(case, chain, monkeypatch, ("export", students, "-o", "bad-out"),
                             ("group of 2 students", "merge it first"))
