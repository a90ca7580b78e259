"""O2MKD on data (Zhang et al.): K students, each owning a timestep range, trained on real images with
L_diff + alpha L_KD; K = 1 (or p_own = 0) is one-to-one KD, ``--kd none`` plain training."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from o2mcli.distill.modes.base import DistillMode


class O2MKDOptions(BaseModel):
    """What only O2MKD reads: its data (a field of DistillConfig; DKDM refuses it)."""

    data: Optional[str] = Field(None, description="o2mkd: 'digits' (default) or a folder of images (for Stable "
                                "Diffusion: with metadata.jsonl captions); dkdm takes none.")


class O2MKD(DistillMode):
    """The base class's defaults are O2MKD's: images, the diffusion loss plus KD, nothing to prepare."""

    name = "o2mkd"
    default_students = 4
    options = O2MKDOptions

    def check_options(self) -> None:
        if self.cfg.prompts is not None:
            from o2mcli.errors import O2MError

            raise O2MError(f"--prompts {self.cfg.prompts}: O2MKD distils on the captions of --data; --prompts is "
                           "for --mode dkdm (data-free)")
