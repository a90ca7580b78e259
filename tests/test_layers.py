"""Imports point one way: errors/fsutil -> manifest -> models -> diffusion, data -> pruning, distill,
merge, scoring -> stages -> cli. A back-edge or an import cycle fails here (lazy imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import o2mcli

ROOT = Path(o2mcli.__file__).parent

# Lowest first. A package may import only from packages on a lower layer (and from itself).
LAYERS: list[set[str]] = [
    {"o2mcli", "errors"},
    {"fsutil", "devices", "registry", "parsing"},
    {"outputs"},
    {"manifest", "runtime", "viz"},
    {"chain", "models"},
    {"diffusion", "data"},
    {"pruning", "distill", "merge", "scoring"},
    {"stages", "inspect"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every o2mcli module ``path`` imports, at any depth of the file (function-level imports too)."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t == "o2mcli" or t.startswith("o2mcli."))
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the o2mcli modules it imports (names that are attributes resolve to their module)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for t in _imports(path):
            while t not in files and "." in t:  # `from o2mcli.data import load_dataset` -> o2mcli.data
                t = t.rsplit(".", 1)[0]
            if t != mod:
                deps.add(t)
        graph[mod] = deps
    return graph


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "o2mcli"


def test_every_package_has_a_layer() -> None:
    missing = sorted({_top(m) for m in _graph()} - set(LAYER))
    assert not missing, f"packages with no layer in tests/test_layers.py: {missing}"


def _violations(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a package to one on the same or a higher layer."""
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            a, b = _top(mod), _top(dep)
            if a != b and LAYER[b] >= LAYER[a]:
                bad.append(f"{mod} -> {dep} (layer {LAYER[a]} -> {LAYER[b]})")
    return sorted(bad)


def test_imports_point_down_the_layers() -> None:
    bad = _violations(_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_can_fail() -> None:
    """A data module importing a stage, and two modules importing each other, are both reported."""
    graph = {"o2mcli.data.x": {"o2mcli.stages.score"}, "o2mcli.stages.score": {"o2mcli.data.x"}}
    assert _violations(graph) == ["o2mcli.data.x -> o2mcli.stages.score (layer 5 -> 7)"]
    assert _cycles(graph) == [["o2mcli.data.x", "o2mcli.stages.score"]]


# Layers inside a UNet that diffusers names "Model" (pruning fixes up their attributes); not denoisers.
LAYER_CLASSES = {"Transformer2DModel"}


def test_only_the_families_import_diffusers_model_classes() -> None:
    """The denoiser interface is the one door to diffusers' model classes (UNet2DModel and the like)."""
    found = []
    for path in ROOT.rglob("*.py"):
        if "families" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                found += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                          if (a.name.endswith(("Model", "Transformer2DModel")) or a.name.startswith("UNet"))
                          and a.name not in LAYER_CLASSES]
    assert not found, found


# Where a family or a condition kind may be named: its own modules (the families, their pruners) and the one module
# that defines the condition kinds. Everything else asks a family or a kind what it can do.
FAMILY_HOMES = ("models/families/", "pruning/pruners/", "models/conditioning.py")


def _named(node: ast.AST, names: set[str]) -> list[str]:
    """The names of ``names`` a comparison tests by value: ``x == "NAME"``, ``"NAME" != x``, ``x in ("NAME", ...)``
    (a key looked up in a mapping, ``"text" in row``, is not a test of a kind)."""
    found = []
    if isinstance(node, ast.Compare):
        for i, (op, right) in enumerate(zip(node.ops, node.comparators)):
            left = node.left if i == 0 else node.comparators[i - 1]
            if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
                sides = [left, right]
            elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                sides = list(right.elts)
            else:
                continue
            found += [s.value for s in sides if isinstance(s, ast.Constant) and s.value in names]
    return found


def _family_tests(rel: str, source: str, names: set[str]) -> list[str]:
    """Where the module at ``rel`` (under o2mcli/) tests a family or condition kind by name, or imports one family's
    module."""
    if rel.startswith(FAMILY_HOMES):
        return []
    bad = []
    for node in ast.walk(ast.parse(source)):
        bad += [f"{rel}:{node.lineno}: tests {n!r}" for n in _named(node, names)]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("o2mcli.models.families."):
            if node.module != "o2mcli.models.families.base":
                bad.append(f"{rel}:{node.lineno}: imports {node.module}")
    return bad


def _kind_names() -> set[str]:
    from o2mcli.models.conditioning import KINDS
    from o2mcli.models.families import FAMILIES, PIPELINES

    return set(FAMILIES) | set(PIPELINES) | set(KINDS)


def test_no_module_outside_a_family_tests_a_family_or_condition_kind_by_name() -> None:
    """Stages, data, distillation and scoring ask a family (``DenoiserFamily``), a codec or a condition kind what it
    can do; a new family lands as its modules plus registrations, never as ``if family == ...`` elsewhere."""
    names = _kind_names()
    bad = [b for path in sorted(ROOT.rglob("*.py"))
           for b in _family_tests(path.relative_to(ROOT).as_posix(), path.read_text(), names)]
    assert not bad, "\n".join(bad)


def test_the_family_scan_can_fail() -> None:
    """A stage testing a conditioning record's type, a family by class name, or importing a family module is found;
    looking a key up in a mapping is not, and a family's own module may name itself."""
    source = ('if cond.get("type") == "text": pass\nif name in ("DiTTransformer2DModel", "x"): pass\n'
              'if "text" in row: pass\nfrom o2mcli.models.families.dit import DiT\n')
    assert sorted(_family_tests("stages/probe.py", source, _kind_names())) == [
        "stages/probe.py:1: tests 'text'", "stages/probe.py:2: tests 'DiTTransformer2DModel'",
        "stages/probe.py:4: imports o2mcli.models.families.dit"]
    assert _family_tests("models/families/probe.py", source, _kind_names()) == []
