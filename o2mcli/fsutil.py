"""Atomic writes, hashing and path containment: nothing half-written, nothing outside."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from o2mcli.errors import O2MError


MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def loads_bounded(text: str | bytes, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
                  noun: str = "JSON"):
    """``json.loads`` for files o2m did not necessarily write: size and nesting bounded before parsing."""
    if len(text) > max_bytes:
        raise O2MError(f"{what}: {len(text):,} bytes of JSON, more than the {max_bytes:,} o2m reads")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise O2MError(f"{what}: not UTF-8 JSON ({e.reason})") from e
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > max_depth:
            raise O2MError(f"{what}: JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise O2MError(f"{what}: unreadable {noun} ({e})") from e


def human_bytes(n: float, binary: bool = True) -> str:
    """A byte count for people: KiB/MiB/GiB (``binary``) or kB/MB/GB."""
    base, units = (1024, ("bytes", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "kB", "MB", "GB"))
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError("unreachable")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_SUFFIX, OLD_SUFFIX = ".tmp-o2m", ".old-o2m"  # hidden temporaries beside an output (see o2mcli.outputs)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, umask_mode(0o666))  # mkstemp makes 0600; give the usual file mode
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_OS_ERROR = re.compile(r"os error (\d+)")


@contextlib.contextmanager
def storage_errors(where: Path) -> Iterator[None]:
    """Turn a failed safetensors write (``SafetensorError``, which a full disk raises from inside the library, also
    under diffusers' ``save_pretrained``) into the ``OSError`` it wraps, naming ``where``, so the CLI reports it
    as it reports every other write that the file system refused ("No space left on device; nothing was
    written")."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else errno.EIO
        raise OSError(code, os.strerror(code) if m else f"safetensors write failed ({str(e)[:200]})",
                      str(where)) from e


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a refused write reported as an ``OSError`` naming ``path``."""
    from safetensors.torch import save_file

    with storage_errors(path):
        save_file(tensors, str(path), metadata=metadata)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON (sorted keys, indented, trailing newline) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# a stage directory; an `o2m export` pipeline; a latent cache (data/latent_cache.py)
O2M_DIR_MARKERS = ("manifest.json", "o2m_export.json", "o2m_latent_cache.json")


MAX_SAFETENSORS_HEADER = 16 << 20


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no tensor is loaded).

    The one reader of safetensors metadata: a missing, truncated or malformed header is a one-line
    ``O2MError`` naming the file ("corrupt or truncated safetensors file").
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or not 2 <= n <= MAX_SAFETENSORS_HEADER:
                raise ValueError(f"header length {n if len(head) == 8 else 'missing'}")
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError(f"header cut at {len(raw)} of {n} bytes")
        header = loads_bounded(raw, "header", max_bytes=MAX_SAFETENSORS_HEADER)
    except FileNotFoundError as e:
        raise O2MError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise O2MError(f"{path}: a directory, not a safetensors file") from e
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError, O2MError) as e:
        raise O2MError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:120]})") from e
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise O2MError(f"{path}: corrupt or truncated safetensors file (__metadata__ is not a map of strings)")
    return dict(meta)


def _o2m_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose header says o2m wrote it (reads the header only)."""
    try:
        return str(read_metadata(path).get("format", "")).startswith("o2m")
    except O2MError:
        return False


def written_by_o2m(path: Path) -> bool:
    """An o2m output that ``--force`` may replace: a stage directory (manifest.json), an exported pipeline,
    an o2m safetensors file, or an empty directory."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        # a marker that is a symlink (maybe out of the directory) marks nothing
        return any((path / m).is_file() and not (path / m).is_symlink() for m in O2M_DIR_MARKERS) or not any(
            path.iterdir())
    return path.is_file() and path.suffix == ".safetensors" and _o2m_safetensors(path)


def overlap(out: Path, inp: Path) -> str | None:
    """How ``out`` collides with the input ``inp`` (is it, contains it, lies inside it), or None."""
    o, i = Path(out).resolve(), Path(inp).resolve()
    if o == i:
        return "is"
    if o in i.parents:
        return "contains"
    if i in o.parents:
        return "lies inside"
    return None


def check_output_free(path: Path, force: bool, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse an output that would destroy something; called before any work starts.

    Always refused: an output that is, contains or lies inside an input, the working directory or one of
    its parents. An existing output needs ``force``, and ``force`` replaces only what o2m wrote.
    """
    path = Path(path)
    if "\x00" in str(path):
        raise O2MError(f"{str(path)!r}: output path contains a NUL byte")
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise O2MError(f"{path}: refusing to write over the working directory or one of its parents; "
                       "name a new output with -o")
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        how = overlap(path, Path(inp))
        if how:
            raise O2MError(f"{path}: the output {how} the input {inp}; choose another -o (--force never "
                           "replaces an input)")
    if path.exists() or path.is_symlink():
        if not force:
            raise O2MError(f"{path}: output already exists; pass --force to replace it")
        if not written_by_o2m(path):
            what = "a symbolic link" if path.is_symlink() else ("a directory" if path.is_dir() else "a file")
            raise O2MError(f"{path}: exists and is {what} o2m did not write (no o2m manifest or model header); "
                           "--force replaces only o2m outputs: move it away or choose another -o")


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
