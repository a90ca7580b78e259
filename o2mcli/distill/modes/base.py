"""What a distillation mode is: how it checks its options, where its x_t come from, what it minimises,
what it prepares before the loop and what it adds to the summary. The stage knows nothing else of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch

from o2mcli.distill.objective import Objective


class DistillMode:
    """One way to distil (O2MKD on data, DKDM without), for one run: built from the run's config.

    ``cfg`` is the stage's ``DistillConfig`` (read here by field name only). Subclasses override
    what differs; the defaults are O2MKD's (images, the plain diffusion loss, nothing to prepare).
    """

    name: ClassVar[str]
    default_students: ClassVar[int]
    # The options only this mode reads: a pydantic model whose fields (default, checks, --help) DistillConfig and
    # `o2m distill` take as their own (the config stays flat: a manifest records the same settings as ever).
    options: ClassVar[Optional[type]] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.labels: Any = None  # the run's LabelPlan (class-conditional teacher), set by check_inputs
        self.codec: Any = None  # a prompt-conditioned teacher's codec (its VAE and text encoders), set by check_inputs

    # 1. Options and inputs
    def check_options(self) -> None:
        """Refuse options this mode cannot honour (before any file is read)."""

    def data_spec(self) -> Optional[str]:
        """The data the run reads (``--data``, a default), or None for a data-free mode."""
        if self.codec is not None and self.cfg.data is None:
            from o2mcli.errors import O2MError

            raise O2MError(f"--data: the text-to-image teacher {self.teacher_path} distils on a folder of images "
                           "with captions (metadata.jsonl: file_name and text); give --data, or --mode dkdm "
                           "--prompts FILE to distil without data")
        return self.cfg.data or "digits"

    def check_inputs(self, teacher: Any, teacher_path: Path, student_config: Any, where: Path) -> None:
        """Refuse a teacher / student pair this mode cannot distil (after loading, before building); a
        class-conditional teacher's label plan (its classes, null class and dropout) is settled here."""
        from o2mcli.data.labels import label_plan
        from o2mcli.models.conditioning import takes_prompts

        self.teacher_path = teacher_path
        cond = teacher.conditioning
        if takes_prompts(cond):
            self.codec = teacher.codec(self.cfg.pipeline)
        else:
            for opt, v in (("prompts", self.cfg.prompts), ("pipeline", self.cfg.pipeline),
                           ("latent_cache", self.cfg.latent_cache)):
                if v is not None:
                    from o2mcli.errors import OptionError

                    raise OptionError(opt, v, f"the teacher {teacher_path} is not text-conditioned (Stable Diffusion)")
        self.labels = label_plan(cond, self.cfg.label_dropout, teacher_path)

    def load_data(self, spec: str, teacher: Any) -> Any:
        """The run's data: images (``data.load_dataset``), or for a text-conditioned teacher a captioned folder's
        cached latents, whose captions make the run's text plan."""
        if self.codec is None:
            from o2mcli.data import load_dataset

            return load_dataset(spec)
        from o2mcli.data.text import caption_dropout, captioned_latents
        from o2mcli.devices import resolve_device

        dropout = caption_dropout(teacher.conditioning, self.cfg.label_dropout)
        data, self.labels = captioned_latents(Path(spec), self.codec, int(teacher.denoiser.config.sample_size), dropout,
                                              teacher.conditioning, self.cfg.latent_cache, self.cfg.out,
                                              resolve_device(self.cfg.device))
        return data

    # 2. The engine's parts
    def make_source(self, teacher: Any, data: Any, plan: Any, log: Optional[Callable[[str], None]]
                    ) -> Callable[[Any, torch.device], Any]:
        """``make_source(terms, device)``: the data source the engine draws x_t from."""
        from o2mcli.distill.sources import ImageSource

        images = data.to_model_range()
        lp = self.labels
        if lp is None:
            return lambda terms, dev: ImageSource(images, terms, dev)
        from o2mcli.data.labels import check_data_classes

        # Each batch's labels go to teacher and students alike, dropped to the null class as the teacher was trained
        # (a text plan's labels index the captions, and their embeddings are what the models see).
        labels = data.labels if self.codec is not None else check_data_classes(lp, data, self.teacher_path)
        return lambda terms, dev: ImageSource(images, terms, dev, labels, lp.null_class, lp.dropout, lp.cond)

    @classmethod
    def objective(cls, cfg: Any, teacher_unet: Any, student_unet: Any, source: Any) -> Objective:
        """L = L_diff + alpha L_KD (O2MKD Eq. 5; L_diff is the hybrid loss for a learned variance)."""
        return Objective(alpha=cfg.alpha, base="diffusion", vlb_weight=cfg.vlb_weight)

    # 3. Before the loop, and after it
    def prepare(self, engine: Any, log: Optional[Callable[[str], None]]) -> dict:
        """Work before the first step (checkpointed at step 0 when there is any); its record."""
        return {}

    def summary(self, engine: Any, init_info: dict) -> dict:
        """What the mode adds to the manifest's summary."""
        return {} if self.labels is None else {"conditioning": self.labels.record()}

    def losses_text(self, engine: Any, learned_student: bool) -> str:
        """The loss the students minimised, in words, for the manifest."""
        cfg = self.cfg
        if cfg.kd == "none":
            kd = " (no KD: the teacher was never run)"
        else:
            kd = f" + {cfg.alpha} * L_KD({cfg.kd})"
        return f"L_diff{kd}" + (" (L_diff includes the improved-DDPM vlb term: learned-variance student)"
                                if learned_student else "")
