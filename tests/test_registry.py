"""The one registry: names in order, one-line errors for unknown names, no double registration."""

from __future__ import annotations

import pytest

from o2mcli.distill.losses import KD_LOSSES
from o2mcli.errors import O2MError
from o2mcli.merge import MERGE_METHODS
from o2mcli.pruning.importance import IMPORTANCE
from o2mcli.registry import Registry


def test_register_resolve_and_refuse() -> None:
    reg: Registry[int] = Registry("--thing", "thing", extra=("auto",))
    reg.register("a", 1)

    @reg.register("b")
    def b() -> int:
        return 2

    assert reg.resolve("a") == 1 and reg.resolve("b") is b and list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.names() == ["auto", "a", "b"] and "a" in reg and "auto" not in reg
    with pytest.raises(O2MError, match=r"^--thing 'c': unknown thing \(choose from auto, a, b\)$"):
        reg.resolve("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 3)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("auto", 3)


@pytest.mark.parametrize("reg, names", [(KD_LOSSES, {"output", "none"}), (MERGE_METHODS, {"task-arithmetic", "average"}),
                                        (IMPORTANCE, {"magnitude", "random", "taylor"})])
def test_the_plugins_are_registered(reg: Registry, names: set[str]) -> None:
    assert names <= set(reg)
    with pytest.raises(O2MError, match=f"^{reg.option} 'bogus': unknown"):
        reg.resolve("bogus")


def test_string_forms_are_parsed_by_the_configs() -> None:
    """--boundaries, --weights, --lambda, --target-macs and --channels: the config takes the typed string."""
    from pydantic import ValidationError

    from o2mcli.stages.distill import DistillConfig
    from o2mcli.stages.merge import MergeConfig
    from o2mcli.stages.prune import PruneConfig
    from o2mcli.stages.train import TrainConfig

    assert DistillConfig(template="t", boundaries="0, 250,1000", students=2).boundaries == (0, 250, 1000)
    assert MergeConfig(inputs=("s",), lam="1/4", weights="1,2").model_dump()["lam"] == 0.25
    assert MergeConfig(inputs=("s",), weights="1,2").weights == (1.0, 2.0)
    assert PruneConfig(teacher="t", target_macs="3.4G").target_macs == pytest.approx(3.4e9)
    assert PruneConfig(teacher="t", target_macs=5e6).target_macs == 5e6
    assert TrainConfig(block_out_channels="16,32").block_out_channels == (16, 32)
    for make in (lambda: DistillConfig(template="t", boundaries="0,a"), lambda: MergeConfig(inputs=("s",), lam="x"),
                 lambda: PruneConfig(teacher="t", target_macs="3.4X"), lambda: TrainConfig(block_out_channels="8,y")):
        with pytest.raises(ValidationError):
            make()


def test_library_errors_name_the_field_and_the_cli_the_flag() -> None:
    from o2mcli.errors import flag_name as flag
    from o2mcli.distill.plan import TimestepPlan
    from o2mcli.errors import OptionError

    with pytest.raises(OptionError, match=r"^p_own=1.5: must be a probability") as e:
        TimestepPlan((0, 1000), 1.5)
    assert (e.value.field, e.value.value) == ("p_own", 1.5)
    assert flag("p_own") == "--p-own" and flag("lam") == "--lambda" and flag("block_out_channels") == "--channels"
