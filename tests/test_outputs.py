"""Outputs under concurrency and faults (issue #16): two real o2m processes at once, faults and SIGKILL at each
rename of the directory swap, writability checked before the work, the .partial dead end, checkpoint checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_refused, cli, tiny_teacher_file
from o2mcli.stages.prune import PruneConfig, run_prune

ENV = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
O2M = [sys.executable, "-m", "o2mcli"]
# The first run of each pair is frozen (SIGSTOP) once it holds its output, so it need not be long.
LONG_SAMPLE = ["-n", "6", "--steps", "20", "--no-png", "--device", "cpu"]
SHORT_SAMPLE = ["-n", "2", "--steps", "2", "--no-png", "--device", "cpu"]
DISTILL = ["-k", "2", "--batch-size", "4", "--log-every", "1", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return tiny_teacher_file(tmp_path / "teacher.safetensors")


def _start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*O2M, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists and is not empty (a lock file is written once its flock is held)."""
    deadline = time.time() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            raise AssertionError(f"ended before {path} appeared: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def _stopped_holding(args: list, cwd: Path, name: str) -> subprocess.Popen:
    """An o2m run frozen (SIGSTOP) once it holds ``name``'s lock: the second run meets it mid-work."""
    proc = _start(args, cwd)
    _wait_for(cwd / f".{name}.o2m-lock", proc)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*O2M, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# 1. Two runs at once ----------------------------------------------------------------------------------------------

def test_two_runs_with_the_default_output_get_two_names(tmp_path: Path, teacher: Path) -> None:
    a = _stopped_holding(["sample", teacher, *LONG_SAMPLE], tmp_path, "samples")
    try:
        b = _run(["sample", teacher, *SHORT_SAMPLE], tmp_path)
    finally:
        code, out_a, err_a = _finish(a)
    assert b.returncode == 0, b.stderr
    assert b.stdout.startswith("wrote samples-2:"), b.stdout  # samples was taken (not yet written) by the first run
    assert code == 0 and out_a.startswith("wrote samples:"), (out_a, err_a)
    from o2mcli.manifest import read_manifest

    assert read_manifest(tmp_path / "samples").summary["n"] == 6
    assert read_manifest(tmp_path / "samples-2").summary["n"] == 2
    assert _hidden(tmp_path) == []  # the locks are gone with their runs


def test_a_second_run_on_the_same_output_is_refused_while_the_first_works(tmp_path: Path, teacher: Path) -> None:
    a = _stopped_holding(["sample", teacher, *LONG_SAMPLE, "-o", "out"], tmp_path, "out")
    try:
        for extra in ([], ["--force"]):
            b = _run(["sample", teacher, *SHORT_SAMPLE, "-o", "out", *extra], tmp_path)
            assert b.returncode == 2, b.stderr
            assert "another o2m run is writing it" in b.stderr and f"pid {a.pid}" in b.stderr, b.stderr
    finally:
        code, out_a, err_a = _finish(a)
    assert code == 0, err_a
    from o2mcli.manifest import read_manifest

    assert read_manifest(tmp_path / "out").summary["n"] == 6  # the first run's output, whole


def test_a_distill_run_is_locked_against_a_second_and_its_partial_is_not_a_dead_end(tmp_path: Path,
                                                                                   teacher: Path) -> None:
    template = run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))
    long = ["distill", template, *DISTILL, "--steps", "100000", "--save-every", "100000", "-o", "st"]
    a = _stopped_holding(long, tmp_path, "st")
    try:
        for extra in (["--resume"], [], ["--force"]):
            b = _run(["distill", template, *DISTILL, "--steps", "2", "-o", "st", *extra], tmp_path)
            assert b.returncode == 2 and "another o2m run is writing it" in b.stderr, b.stderr
        # killed before its first checkpoint: it leaves st.partial/ with a log and no checkpoint
        os.kill(a.pid, signal.SIGCONT)
        _wait_for(tmp_path / "st.partial" / "metrics.jsonl", a)
    finally:
        a.kill()
        a.communicate()
    assert not (tmp_path / "st.partial" / "checkpoint.json").exists()
    res = _run(["distill", template, *DISTILL, "--steps", "2", "-o", "st", "--resume"], tmp_path)
    assert res.returncode == 2 and "stopped before its first checkpoint" in res.stderr, res.stderr
    assert "without --resume" in res.stderr
    res = _run(["distill", template, *DISTILL, "--steps", "2", "-o", "st"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stderr and "st.partial" in res.stderr
    assert (tmp_path / "st" / "manifest.json").is_file() and not (tmp_path / "st.partial").exists()


def test_an_output_that_appears_during_the_run_is_not_replaced_and_the_work_is_kept(in_tmp: Path, teacher: Path,
                                                                                   monkeypatch) -> None:
    import o2mcli.diffusion.sampler as sampler
    from o2mcli.manifest import read_manifest

    real = sampler.sample_images

    def meanwhile(*a, **k):  # another program makes the output while the images are being sampled
        (in_tmp / "out").mkdir()
        (in_tmp / "out" / "mine.txt").write_text("not o2m's")
        return real(*a, **k)

    monkeypatch.setattr(sampler, "sample_images", meanwhile)
    res = cli("sample", teacher, *SHORT_SAMPLE, "-o", "out")
    kept = in_tmp / f"out.o2m-kept-{os.getpid()}"
    assert_refused(res, "appeared while this run worked", kept.name)
    assert (in_tmp / "out" / "mine.txt").read_text() == "not o2m's"
    assert read_manifest(kept).summary["n"] == 2


# 2. Faults at each rename of the swap -------------------------------------------------------------------------

def _old_output(path: Path) -> None:
    path.mkdir()
    (path / "manifest.json").write_text('{"v": "old"}')  # an o2m stage directory, so --force may replace it
    (path / "payload").write_text("old" * 1000)


def _state(path: Path) -> str | None:
    """'old' or 'new' when a whole output is at ``path``; None when nothing is."""
    if not path.exists():
        return None
    v = json.loads((path / "manifest.json").read_text())["v"]
    assert (path / "payload").read_text() == v * 1000, "a torn output"
    return v


def _swap(path: Path, force: bool = True) -> None:
    from o2mcli.outputs import atomic_dir

    with atomic_dir(path, force=force) as tmp:
        (tmp / "manifest.json").write_text('{"v": "new"}')
        (tmp / "payload").write_text("new" * 1000)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_an_error_at_each_rename_leaves_the_old_output(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    import errno

    import o2mcli.outputs as outputs

    real = outputs._move
    n_moves = 1 if exchange else 2
    for k in range(n_moves):
        out = tmp_path / f"out{k}"
        _old_output(out)
        calls = []

        def faulty(src, dst, flags, k=k, calls=calls):
            if flags == outputs.RENAME_EXCHANGE and not exchange:
                return False  # a system without renameat2
            calls.append((src, dst))
            if len(calls) == k + 1:
                raise OSError(errno.EIO, "injected", str(dst))
            return real(src, dst, flags)

        monkeypatch.setattr(outputs, "_move", faulty)
        with pytest.raises(OSError, match="injected"):
            _swap(out)
        monkeypatch.setattr(outputs, "_move", real)
        assert _state(out) == "old"
        assert _hidden(tmp_path) == [], f"rename {k + 1} left {_hidden(tmp_path)}"
        shutil.rmtree(out)


_KILLER = """
import os, signal, sys
import o2mcli.outputs as outputs
k, when, exchange = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
real, n = outputs._move, [0]
def move(src, dst, flags):
    if flags == outputs.RENAME_EXCHANGE and not exchange:
        return False
    n[0] += 1
    if n[0] == k and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    done = real(src, dst, flags)
    if n[0] == k and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return done
outputs._move = move
from swap_case import swap
swap(sys.argv[4])
"""


@pytest.mark.parametrize("exchange,k,when", [(True, 1, "before"), (True, 1, "after"),
                                             (False, 1, "before"), (False, 1, "after"), (False, 2, "after")],
                         ids=["exchange-before", "exchange-after", "aside-before", "aside-after", "in-place-after"])
def test_sigkill_at_each_rename_leaves_old_or_new_and_the_next_run_repairs(tmp_path: Path, exchange: bool, k: int,
                                                                          when: str) -> None:
    from o2mcli.outputs import release_all, reserve_output

    (tmp_path / "swap_case.py").write_text(
        "from pathlib import Path\n"
        "from o2mcli.outputs import atomic_dir\n"
        "def swap(p):\n"
        "    with atomic_dir(Path(p), force=True) as tmp:\n"
        "        (tmp / 'manifest.json').write_text('{\"v\": \"new\"}')\n"
        "        (tmp / 'payload').write_text('new' * 1000)\n")
    out = tmp_path / "out"
    _old_output(out)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    res = subprocess.run([sys.executable, "-c", _KILLER, str(k), when, "1" if exchange else "0", str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    before = _state(out)
    # Only a kill between the two renames of a system without renameat2 leaves nothing at the path ...
    assert before in (("old", "new") if (exchange or (k, when) != (1, "after")) else (None,))
    # ... and the next run of that output puts it back; any kill's hidden temporaries are removed, and said.
    from o2mcli import outputs

    left = [p for p in os.listdir(tmp_path) if p.startswith(".out.")]
    said: list[str] = []
    real_notice = outputs.notice
    outputs.notice = said.append
    try:
        reserve_output(out, force=True)
    finally:
        outputs.notice = real_notice
        release_all()
    assert _state(out) == (before or "old")
    assert [p for p in _hidden(tmp_path) if p != "__pycache__"] == []
    assert bool(said) == bool(left), (left, said)


# 3. Writability before the work ------------------------------------------------------------------------------

def test_a_parent_that_is_a_file_is_refused_before_the_work(in_tmp: Path, teacher: Path) -> None:
    (in_tmp / "afile").write_text("x")
    assert_refused(cli("sample", teacher, *SHORT_SAMPLE, "-o", "afile/samples"), "afile", "is a file")
    assert_refused(cli("distill", "--mode", "dkdm", "--teacher", teacher, "--student-config", "nope.json", "-o",
                       "afile/sub/st"), "afile", "is a file")


def _in_small_fs(size_kb: int, options: str, script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with ``$FS`` a fresh tmpfs of ``size_kb`` (mounted ``options``), in a private mount
    namespace (unshare: no root needed, nothing mounted outside)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    fs = cwd / "fs"
    fs.mkdir()
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {fs}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    return subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size={size_kb}k,{options} tmpfs {fs} && "
                           f"export FS={fs} && {script}"], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_read_only_file_system_is_refused_before_the_work(tmp_path: Path, teacher: Path) -> None:
    cmd = " ".join([*O2M, "sample", str(teacher), *LONG_SAMPLE, "-o", "$FS/samples"])
    res = _in_small_fs(1024, "ro", cmd, tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "nothing was done" in lines[0], res.stderr


def test_a_full_disk_is_refused_before_the_work(tmp_path: Path, teacher: Path) -> None:
    # 64 images of 8x8 need a few KB; 1000 images of a 8x8x1 model with PNGs ~128 KB + 1 MiB margin; the FS has 512 KB
    cmd = " ".join([*O2M, "sample", str(teacher), "-n", "1000", "--steps", "1000", "--device", "cpu",
                    "-o", "$FS/samples", "; ls -a $FS"])
    res = _in_small_fs(512, "rw", cmd, tmp_path)
    assert "KiB free" in res.stderr and "needs about" in res.stderr and "nothing was done" in res.stderr, res.stderr
    assert res.stdout.split() == [".", ".."]  # no lock, no temporary left on the full file system
    assert "wrote" not in res.stdout


# 4. Checkpoints: refused when malformed, a resume names what differs, the NaN message tells the truth -------------

@pytest.fixture(scope="module")
def _killed_once(tmp_path_factory) -> Path:
    """One distill run killed after its checkpoint at step 2 (made once; each test works on a copy)."""
    from conftest import kill_after_checkpoint

    root = tmp_path_factory.mktemp("killed")
    teacher = tiny_teacher_file(root / "teacher.safetensors")
    run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=root / "template"))
    if not kill_after_checkpoint([*O2M, *_killed_args(root)], root / "st.partial" / "checkpoint.json", 2, ENV):
        pytest.skip("the run ended before it could be killed")
    return root


def _killed_args(root: Path) -> list[str]:
    return ["distill", str(root / "template"), *DISTILL, "--steps", "100000", "--save-every", "2", "-o",
            str(root / "st")]


@pytest.fixture
def killed_run(_killed_once: Path, tmp_path: Path):
    """A distill run killed after its checkpoint at step 2: (its argv, the partial dir)."""
    root = tmp_path / "run"
    shutil.copytree(_killed_once, root)
    return _killed_args(root), root / "st.partial"


def test_resume_with_other_settings_names_the_setting(killed_run) -> None:
    args, work = killed_run
    i = args.index("--lr")
    changed = [*args[:i], "--lr", "5e-4", *args[i + 2:]]
    assert_refused(cli(*changed, "--resume"), "other settings", "--lr 0.001 (now 0.0005)")


def test_refusing_a_run_over_an_interrupted_one_says_where_it_stopped(killed_run) -> None:
    args, work = killed_run
    step = json.loads((work / "checkpoint.json").read_text())["step"]
    assert_refused(cli(*args), "interrupted run", f"step {step}", "--resume")


@pytest.mark.parametrize("edit,words", [({"step": -2}, ["step -2", "non-negative"]),
                                        ({"students": {"0": {}}}, ["'students'", "not a list"]),
                                        ({"step": "2"}, ["step '2'"])])
def test_a_malformed_checkpoint_is_refused(killed_run, edit: dict, words: list) -> None:
    args, work = killed_run
    state = json.loads((work / "checkpoint.json").read_text())
    state.update(edit)
    (work / "checkpoint.json").write_text(json.dumps(state))
    assert_refused(cli(*args, "--resume"), "corrupt checkpoint", *words)


def test_nan_before_the_first_checkpoint_promises_none(in_tmp: Path, teacher: Path, monkeypatch) -> None:
    from o2mcli.distill.losses.output import OutputKD

    template = run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=in_tmp / "template"))
    real = OutputKD.forward
    monkeypatch.setattr(OutputKD, "forward", lambda self, s, t: real(self, s, t) * float("nan"))
    res = cli("distill", template, *DISTILL, "--steps", "6", "--save-every", "4", "-o", "st")
    assert_refused(res, "NaN", "step 1", "no checkpoint was written yet", "nothing to resume")
    assert "kept" not in res.stderr
    assert not (in_tmp / "st.partial" / "checkpoint.json").exists()


def test_the_next_run_of_an_output_removes_a_killed_runs_temporaries_and_says_so(in_tmp: Path, teacher: Path) -> None:
    left = in_tmp / ".samples.k1ll3d00.tmp-o2m"  # as atomic_dir names them
    left.mkdir()
    (left / "half.npz").write_bytes(b"x" * 10)
    other = in_tmp / ".other.k1ll3d00.tmp-o2m"  # another output's: not this run's business
    other.mkdir()
    res = cli("sample", teacher, *SHORT_SAMPLE)
    assert res.exit_code == 0, res.output
    assert "note: removed 1 unfinished temporary output" in res.stderr and left.name in res.stderr
    assert not left.exists() and other.exists()


def test_a_file_output_that_appears_during_the_run_is_not_replaced_and_the_weights_are_kept(
        in_tmp: Path, teacher: Path, monkeypatch) -> None:
    import o2mcli.stages.merge as merge
    from o2mcli.fsutil import read_metadata
    from o2mcli.models.io import load_model

    template = run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=in_tmp / "template"))
    assert cli("distill", template, *DISTILL, "--steps", "2", "-o", "st").exit_code == 0
    real = merge.check_same_architecture

    def meanwhile(*a, **k):  # another program writes the output file while the students are being merged
        (in_tmp / "m.safetensors").write_bytes(b"someone else's")
        return real(*a, **k)

    monkeypatch.setattr(merge, "check_same_architecture", meanwhile)
    res = cli("merge", "st", "-o", "m.safetensors")
    kept = in_tmp / f"m.o2m-kept-{os.getpid()}.safetensors"
    assert_refused(res, "appeared while this run worked", kept.name)
    assert (in_tmp / "m.safetensors").read_bytes() == b"someone else's"
    assert read_metadata(kept)["o2m.kind"] == "merged" and load_model(kept).unet is not None
