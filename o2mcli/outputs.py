"""Outputs reserved before the work starts (one lock per output name, the directory's writability and free space
checked, what killed runs left beside the output cleaned up or put back), and put in place in one step when done.

A run holds ``.NAME.o2m-lock`` beside its output ``NAME`` (an ``flock``, released by the kernel when the process
dies, so the file a killed run leaves blocks nothing) from before its first piece of work until it exits. The lock
covers everything of that name: the output, its ``NAME.partial/`` checkpoint directory and the hidden temporaries
of its atomic writes. So two runs never write the same output, a default output (``samples``, ``samples-2``...)
is taken exclusively, a ``--resume`` never continues a run that is still going, and whatever hidden temporaries
exist beside a name when its lock is taken were left by a dead run and can be cleaned. Under torchrun, rank 0
alone takes locks and cleans.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from o2mcli.errors import O2MError
from o2mcli.fsutil import OLD_SUFFIX, TMP_SUFFIX, check_output_free, fsync_dir, human_bytes, overlap, umask_mode

# 1. Reserving an output -------------------------------------------------------------------------------------------

T = TypeVar("T")
LOCK_SUFFIX = ".o2m-lock"
MIN_FREE_BYTES = 1 << 20  # what any output needs beyond its own estimate: manifests, logs, a loss plot


def notice(msg: str) -> None:
    """One line on stderr that the user should read but that does not stop the run."""
    print(f"note: {' '.join(msg.split())}", file=sys.stderr, flush=True)


def _is_main() -> bool:
    # torchrun's env var; read here (not from runtime.dist) because reservations come before the process group.
    return int(os.environ.get("RANK", "0")) == 0


def lock_path(path: Path) -> Path:
    """The lock file of an output name: hidden, beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@dataclass
