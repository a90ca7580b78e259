"""O2MKD on data (Zhang et al.): K students, each owning a timestep range, trained on real images with
L_diff + alpha L_KD; K = 1 (or p_own = 0) is one-to-one KD, ``--kd none`` plain training."""

from __future__ import annotations

from o2mcli.distill.modes.base import DistillMode


class O2MKD(DistillMode):
    """The base class's defaults are O2MKD's: images, the diffusion loss plus KD, nothing to prepare."""

    name = "o2mkd"
    default_students = 4

    def check_options(self) -> None:
        if self.cfg.prompts is not None:
            from o2mcli.errors import O2MError

            raise O2MError(f"--prompts {self.cfg.prompts}: O2MKD distils on the captions of --data; --prompts is "
                           "for --mode dkdm (data-free)")
