"""DKDM (Xiang et al.): no data; the students learn from the teacher's own noisy samples, kept in a
dynamic buffer that the teacher's reverse step advances. K = 1 is DKDM; K > 1 is data-free O2MKD."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, Field, field_validator

from o2mcli.diffusion.schedulers import teacher_reverse_settings
from o2mcli.distill.modes.base import DistillMode
from o2mcli.distill.objective import Objective, dkdm_kl
from o2mcli.errors import O2MError, OptionError
from o2mcli.models.configs import is_learned_variance
from o2mcli.parsing import cli


class DKDMOptions(BaseModel):
    """What only DKDM reads: its buffer, its KL term, its prompts (fields of DistillConfig)."""

    rho: float = Field(0.4, description="dkdm: the buffer holds rho*T*b noisy samples.")
    init_steps: Optional[int] = Field(None, ge=1, description="dkdm: reach each slot's t with an S-step DDIM jump "
                                      "instead of exact ancestral shuffle denoise.")
    init_batch: int = Field(1024, ge=1, description="dkdm: teacher batch while building the buffer.")
    kl_weight: float = Field(1.0, ge=0, description="dkdm: weight of KL(p_T || p_S) (learned variances).")
    # <= 1: none (one forward, the paper's and o2m's results). The KD target stays the conditional prediction.
    buffer_guidance: float = Field(
        1.0, ge=0, le=100, json_schema_extra=cli(metavar="W"),
        description="dkdm, conditional teacher: classifier-free guidance weight of the teacher steps that move buffer "
        "slots (the build and every training step; one more teacher forward each), so the slots follow the guided "
        "trajectories that sampling at --guidance W visits. The KD target stays the teacher's conditional prediction, "
        "since sampling guides the students' own branches. Default 1: no guidance (W <= 1 is none), as in DKDM's "
        "paper (unconditional teachers) and o2m's published results.")
    prompts: Optional[Path] = Field(None, description="dkdm under a Stable Diffusion teacher: a prompt file (one per "
                                    "line); every buffer slot is a latent with one prompt.")

    @field_validator("rho")
    @classmethod
    def _rho(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive (the buffer holds rho*T*b samples)")
        return v


class DKDM(DistillMode):
    """The dynamic buffer as the source; ||eps_T - eps_S||^2 (+ the KL where both variances are learned)."""

    name = "dkdm"
    default_students = 1
    options = DKDMOptions
    buffer_guidance = True  # takes --buffer-guidance (the buffer's teacher steps); other modes refuse it

    def check_options(self) -> None:
        cfg = self.cfg
        if cfg.data is not None:
            raise O2MError(f"--data {cfg.data}: DKDM takes no data (the teacher is its only input); drop --data, "
                           "or use --mode o2mkd to distil on images")
        if cfg.kd == "none":
            raise O2MError("--kd none with --mode dkdm: a data-free student learns only from the teacher; "
                           "use --kd none with --mode o2mkd (plain training on the data)")

    def data_spec(self) -> Optional[str]:
        return None

    def check_inputs(self, teacher: Any, teacher_path: Path, student_config: Any, where: Path) -> None:
        super().check_inputs(teacher, teacher_path, student_config, where)
        if self.codec is not None:
            # A text-conditioned teacher: every buffer slot keeps a prompt of --prompts (or the empty one, with the
            # caption dropout), embedded once here.
            if self.cfg.prompts is None:
                raise O2MError(f"--prompts: the Stable Diffusion teacher {teacher_path} is distilled data-free from a "
                               "prompt list (one prompt per line); give --prompts FILE")
            from o2mcli.data.prompts import read_prompts
            from o2mcli.data.text import caption_dropout, prompt_plan
            from o2mcli.devices import resolve_device

            prompts = read_prompts(self.cfg.prompts)
            self.labels = prompt_plan(self.codec, prompts, caption_dropout(teacher.conditioning,
                                                                           self.cfg.label_dropout),
                                      teacher.conditioning, resolve_device(self.cfg.device))
        self._check_guidance(teacher_path)
        self.reverse = teacher_reverse_settings(teacher.scheduler_config, teacher_path)
        self.teacher_learned = is_learned_variance(teacher.denoiser.config)
        if is_learned_variance(student_config) and not self.teacher_learned:
            raise O2MError(f"{where}: a learned-variance student under the fixed-variance teacher {teacher_path}: "
                           "there is no teacher variance to learn from (use a student with "
                           f"{teacher.denoiser.config.in_channels} output channels)")
        T = teacher.num_train_timesteps
        if self.cfg.init_steps is not None and self.cfg.init_steps > T - 1:
            raise O2MError(f"--init-steps {self.cfg.init_steps}: the teacher {teacher_path} has T={T}, so a slot is "
                           f"at most {T - 1} steps from noise; use at most {T - 1} (10 is plenty: see the README)")

    def _check_guidance(self, teacher_path: Path) -> None:
        """--buffer-guidance W != 1 needs an unconditional branch: a conditional teacher with a null class (class
        models o2m trained with label dropout) or the empty prompt (text models)."""
        w = self.cfg.buffer_guidance
        if w == 1.0:
            return
        if self.labels is None:
            raise OptionError("buffer_guidance", w, f"the teacher {teacher_path} is unconditional: there is no "
                              "condition to guide; use --buffer-guidance 1")
        if self.labels.null_class is None:
            raise OptionError("buffer_guidance", w, f"the teacher {teacher_path} has no null class recorded (it was "
                              "not trained by o2m with label dropout), so it has no unconditional branch to guide "
                              "against; use --buffer-guidance 1")

    def make_source(self, teacher: Any, data: Any, plan: Any, log: Optional[Callable[[str], None]]
                    ) -> Callable[[Any, torch.device], Any]:
        from o2mcli.models.parametrization import parametrization_of
        from o2mcli.distill.sources.buffer import DynamicBuffer, buffer_slots

        cfg, T = self.cfg, teacher.num_train_timesteps
        slots = buffer_slots(cfg.rho, T, cfg.batch_size, min_slots=cfg.batch_size * plan.max_draws_per_step)
        if log is not None and slots > round(cfg.rho * T * cfg.batch_size):
            log(f"note: --rho {cfg.rho} asks for {cfg.rho * T * cfg.batch_size:.3g} buffer slots; using {slots}, "
                f"the minimum for {plan.max_draws_per_step} disjoint batches of {cfg.batch_size} per step")
        from o2mcli.models.families import family_of

        shape = family_of(teacher.denoiser).input_shape(teacher.denoiser)  # any family's (C, H, W)
        variance, clip = self.reverse
        # A class-conditional teacher: every slot keeps a label (the null class with the label dropout), which
        # the teacher's reverse steps and the students' inputs use; with --buffer-guidance W > 1 the steps that move
        # a slot are guided by the teacher (the engine's module, moved to the device in place) against the null one.
        w = cfg.buffer_guidance
        return lambda terms, dev: DynamicBuffer(shape, slots, terms, dev, variance_type=variance,
                                                learned=self.teacher_learned, clip=clip, labels=self.labels,
                                                guidance=w, teacher=teacher.denoiser if w > 1 else None,
                                                param=parametrization_of(teacher.scheduler_config))

    @classmethod
    def objective(cls, cfg: Any, teacher_unet: Any, student_unet: Any, source: Any) -> Objective:
        """DKDM Eq. 9: L'_simple = ||eps_T - eps_S||^2 (+ lambda KL(p_T || p_S) when both variances are learned)."""
        both_learned = is_learned_variance(teacher_unet.config) and is_learned_variance(student_unet.config)
        # The KL's teacher mean is clipped like the buffer's reverse step (the teacher's clip_sample).
        return Objective(alpha=cfg.alpha, base="output", kl_weight=cfg.kl_weight if both_learned else 0.0,
                         kl=functools.partial(dkdm_kl, clip=source.clip) if both_learned else None)

    def prepare(self, engine: Any, log: Optional[Callable[[str], None]]) -> dict:
        """Build the buffer (DKDM's initialization): the costly part of a run, so it is checkpointed."""
        import time

        buf, cfg = engine.source, self.cfg
        t0 = time.perf_counter()
        from o2mcli.runtime.dist import sum_int

        buf.initialize(engine.teacher, engine.gen_data, cfg.init_steps, cfg.init_batch, log=log)
        # Under torchrun each rank builds its students' shards: the run's cost is the sum over ranks.
        forwards = sum_int(buf.init_forwards, engine.dist)
        return {"seconds": round(time.perf_counter() - t0, 3), "teacher_forwards": forwards,
                "slots": buf.n, "bytes": buf.bytes, "init_steps": cfg.init_steps}

    def summary(self, engine: Any, init_info: dict) -> dict:
        return {**super().summary(engine, init_info),
                "buffer": {**init_info, "restarts": engine.source.restarts, "data": "none (teacher only)",
                           "guidance": engine.source.guidance}}

    def losses_text(self, engine: Any, learned_student: bool) -> str:
        cfg, obj = self.cfg, engine.objective
        kd = "" if cfg.kd == "output" else f" + {cfg.alpha} * L_KD({cfg.kd})"
        if obj.kl is not None:
            return f"||eps_T - eps_S||^2{kd} + {obj.kl_weight} * KL(p_T || p_S) (learned variances)"
        return (f"||eps_T - eps_S||^2{kd} only: fixed-variance "
                + ("teacher" if not is_learned_variance(engine.teacher.config) else "student") + ", no KL term")

