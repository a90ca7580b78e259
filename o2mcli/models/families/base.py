"""The denoiser interface: what o2m's stages, engine and samplers know of a model family.

A family is one diffusers model class. It checks a config before anything is built (crafted
metadata is refused there), builds the model from a config and a state dict, and calls it:
``predict(model, x_t, t, cond)`` returns the raw prediction, eps in the first C channels and, for a
learned variance, the variance channels after them. Nothing outside a family module calls a
diffusers model class or reads its output object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from o2mcli.models.codec import PIXELS, Codec
from o2mcli.models.conditioning import ConditionKind


def clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without diffusers' private keys (``_class_name`` kept)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}


def build_from_config(model_cls: Any, cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]],
                      where: Path) -> nn.Module:
    """A diffusers model class built from ``cfg`` (a bad config is a one-line error) and, if given, exactly
    matching weights; in eval mode."""
    from o2mcli.errors import O2MError

    try:
        model = model_cls.from_config(clean_config(cfg))
    except (TypeError, ValueError, KeyError) as e:
        raise O2MError(f"{where}: invalid {model_cls.__name__} config ({e})") from e
    if state is not None:
        load_state_exact(model, state, where)
    return model.eval()


def load_state_exact(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into ``model``, refusing (one line) any missing, unexpected or misshapen tensor."""
    check_state_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()}, where)
    model.load_state_dict(state, strict=True)


