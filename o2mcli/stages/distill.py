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
from o2mcli.parsing import int_list
from o2mcli.models.parametrization import PARAMETRIZATIONS, parametrization_of, prediction_name


class DistillConfig(BaseModel):
    """Every setting of a distillation run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    template: Optional[str] = None
    teacher: Optional[str] = None
    student_config: Optional[Path] = None
    mode: str = "o2mkd"  # a name in o2mcli.distill.modes.MODES
    students: Optional[int] = Field(None, ge=1)  # None: the mode's default (O2MKD 4, DKDM's single student 1)
    boundaries: Optional[tuple[int, ...]] = None  # "0,250,500,750,1000" accepted
    p_own: float = Field(0.5, ge=0, le=1)
    kd: str = "output"
    alpha: float = Field(1.0, ge=0)
    init: Literal["template", "teacher"] = "template"
    data: Optional[str] = None  # o2mkd: default digits; dkdm: refused
    rho: float = 0.4
    init_steps: Optional[int] = Field(None, ge=1)
    init_batch: int = Field(1024, ge=1)
    kl_weight: float = Field(1.0, ge=0)
    # The students' parametrization (epsilon, v_prediction); None: the template's (the teacher's, as pruned). KD and
    # L_simple compare in it, the teacher's output converted exactly.
    prediction_type: Optional[str] = None
    # dkdm: classifier-free guidance weight W of the teacher steps that move buffer slots (build and training);
    # <= 1: none (one forward, the paper's and o2m's results). The KD target stays the conditional prediction.
    buffer_guidance: float = Field(1.0, ge=0, le=100)
    label_dropout: Optional[float] = Field(None, ge=0, le=1)  # class or caption dropout; None = the teacher's own
    prompts: Optional[Path] = None  # dkdm under a text-conditioned teacher: one prompt per line
    pipeline: Optional[str] = None  # a text-conditioned teacher's VAE/text encoder; default: the one it records
    latent_cache: Optional[Path] = None  # where the captioned data's latents are cached; default: beside the run
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    vlb_weight: float = Field(0.001, ge=0)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    resume: bool = False
    force: bool = False
    out: Path = Path("students")

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

    @field_validator("rho")
    @classmethod
    def _rho(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive (the buffer holds rho*T*b samples)")
        return v

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
    from o2mcli.models.io import unet_config_of
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
    scfg = unet_config_of(teacher.unet if cfg.init == "teacher" else student_unet)
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
