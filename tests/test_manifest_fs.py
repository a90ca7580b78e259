"""Atomic writes, path containment and typed manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from o2mcli.errors import O2MError
from o2mcli.fsutil import atomic_file, atomic_write_json, contained
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import Manifest, parent_ref, read_manifest, require_kind, write_manifest


def _stage(tmp_path: Path, name: str = "stage") -> Path:
    out = tmp_path / name
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        write_manifest(tmp, "samples", {"x": 1})
    return out


def test_atomic_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # normal file mode, not mkstemp's


def test_atomic_dir_refuses_existing_and_keeps_old_on_error(tmp_path: Path) -> None:
    out = _stage(tmp_path)
    with pytest.raises(O2MError, match="already exists; pass --force"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "hello" and not (out / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp dirs left behind
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert (out / "new.txt").exists() and not (out / "a.txt").exists()


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", ""])
def test_contained_refuses_escape(tmp_path: Path, rel: str) -> None:
    with pytest.raises(O2MError, match="outside its directory"):
        contained(tmp_path, rel)


def test_contained_refuses_symlink_out(tmp_path: Path) -> None:
    inside = tmp_path / "d"
    inside.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", inside / "link")
    with pytest.raises(O2MError, match="leaves its directory"):
        contained(inside, "link")


def test_manifest_round_trip_and_verification(tmp_path: Path) -> None:
    out = _stage(tmp_path)
    man = read_manifest(out)
    assert man.kind == "samples" and man.schema_version == 2
    assert {a.path for a in man.artifacts} == {"a.txt", "sub/b.bin"}
    assert set(man.versions) >= {"o2m", "torch", "diffusers"}
    require_kind(man, out, ("samples",))
    with pytest.raises(O2MError, match="kind is 'samples', expected 'teacher'"):
        require_kind(man, out, ("teacher",))
    (out / "a.txt").write_text("hellO")
    with pytest.raises(O2MError, match="sha256 does not match"):
        read_manifest(out)
    (out / "a.txt").write_text("hel")
    with pytest.raises(O2MError, match="size 3 does not match"):
        read_manifest(out)
    (out / "a.txt").unlink()
    with pytest.raises(O2MError, match="missing"):
        read_manifest(out)


def _edit(out: Path, fn) -> None:
    raw = json.loads((out / "manifest.json").read_text())
    fn(raw)
    (out / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs/path.txt"])
def test_manifest_naming_outside_path_is_refused(tmp_path: Path, bad: str) -> None:
    out = _stage(tmp_path)
    _edit(out, lambda r: r["artifacts"][0].update(path=bad))
    with pytest.raises(O2MError, match="artifacts.0.path"):
        read_manifest(out)


def test_manifest_symlink_artifact_out_is_refused(tmp_path: Path) -> None:
    out = _stage(tmp_path)
    (tmp_path / "outside.txt").write_text("hello")
    (out / "a.txt").unlink()
    os.symlink(tmp_path / "outside.txt", out / "a.txt")
    with pytest.raises(O2MError, match="leaves its directory"):
        read_manifest(out)


def test_manifest_bad_schema_kind_and_json(tmp_path: Path) -> None:
    out = _stage(tmp_path)
    _edit(out, lambda r: r.update(schema_version=99))
    with pytest.raises(O2MError, match="schema_version"):
        read_manifest(out)
    _edit(out, lambda r: r.update(schema_version=1, kind="banana"))
    with pytest.raises(O2MError, match="kind"):
        read_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(O2MError, match="unreadable manifest"):
        read_manifest(out)
    with pytest.raises(O2MError, match="not an o2m stage directory"):
        read_manifest(tmp_path)


def test_model_kinds_need_models_that_are_artifacts() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        Manifest(kind="teacher", created_at="x", versions={}, config={})


def test_parent_ref_hashes(tmp_path: Path, tiny_model_file: Path) -> None:
    out = _stage(tmp_path)
    ref = parent_ref(out)
    assert ref.kind == "samples" and Path(ref.path) == out.resolve()
    fref = parent_ref(tiny_model_file)
    assert fref.kind == "model-file" and len(fref.sha256) == 64