def check_state_shapes(own: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Path) -> None:
    """A model's tensor shapes (``own``) against the weights' (``found``, from tensors or a safetensors header):
    one line naming the first missing, unexpected or misshapen tensor."""
    from o2mcli.errors import O2MError

    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise O2MError(f"{where}: config does not match the weights ({what}; "
                       f"{len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for k, shape in found.items():
        if tuple(own[k]) != tuple(shape):
            raise O2MError(f"{where}: config does not match the weights ({k}: weights {tuple(shape)}, "
                           f"config expects {tuple(own[k])})")


@dataclass(frozen=True)
class LabelInput:
    """How a config takes class labels, for distillation's teacher/student checks (``distill.inputs``).

    ``key`` sizes the label table, ``value`` is its setting (None: the config takes no labels) and ``noun`` names
    what it counts in refusals; labels ``0..rows-1`` are valid (the classes and, after them, the null class), with
    ``rows = value + offset``. ``optional``: a model of this family also runs without labels, on its null class (a
    DiT is class-conditional by construction; under an unconditional teacher its batches carry no labels).
    ``same``: config items a teacher and a student that both size their table by ``key`` must share.
    """

    key: str
    value: Optional[int]
    noun: str
    offset: int = 0
    optional: bool = False
    same: tuple[tuple[str, Any], ...] = ()

    @property
    def rows(self) -> Optional[int]:
        return None if not self.value else self.value + self.offset


class DenoiserFamily:
    """One model family: subclass, set ``name`` to the diffusers ``_class_name``, and register it."""

    name: ClassVar[str]
    # None: the stages take this family. Else why they do not yet (a family built ahead of its stages is
    # refused by name when a model is loaded, so no stage runs it half-supported).
    not_yet: ClassVar[Optional[str]] = None
    # The condition kind the family always takes (``models.conditioning``: TEXT, prompts its codec encodes, the
    # model's ``conditioning`` record naming the pipeline); None: none, or class labels where its config has a table.
    condition: ClassVar[Optional[ConditionKind]] = None

    def check_config(self, cfg: Any, where: Path) -> None:
        """Refuse a config that is not this family's or would not build (sizes bounded), with a one-line error."""
        raise NotImplementedError

    def build(self, cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]], where: Path) -> nn.Module:
        """The model from its config (checked) and, if given, exactly matching weights; in eval mode."""
        raise NotImplementedError

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw output for noisy ``x_t`` at timesteps ``t`` (and a condition, where the family takes one)."""
        raise NotImplementedError

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one input sample."""
        raise NotImplementedError

    def deepcache_branches(self, model: nn.Module) -> int:
        """How many DeepCache layer branches (skip features, ``unet_cache``) ``model`` has; a family without skip
        branches refuses (DeepCache, Ma et al. 2024, caches a U-Net's deep features)."""
        from o2mcli.errors import O2MError

        raise O2MError(f"DeepCache needs a UNet; {self.name} has no skip branches")

    def deepcache_predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """One DeepCache step: with ``cache`` None the full forward (the same output as :meth:`predict`) and the
        cache of branch ``branch``; else the partial forward of that branch around ``cache``. Returns (the raw
        output, the cache)."""
        self.deepcache_branches(model)  # refuses
        raise NotImplementedError

    def feature_points(self, model: nn.Module) -> list[str]:
        """Submodule names whose outputs are the features of feature-based KD (matched by name and size)."""
        raise NotImplementedError

    def class_table(self, cfg: dict[str, Any]) -> Optional[tuple[int, Optional[int]]]:
        """The config's label table: (the number of labels it takes, the null class where the config fixes it, else
        None), or None for a model without class labels. Read by ``models.io.conditioning_of`` and ``o2m train``."""
        li = self.label_input(cfg)
        if li is None or not li.value:
            return None
        # A table with a row beyond its setting (DiT) fixes the null class there; else only provenance knows it.
        return li.value, (li.value if li.offset else None)

    def trained_classes(self, cfg: dict[str, Any]) -> Optional[int]:
        """How many real classes o2m trains this config on (``--cond class``): every row but the null class after
        them; None for a config without a label table."""
        li = self.label_input(cfg)
        return None if li is None or not li.value else li.rows - 1

    def stand_in(self) -> str:
        """What :meth:`predict` feeds in place of a condition it is not given (MACs and shapes only), in words."""
        return "no condition"

    def condition_shape(self, cfg: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The sizes of the condition a config takes beyond class labels (a text family: its embedding widths), by
        config key, so a student whose condition does not fit its teacher's is refused by name; None: none."""
        return None

    def label_input(self, cfg: dict[str, Any]) -> Optional[LabelInput]:
        """How ``cfg`` takes class labels (distillation's conditioning checks); None: this family takes none."""
        return None

    def config_io(self, cfg: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
        """((C, H, W) of one input sample, output channels) from a config, before any model is built; diffusers'
        ``in_channels``/``sample_size`` (an int or [H, W])/``out_channels`` (missing: ``in_channels``)."""
        c = int(cfg.get("in_channels", 3))
        size = cfg.get("sample_size", 32)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (c, int(h), int(w)), int(cfg.get("out_channels") or c)

    def feature_map(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A feature point's output as a (B, C, H, W) map, so feature KD compares any two families by spatial size
        (a UNet's block outputs already are)."""
        return tensor

    def codec(self, conditioning: Optional[dict[str, Any]], where: Path, pipeline: Optional[Path] = None,
              device: torch.device | str = "cpu", models: Sequence[tuple[Any, Path | str]] = ()) -> Codec:
        """The codec a model of this family owns (``models.codec``): a latent family's VAE and text encoder(s), from
        ``pipeline`` (``--pipeline``) or the pipeline ``conditioning`` names, checked against its record and against
        ``models`` (the (config, where) of the denoisers they will serve); a pixel family's identity, which refuses
        ``pipeline``. A codec with a ``scheduler_config`` names the scheduler class an exported pipeline keeps, unless
        the model's own scheduler config names one."""
        from o2mcli.errors import O2MError

        if pipeline is not None:
            raise O2MError(f"{where}: a {self.name} samples without a VAE or text encoder; --pipeline {pipeline} "
                           "is for Stable Diffusion (latent text-to-image) models")
        return PIXELS

    def pipeline(self, model: nn.Module, scheduler: Any, parts: Any = None) -> Any:
        """The diffusers pipeline that plain diffusers samples this model with (``o2m export``), from the model, its
        scheduler and its :meth:`codec` (``parts``; the identity for a pixel family)."""
        raise NotImplementedError

    def save_pipeline(self, pipe: Any, folder: Path, parts: Any = None) -> None:
        """Write :meth:`pipeline`'s result into ``folder`` (safetensors weights)."""
        pipe.save_pretrained(folder, safe_serialization=True)
