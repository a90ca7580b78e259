"""``o2m distill``: one teacher into K students (O2MKD; K = 1 or p_own = 0 is O2OKD) on one engine.

The output is a ``students`` stage directory:

* ``student_0.safetensors`` ... ``student_{K-1}.safetensors``: EMA weights, each with its
  timestep range (in the file's metadata and in the manifest), so ``o2m sample students/``
  routes every denoising step to the student that owns it;
* ``metrics.jsonl``: step, student, loss terms, lr, images/s; ``loss.png``: the curves;
* ``manifest.json``: the full config, template and teacher as parents, a summary.

An unfinished run keeps its checkpoint in ``OUT.partial/`` (safetensors + JSON, written
atomically every ``save_every`` steps); ``resume`` continues it bit-for-bit on CPU.

The stage reads config -> inputs -> fit -> write; what a mode does lives in ``o2mcli.distill.modes``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from o2mcli.outputs import run_scope
from o2mcli.distill.modes import MODES
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import cli, int_list
from o2mcli.stages import fields
from o2mcli.models.parametrization import PARAMETRIZATIONS, parametrization_of, prediction_name


# Every mode's own options (o2mcli.distill.modes: DKDM's buffer, O2MKD's data) are fields of the config, flat.
_MODE_OPTIONS = tuple(dict.fromkeys(m.options for m in MODES.values() if m.options is not None))


class DistillConfig(*_MODE_OPTIONS, BaseModel):  # type: ignore[misc]
    """Every setting of a distillation run (recorded in full in the manifest); its fields are o2m distill's options."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    template: Optional[str] = Field(None, json_schema_extra=cli(argument=True, unset=True), description="Template (o2m "
                                    "prune's output) or any student-shaped model; default: the newest template in the "
                                    "current directory.")
    teacher: Optional[str] = Field(None, description="Teacher; default: the one the template was pruned from.")
    student_config: Optional[Path] = Field(None, description="A diffusers model config JSON (UNet2DModel, or another "
                                           "family by _class_name, e.g. DiTTransformer2DModel): fresh students of any "
                                           "shape, random init (needs --teacher; for a class-conditional teacher, a "
                                           "label table of its classes: num_class_embeds K+1, num_embeds_ada_norm K).")
    mode: str = Field("o2mkd", description="o2mkd (real data; K=1 or --p-own 0 is O2OKD) or dkdm (data-free).")
    students: Optional[int] = Field(None, ge=1, json_schema_extra=cli("--students", "-k"), description="K students, "
                                    "each owning a contiguous timestep range. Default: 4 with --mode o2mkd; 1 with "
                                    "--mode dkdm (DKDM's single student; -k 4 there is data-free O2MKD).")
    boundaries: Optional[tuple[int, ...]] = Field(None, description="Custom ranges, e.g. 0,200,450,700,1000 (default "
                                                  "uniform).")  # "0,250,500,750,1000" accepted
    p_own: float = Field(0.5, ge=0, le=1, description="Per step, probability a student trains on its own range (else "
                         "on all timesteps).")
    kd: str = Field("output", description="KD loss: output (Hinton), at (attention transfer), sp (similarity-preserving)"
                    ", crd (contrastive), feat (BK-SDM: output + block-output features), none (no KD: plain training on "
                    "the data, the teacher never runs).")
    alpha: float = Field(1.0, ge=0, description="Weight of the KD loss against the plain diffusion loss.")
    init: Literal["template", "teacher"] = Field("template", description="Start the students from the template or "
                                                 "from the teacher.")
    # The students' parametrization (epsilon, v_prediction); None: the template's (the teacher's, as pruned). KD and
    # L_simple compare in it, the teacher's output converted exactly.
    prediction_type: Optional[str] = Field(None, description="What the students output: epsilon (eps) or v_prediction "
                                           "(v). Default: what the template (or --init teacher) outputs. KD and the "
                                           "diffusion loss compare in the students' parametrization, the teacher's "
                                           "output converted exactly (an eps student of a v teacher).")
    label_dropout: Optional[float] = Field(None, ge=0, le=1, description="Conditional teacher: probability a batch "
                                           "label or caption (o2mkd) or buffer slot's label or prompt (dkdm) is the "
                                           "null class or empty prompt, so students learn both guidance branches. "
                                           "Default: the teacher's own training dropout (Stable Diffusion: 0.1).")
    pipeline: Optional[str] = Field(None, description="Stable Diffusion teacher: the pipeline whose VAE and text "
                                    "encoder to use (default: the one the teacher records; sha256-checked).")
    latent_cache: Optional[Path] = Field(None, description="Stable Diffusion teacher: where the captioned --data's "
                                         "latents and text embeddings are cached (default: beside the output, "
                                         "DATA.latents-RES; reused when it matches).")
    steps: int = Field(1000, ge=1, description="Optimizer steps (every student takes one per step).")
    batch_size: int = Field(64, ge=1, json_schema_extra=cli("--batch-size", "-b"),
                            description="Batch per student per step (per process).")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (linear warm-up).")
    lr_warmup: int = Field(100, ge=0, description="Steps of linear learning-rate warm-up.")
    weight_decay: float = fields.internal(0.0, ge=0)
    ema_decay: float = fields.ema_decay()
    grad_clip: float = fields.internal(1.0, gt=0)
    vlb_weight: float = fields.internal(0.001, ge=0)
    seed: int = fields.seed()
    device: str = fields.device()
    save_every: int = fields.save_every()
    log_every: int = fields.log_every()
    resume: bool = fields.resume()
    force: bool = fields.force()
    out: Path = fields.stage_out("students")

    _parse_boundaries = field_validator("boundaries", mode="before")(classmethod(lambda cls, v: int_list(v)))

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"expected one of {', '.join(MODES)}")
        return v

    @field_validator("prediction_type")
    @classmethod
    def _prediction(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else prediction_name(v)

    @model_validator(mode="after")
    def _students_by_mode(self) -> "DistillConfig":
        """``-k`` unset: the mode's default (O2MKD's 4; DKDM's single student, data-free O2MKD is ``-k 4``)."""
        if self.students is None:
            object.__setattr__(self, "students", MODES[self.mode].default_students)
        if self.buffer_guidance != 1.0 and not getattr(MODES[self.mode], "buffer_guidance", False):
            raise OptionError("buffer_guidance", self.buffer_guidance, f"guides DKDM's buffer; --mode {self.mode} has "
                              "no buffer (use --mode dkdm, or drop --buffer-guidance)")
        return self


def _fingerprint(cfg: DistillConfig) -> dict:
    # `steps` may grow on resume (constant LR after warm-up); paths and devices may move. A setting added later is
    # left out at its default, so checkpoints written before it existed still resume.
    out = cfg.model_dump(mode="json", exclude={"resume", "force", "device", "save_every", "log_every", "out",
                                               "steps", "template", "teacher", "data", "pipeline",
                                               "latent_cache"})
    if out.get("buffer_guidance") == 1.0:
        del out["buffer_guidance"]
    if out.get("prediction_type") is None:
        del out["prediction_type"]
    return out


# The stage ----------------------------------------------------------------------------------------

@run_scope
def run_distill(cfg: DistillConfig) -> Path:
    """Distil the teacher into ``cfg.students`` students; write a ``students`` stage directory."""
    from o2mcli.devices import resolve_device
    from o2mcli.distill.build import make_distiller
    from o2mcli.distill.fit import FitPlan, fit
    from o2mcli.distill.inputs import check_fit, load_inputs, template_feature_pairs
    from o2mcli.distill.losses import kd_class
    from o2mcli.distill.plan import plan_for
    from o2mcli.distill.save import write_students
    from o2mcli.outputs import ensure_space, reserve_output
    from o2mcli.models.io import denoiser_config_of
    from o2mcli.runtime.checkpoint import check_partial, partial_dir, run_bytes
    from o2mcli.runtime.dist import agree_path, barrier, init_distributed, local_device, shutdown

    # 1. Refuse bad options, then bad outputs, before any work (options first: a bad --kd is not "a run is there").
    mode = MODES.resolve(cfg.mode)(cfg)
    kd_class(cfg.kd)
    device = resolve_device(cfg.device)
    mode.check_options()
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=[cfg.template, cfg.teacher, cfg.data, cfg.student_config])
    work = check_partial(out, cfg.resume, cfg.force)

    # 2. Inputs: the students' initialization, the teacher, the data, the timestep plan.
    template_path, template, teacher_path, teacher, student_unet, where = load_inputs(cfg)
    scfg = denoiser_config_of(teacher.denoiser if cfg.init == "teacher" else student_unet)
    mode.check_inputs(teacher, teacher_path, scfg, where)
    spec = mode.data_spec()
    data = mode.load_data(spec, teacher) if spec is not None else None
    check_fit(teacher, scfg, None if data is None else data.shape, where, teacher_path)
    plan = plan_for(cfg.boundaries, teacher.num_train_timesteps, cfg.students, cfg.p_own)
    # What the students output: the option, else the model they start from (a template keeps its teacher's).
    start = template if template is not None and cfg.init == "template" else teacher
    student_param = (PARAMETRIZATIONS.resolve(cfg.prediction_type) if cfg.prediction_type is not None
                     else parametrization_of(start.scheduler_config))
    ensure_space(out, run_bytes(student_unet, cfg.students))

    # 3. Processes and devices (every rank writes where rank 0 reserved); the engine; the loop; the students
    #    written (rank 0).
    dist = init_distributed(device.type)
    try:
        out = agree_path(out, dist)
        work = partial_dir(out)
        device = local_device(dist, device)
        log = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else None
        engine = make_distiller(cfg, student_unet, teacher, plan, device, dist,
                                mode.make_source(teacher, data, plan, log), template_feature_pairs(template),
                                student_param=student_param)
        result = fit(engine, FitPlan(steps=cfg.steps, log_every=cfg.log_every, save_every=cfg.save_every,
                                     resume=cfg.resume, desc=f"distill K={cfg.students}"),
                     work, _fingerprint(cfg), mode.prepare)
        emas = engine.finish()  # every student's EMA weights, gathered on rank 0
        if dist.is_main:
            write_students(cfg, mode, out, work, engine, plan, template_path, teacher_path, teacher, template,
                           result, emas)
        barrier(dist)
    finally:
        shutdown(dist)
    return out
