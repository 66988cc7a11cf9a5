"""nemo_upcycle.system.files: the mark, what may be replaced or removed, staging directories, locks (no NeMo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system.files import (
    MARK,
    FileLock,
    atomic_path,
    atomic_write_text,
    check_replaceable,
    is_ours,
    publish,
    read_mark,
    remove_ours,
    staging,
    sweep_stale,
    write_mark,
)


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a user's file")
    return path


def test_mark_round_trip_and_foreign_marks(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    assert not is_ours(d)
    write_mark(d, "convert", source="x")
    rec = read_mark(d)
    assert rec["kind"] == "convert" and rec["pid"] == os.getpid() and rec["source"] == "x"
    assert is_ours(d) and is_ours(d, ("convert",)) and not is_ours(d, ("export",))
    (d / MARK).write_text(json.dumps({"tool": "something-else", "kind": "convert"}))  # control: another tool's file
    assert not is_ours(d)
    (d / MARK).write_text("{not json")
    assert not is_ours(d)


def test_remove_ours_removes_only_marked_directories(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    write_mark(ours, "compare-run")
    (ours / "f").write_text("x")
    remove_ours(ours, ("compare-run",))
    assert not ours.exists()
    user = _user_dir(tmp_path / "user")
    with pytest.raises(UpcycleError, match="not made by nemo-upcycle"):
        remove_ours(user)
    assert (user / "notes.txt").read_text() == "a user's file"
    link = tmp_path / "link"  # a link to a marked directory is not removed through the link
    ours.mkdir()
    write_mark(ours, "compare-run")
    link.symlink_to(ours)
    with pytest.raises(UpcycleError):
        remove_ours(link)
    assert (ours / MARK).is_file()


def test_check_replaceable_refuses_protected_and_foreign(tmp_path, monkeypatch):
    src = _user_dir(tmp_path / "d" / "dense")
    monkeypatch.chdir(tmp_path / "d")
    for target, words in ((tmp_path / "d", "current directory"), (src, "is the source"),
                          (tmp_path, "holds the current directory"), (Path("/"), "root")):
        write_mark(target, "convert") if target != Path("/") else None
        with pytest.raises(UpcycleError, match=words):
            check_replaceable(target, ("convert",), protect=[src])
        if target != Path("/"):
            (target / MARK).unlink()
    foreign = _user_dir(tmp_path / "foreign")
    with pytest.raises(UpcycleError, match="did not write"):
        check_replaceable(foreign, ("convert",))
    ours = tmp_path / "ours"
    ours.mkdir()
    write_mark(ours, "convert")
    check_replaceable(ours, ("convert",), protect=[src])  # control: our own output may be replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, ("convert",))
    check_replaceable(foreign, ("convert",), legacy=lambda d: True)  # control: the legacy recogniser is consulted


def test_staging_is_removed_on_error_and_published_with_mark(tmp_path):
    out = tmp_path / "moe"
    with pytest.raises(RuntimeError):
        with staging(out) as tmp:
            (tmp / "w.bin").write_bytes(b"0" * 10)
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
    with staging(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
        publish(tmp, out, "convert")
    assert is_ours(out, ("convert",)) and (out / "w.bin").read_bytes() == b"1"
    with staging(out) as tmp:  # replacing our own output leaves no .old directory behind
        (tmp / "w.bin").write_bytes(b"2")
        publish(tmp, out, "convert")
    assert (out / "w.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
    user = _user_dir(tmp_path / "user")
    with pytest.raises(UpcycleError):  # control: a user's directory is refused at publish time
        with staging(user) as tmp:
            publish(tmp, user, "convert")
    assert (user / "notes.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["moe", "user"]


def test_staging_removed_on_sigterm_and_stale_ones_swept(tmp_path):
    out = tmp_path / "moe"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from nemo_upcycle.system.files import staging
        with staging(Path({str(out)!r})) as tmp:
            (tmp / "big.bin").write_bytes(b"0" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = Path(p.stdout.readline().strip())
    assert tmp.is_dir()
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert not tmp.exists()
    # SIGKILL leaves the directory; the next staging of the same output sweeps it (its process is gone)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = Path(p.stdout.readline().strip())
    p.kill()
    p.wait(30)
    assert tmp.is_dir()
    alive = tmp_path / ".moe.tmp-999999"  # control: a live process's staging directory is kept
    alive.mkdir()
    write_mark(alive, "staging")  # marked by this (live) process
    foreign = _user_dir(tmp_path / ".moe.tmp-12345")  # control: an unmarked look-alike is never touched
    assert sweep_stale(out) == [tmp]
    assert alive.is_dir() and (foreign / "notes.txt").is_file()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    atomic_write_text(f, "old")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UpcycleError, match="disk under .* is full"):
        atomic_write_text(f, "new")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_for_any_writer(tmp_path):
    """The plots of report / compare write through ``atomic_path``: a writer that fails half-way leaves the old file
    and no temporary; one that finishes replaces it."""
    f = tmp_path / "loss.png"
    f.write_bytes(b"old plot")
    with pytest.raises(RuntimeError, match="matplotlib broke"):
        with atomic_path(f) as tmp:
            tmp.write_bytes(b"half a pl")
            raise RuntimeError("matplotlib broke")
    assert f.read_bytes() == b"old plot" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    with atomic_path(f) as tmp:
        assert tmp.parent == f.parent and tmp != f  # control: the writer sees a temporary name beside the file
        tmp.write_bytes(b"new plot")
    assert f.read_bytes() == b"new plot" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_file_lock_excludes_a_second_holder_and_is_removed(tmp_path):
    path = tmp_path / "run.lock"
    code = textwrap.dedent(f"""
        import time
        from nemo_upcycle.system.files import FileLock
        lock = FileLock({str(path)!r})
        assert lock.acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    lock = FileLock(path)
    assert not lock.acquire(wait=False)
    assert lock.holder()["pid"] == p.pid
    p.kill()  # a killed holder does not leave the lock stuck
    p.wait(30)
    assert lock.acquire(wait=False)
    lock.release()
    assert not path.exists()
    with FileLock(path):
        assert path.exists()
    assert not path.exists()
    t0 = time.perf_counter()
    assert FileLock(path).acquire(wait=False) and time.perf_counter() - t0 < 5


_FORK_HOLDER = r"""
import fcntl, os, sys, time
from pathlib import Path
from nemo_upcycle.system.files import FileLock
path = Path(sys.argv[1])
if sys.argv[2] == "ours":
    FileLock(path).acquire()
else:  # control: a bare flock, inherited by the child as it is
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
if os.fork() == 0:  # a worker (data loader, checkpoint writer) that outlives its parent
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["ours", "bare"])
def test_a_killed_holders_forked_worker_does_not_keep_the_lock(tmp_path, kind):
    import signal
    import subprocess
    import sys

    import psutil

    lock = tmp_path / "x.lock"
    p = subprocess.Popen([sys.executable, "-c", _FORK_HOLDER, str(lock), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        kids = psutil.Process(p.pid).children()
        assert len(kids) == 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert kids[0].is_running()  # the worker lives on
        other = FileLock(lock)
        got = other.acquire(wait=False)
        if got:
            other.release()
        assert got == (kind == "ours")  # control: a bare flock stays held by the orphaned worker
    finally:
        for k in psutil.Process(p.pid).children() if p.poll() is None else kids:
            k.kill()
