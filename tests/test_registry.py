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