class Reservation:
    """A held output name: the open, ``flock``-ed lock file."""

    path: Path
    lock: Path
    fd: int

    def release(self) -> None:
        """Unlink the lock (while still holding it, so no other run can be holding this file) and close it."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.lock).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.lock)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(_key(self.path), None)


_HELD: dict[str, Reservation] = {}


def _key(path: Path) -> str:
    return str(Path(path).resolve())


# What this run reads: every path an input names or leads to (a model, its manifest's parents, the teacher and
# pipeline its provenance and conditioning records point to, data, prompts). None of them is ever an output, with or
# without --force: an output found to be one is refused before any work (or, at the latest, before anything is
# put in place). Cleared with the reservations (one CLI command is one run).
_INPUTS: dict[str, str] = {}


def _input_refusal(out: Path, how: str, inp: str, why: str) -> O2MError:
    return O2MError(f"{out}: the output {how} {inp} ({why}); choose another -o (--force never replaces what a "
                    "run reads or what its inputs' provenance names)")


def note_input(path: Path | str | None, why: str = "an input of this run") -> None:
    """Record that this run reads ``path``, or that a record it reads points to it (``why`` says which, e.g. "the
    teacher template/ records"), refusing at once if an output this process holds is, contains or lies inside it."""
    if path is None or not str(path) or "\x00" in str(path):
        return
    try:
        key = str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop or an unusable name: nothing to protect
        return
    _INPUTS.setdefault(key, why)
    for r in list(_HELD.values()):
        how = overlap(r.path, Path(key))
        if how:
            raise _input_refusal(r.path, how, key, why)


def check_not_input(path: Path) -> None:
    """Refuse an output that is, contains or lies inside anything this run reads (see :func:`note_input`)."""
    for key, why in list(_INPUTS.items()):
        how = overlap(Path(path), Path(key))
        if how:
            raise _input_refusal(Path(path), how, key, why)


_DEPTH = [0]  # how many runs (a CLI command, a stage called in-process) are open; the outermost owns the state


@contextlib.contextmanager
def one_run() -> Iterator[None]:
    """A run: its inputs and its reserved outputs belong to it alone. The outermost run starts with nothing
    recorded and, however it ends, releases what it reserved and forgets what it read (so a stage called after
    another in one process, e.g. in a notebook, is judged on its own inputs and outputs)."""
    outer = _DEPTH[0] == 0
    if outer:
        _INPUTS.clear()
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if outer:
            release_all()


def run_scope(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a stage's entry point: it runs as :func:`one_run`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with one_run():
            return fn(*args, **kwargs)

    return wrapper


@atexit.register
def release_all() -> None:
    """Release every lock this process holds (the kernel would too; this also removes the lock files), and forget
    the run's inputs."""
    for r in list(_HELD.values()):
        r.release()
    _INPUTS.clear()


def _holder(lock: Path) -> str:
    """Who holds a lock, as its holder wrote it."""
    try:
        info = json.loads(lock.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on {info.get('host', '?')}, since {since}: {str(info.get('command', ''))[:80]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is still starting"


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (where a new output's directories would start)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_parent(path: Path) -> Path:
    """Create the output's parent directories, refusing a parent that is a file or cannot be written."""
    parent = Path(path).parent
    existing = _existing_ancestor(parent)
    if not existing.is_dir():
        raise O2MError(f"{path}: cannot create it: {existing} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError as e:
        raise O2MError(f"{path}: cannot create it: a parent of it is a file, not a directory") from e
    except OSError as e:
        raise O2MError(f"{path}: cannot create {parent} ({e.strerror or e}); nothing was done") from e
    return parent


def _try_lock(path: Path) -> Optional[Reservation]:
    """Take the output's lock; None when a live run holds it. Refuses a directory that cannot be written."""
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise O2MError(f"{path}: cannot write in {lock.parent} ({e.strerror or e}); nothing was done") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the run we waited on released (unlinked) it between our open and our flock: retry
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError as e:  # a full disk: the lock holds anyway, but say what is wrong before any work
            os.close(fd)
            raise O2MError(f"{path}: cannot write in {lock.parent} ({e.strerror or e}); nothing was done") from e
        return Reservation(path=Path(path), lock=lock, fd=fd)


def _leftover_pattern(name: str) -> re.Pattern[str]:
    # mkstemp/mkdtemp's names: ".NAME." + 8 random characters + the suffix (see fsutil.atomic_file/atomic_dir)
    return re.compile(rf"^\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}({re.escape(TMP_SUFFIX)}|{re.escape(OLD_SUFFIX)})$")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def recover_leftovers(path: Path) -> list[str]:
    """Clean what a killed run left beside ``path`` (its lock must be held): half-written temporaries are removed;
    an old output moved aside by an interrupted replacement is put back when nothing is at ``path``. Returns what
    was done, one line each."""
    path = Path(path)
    pattern = _leftover_pattern(path.name)
    try:
        found = sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return []
    done: list[str] = []
    for p in (q for q in found if q.name.endswith(OLD_SUFFIX)):
        if not (path.exists() or path.is_symlink()):
            os.rename(p, path)
            done.append(f"put {path} back: a run killed while replacing it had moved it aside to {p.name}")
        else:
            _remove(p)
            done.append(f"removed {p}: the previous {path.name}, left by a run killed just after replacing it")
    temps = [p for p in found if p.name.endswith(TMP_SUFFIX) and p.exists()]
    for p in temps:
        _remove(p)
    if temps:
        done.append(f"removed {len(temps)} unfinished temporary output(s) of a killed run beside {path} "
                    f"({', '.join(p.name for p in temps[:3])}{'...' if len(temps) > 3 else ''})")
    return done


def ensure_space(path: Path, need_bytes: int) -> None:
    """Refuse to start when the output's file system has less free space than the output needs (an estimate)."""
    parent = _existing_ancestor(Path(path).parent)
    free = shutil.disk_usage(parent).free
    need = int(need_bytes) + MIN_FREE_BYTES
    if free < need:
        raise O2MError(f"{path}: only {human_bytes(free)} free in {parent.resolve()}; this output needs about "
                       f"{human_bytes(need)}; nothing was done")


def _recover(r: Reservation) -> None:
    """Under a fresh lock: repair what dead runs left beside the output, before anything looks at the output."""
    for line in recover_leftovers(r.path):
        notice(line)


def reserve_output(path: Path, force: bool = False, inputs: Iterable[Path | str | None] = (),
                   need_bytes: int = 0) -> Path:
    """Check an output and hold it for this run, before any work: refuse what would destroy something
    (``check_output_free``), an output another live run is writing, a parent that is a file or cannot be written,
    and a file system without ``need_bytes`` free; then clean what killed runs left beside it.

    Idempotent within a process (a default output reserved by the CLI is the stage's own).
    """
    path = Path(path)
    if "\x00" in str(path):
        raise O2MError(f"{str(path)!r}: output path contains a NUL byte")
    check_not_input(path)
    if not _is_main():
        check_output_free(path, force, inputs)
        return path
    held = _HELD.get(_key(path))
    if held is None:
        check_output_free(path, force, inputs)  # the plain refusals first (a working directory has no lock name)
        _writable_parent(path)
        r = _try_lock(path)
        if r is None:
            raise O2MError(f"{path}: another o2m run is writing it ({_holder(lock_path(path))}); wait for it to "
                           "finish or choose another -o")
        try:
            _recover(r)
            check_output_free(path, force, inputs)  # again, under the lock and with any old output put back
            ensure_space(path, need_bytes)
        except BaseException:
            r.release()
            raise
        _HELD[_key(path)] = r
    else:
        check_output_free(path, force, inputs)
        ensure_space(path, need_bytes)
    return path


def default_output(root: Path, name: str, suffix: str = "") -> Path:
    """``root/NAME``, or ``NAME-2``, ``NAME-3``... (each + ``suffix``): the first name that neither exists nor is
    held by a live run, taken exclusively for this run. Chained runs never clobber an earlier output, and two runs
    started at once get two names."""
    root = Path(root)
    _writable_parent(root / name)
    for i in range(1, 100_000):
        path = root / (f"{name}{suffix}" if i == 1 else f"{name}-{i}{suffix}")
        if path.exists() or path.is_symlink():
            continue
        if not _is_main():  # rank 0 takes the name; the stage gives it to the other ranks
            return path
        if _key(path) in _HELD:
            return path
        r = _try_lock(path)
        if r is None:
            continue
        _recover(r)
        if path.exists() or path.is_symlink():  # written by a run that finished between our two looks, or put back
            r.release()
            continue
        _HELD[_key(path)] = r
        return path
    raise O2MError(f"{root}: no free name for a new {name} output")


def is_held(path: Path) -> bool:
    """Whether this process holds ``path``'s lock."""
    return _key(path) in _HELD


def wait_for_lock(path: Path, waiting: Optional[Callable[[str], None]] = None, poll_s: float = 0.25) -> Reservation:
    """Take ``path``'s lock, waiting while another live run holds it (``waiting`` gets that run's description once,
    when the wait begins), then clean what killed runs left beside ``path`` (notes). For what runs share rather
    than own, such as a cache one run builds and the next reuses: every process (every torchrun rank) takes it,
    nothing is refused, and the caller releases it (``Reservation.release``) as soon as it is done."""
    path = Path(path)
    _writable_parent(path)
    told = False
    while (r := _try_lock(path)) is None:
        if waiting is not None and not told:
            waiting(_holder(lock_path(path)))
            told = True
        time.sleep(poll_s)
    try:
        _recover(r)
    except BaseException:
        r.release()
        raise
    return r


# 2. Putting a finished output in place ----------------------------------------------------------------------

# renameat2(2) flags (Linux 3.15+): fail if the target exists; swap two paths in one step.
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it (then the caller falls back)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _move(src: Path, dst: Path, flags: int) -> bool:
    """Every rename of an output goes through here (tests inject faults at each one): a plain ``rename`` for
    ``flags`` 0, else ``renameat2`` with ``flags``, False where that is unsupported."""
    if flags == 0:
        os.rename(src, dst)
        return True
    return _renameat2(src, dst, flags)


def kept_name(path: Path) -> Path:
    """Where a finished output goes when its path was taken while the run worked: ``NAME.o2m-kept-PID`` (a file
    keeps its suffix: ``merged.o2m-kept-PID.safetensors``)."""
    i = os.getpid()
    while True:
        kept = path.with_name(f"{path.stem}.o2m-kept-{i}{path.suffix}")
        if not (kept.exists() or kept.is_symlink()):
            return kept
        i += 1


def _publish(tmp: Path, path: Path, force: bool) -> None:
    """Put the finished ``tmp`` at ``path`` so that after any fault either the old or the new output is there.

    Nothing at ``path``: one no-replace rename (a path that appeared meanwhile is never overwritten). An output to
    replace: one ``RENAME_EXCHANGE``, then the old one (now at ``tmp``) is removed. Without renameat2, two
    renames: old aside to a hidden ``.old-o2m`` name, new in place; a failure of the second puts the old one
    back, and a kill between them is repaired by the next run of that output (:func:`recover_leftovers`).
    """
    check_not_input(path)  # the last guard: nothing this run read is ever replaced
    if not (path.exists() or path.is_symlink()):
        try:
            if not _move(tmp, path, RENAME_NOREPLACE):
                if path.exists() or path.is_symlink():
                    raise FileExistsError(errno.EEXIST, "exists", str(path))
                _move(tmp, path, 0)
            return
        except FileExistsError:
            pass  # appeared while this run worked: the rules of an existing output apply
        except OSError as e:
            if e.errno != errno.EEXIST and e.errno != errno.ENOTEMPTY:
                raise
    try:
        check_output_free(path, force)
    except O2MError as e:
        kept = kept_name(path)
        _move(tmp, kept, 0)
        raise O2MError(f"{e} (it appeared while this run worked; the finished output is kept as {kept})") from e
    if _move(tmp, path, RENAME_EXCHANGE):
        _remove(tmp)  # now the old output
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=OLD_SUFFIX, dir=path.parent))
    old.rmdir()
    _move(path, old, 0)
    try:
        _move(tmp, path, 0)
    except BaseException:
        _move(old, path, 0)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden temp sibling, then put it at ``path`` in one step (:func:`_publish`); on an
    error nothing at ``path`` changes and the temp is removed. Whether ``path`` may be replaced is checked when the
    directory is complete (callers check it before their work too), so an output that appeared meanwhile costs
    no work: the finished one is kept beside it. An output nobody reserved is checked up front as well."""
    path = Path(path)
    if not is_held(path):
        check_output_free(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes 0700
        fsync_dir(tmp)
        _publish(tmp, path, force)
        fsync_dir(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
