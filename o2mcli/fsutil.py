"""Atomic writes, hashing and path containment: nothing half-written, nothing outside."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from o2mcli.errors import O2MError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp-o2m", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode(0o666))  # mkstemp makes 0600; give the usual file mode
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON (sorted keys, indented, trailing newline) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def check_output_free(path: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; called before any work starts."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise O2MError(f"{path}: output already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Build a directory in a temp sibling, then swap it in whole; on error nothing changes."""
    path = Path(path)
    check_output_free(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp-o2m", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700
        _fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            # Replace: move the old one aside first so a crash leaves either old or new.
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old-o2m", dir=path.parent))
            trash.rmdir()
            os.replace(path, trash)
            os.replace(tmp, path)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def contained(root: Path, rel: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` and symlinks that leave it."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or "\\" in rel:
        raise O2MError(f"{root}: manifest names a path outside its directory: {rel!r}")
    if any(part == ".." for part in Path(rel).parts):
        raise O2MError(f"{root}: manifest names a path outside its directory: {rel!r}")
    root_r = Path(root).resolve()
    target = (root_r / rel).resolve()
    if target != root_r and root_r not in target.parents:
        raise O2MError(f"{root}: manifest path {rel!r} leaves its directory (symlink to {target})")
    return target
