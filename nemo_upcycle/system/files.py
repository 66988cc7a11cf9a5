"""What the project writes, and its one rule on deleting: only what it made, recognised by its mark.

Every directory nemo-upcycle makes to hold output (a ``convert`` or export directory, a staging directory, a
``compare`` folder and its run directories, a training run directory, a data-cache entry) carries a small JSON
file ``.nemo-upcycle`` (the mark) naming what made it. A directory is replaced or removed only when it carries
the mark (``remove_ours``, ``check_replaceable``); one that is, holds or lies above a protected path (the dense
source, the current directory, the home directory) never is, whatever its mark says.

Also here: writes that land whole or not at all (``atomic_write_text``: temporary name, then ``os.replace``),
staging directories removed on failure, on SIGTERM / SIGINT / SIGHUP (what ``timeout``, Slurm and Ctrl-C send),
and swept by a later run once the process that made them is gone (``staging``, ``sweep_stale``), and lock
files that a killed process does not leave stuck and that are removed when released (``FileLock``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from nemo_upcycle.errors import UpcycleError

MARK = ".nemo-upcycle"
TOOL = "nemo-upcycle"
TIMINGS_FILE = "timings.json"  # RUN/timings.json: engine.timing writes it, apps.report reads it


# ---- the mark ---------------------------------------------------------------------------------------------------
def _process_identity(pid: Optional[int] = None) -> dict:
    """pid, host and process start time: together they name one process (a pid alone is reused)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        started = psutil.Process(pid).create_time()
    except Exception:  # psutil missing or the process gone: the pid and host still say something
        started = None
    return {"pid": pid, "host": socket.gethostname(), "started": started}


def write_mark(d: Path, kind: str, **info) -> None:
    """Mark directory ``d`` as made by nemo-upcycle (``kind``: convert, export, staging, compare, ...)."""
    record = {"tool": TOOL, "kind": kind, **_process_identity(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(Path(d) / MARK, json.dumps(record, indent=2) + "\n")


def read_mark(d: Path) -> Optional[dict]:
    """The mark of ``d``, or None when it has none (or an unreadable one: then it is not ours either)."""
    try:
        rec = json.loads((Path(d) / MARK).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == TOOL else None


def is_ours(d: Path, kinds: Optional[Iterable[str]] = None) -> bool:
    """True when ``d`` is a real directory (not a link) that carries our mark, of one of ``kinds`` if given."""
    d = Path(d)
    if d.is_symlink() or not d.is_dir():
        return False
    rec = read_mark(d)
    return rec is not None and (kinds is None or rec.get("kind") in set(kinds))


def process_alive(rec: dict) -> bool:
    """Whether the process a mark or lock record names still runs (on this host; another host's: assumed alive)."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if rec.get("started") is None:
        return True
    now = _process_identity(pid).get("started")
    return now is None or abs(now - rec["started"]) < 1.0


# ---- where output may go, and what may be replaced ------------------------------------------------------------
def _protected(extra: Iterable[Path]) -> list[tuple[Path, str]]:
    out = [(Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "the home directory")]
    return out + [(Path(p).expanduser().resolve(), f"the source {p}") for p in extra]


def check_not_protected(out: Path, protect: Iterable[Path] = (), flag: str = "output") -> None:
    """Refuse an output that is, or holds, a protected path (source, current or home directory, ``/``)."""
    o = Path(out).expanduser().resolve()
    if o == Path(o.anchor):
        raise UpcycleError(f"{flag} {out} is the file system root; choose a new directory for the output.")
    for p, name in _protected(protect):
        if o == p or o in p.parents:
            what = "is" if o == p else "holds"
            raise UpcycleError(f"{flag} {out} {what} {name}; it is never replaced: choose a new directory for the "
                               "output.")


def check_replaceable(out: Path, kinds: Iterable[str], protect: Iterable[Path] = (), flag: str = "output",
                      legacy: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse to replace ``out`` unless nemo-upcycle made it (its mark, or ``legacy(out)`` for outputs written before
    marks existed) or it is empty, and it is not, and does not hold, a protected path."""
    out = Path(out).expanduser()
    check_not_protected(out, protect, flag)
    if out.is_symlink() or not out.is_dir():
        raise UpcycleError(f"{flag} {out} exists and is not a directory; remove it yourself or choose another output.")
    if is_ours(out, kinds) or not any(out.iterdir()) or (legacy is not None and legacy(out)):
        return
    raise UpcycleError(f"{flag} {out} holds files nemo-upcycle did not write (no {MARK} mark); it is never replaced: "
                       "choose another output, or move that directory away yourself.")


def remove_ours(d: Path, kinds: Optional[Iterable[str]] = None,
                legacy: Optional[Callable[[Path], bool]] = None) -> None:
    """Remove directory ``d`` if nemo-upcycle made it; anything else is refused (never deleted)."""
    d = Path(d)
    if not d.exists() and not d.is_symlink():
        return
    check_not_protected(d, (), "directory")
    if not (is_ours(d, kinds) or (legacy is not None and not d.is_symlink() and d.is_dir() and legacy(d))):
        raise UpcycleError(f"{d} was not made by nemo-upcycle (no {MARK} mark); it is left as it is: move it away "
                           "yourself or choose another location.")
    shutil.rmtree(d)


# ---- atomic writes and write errors ---------------------------------------------------------------------------
@contextlib.contextmanager
def write_errors(where: Path, needed_bytes: Optional[int] = None) -> Iterator[None]:
    """Turn a full disk or a read-only location into one line that names the path and the space needed."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(where)
            need = f"{needed_bytes / 2**30:.2f} GiB needed, " if needed_bytes else ""
            raise UpcycleError(f"the disk under {where} is full ({need}{free / 2**30:.2f} GiB free now); free space or "
                               "choose another output.") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UpcycleError(f"cannot write under {where}: {e.strerror}; choose a writable output "
                               "location.") from None
        raise


def _free_bytes(where: Path) -> int:
    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def check_writable(d: Path, needed_bytes: int = 0, margin: int = 64 << 20, flag: str = "output") -> None:
    """Refuse, before any work, a parent directory that is missing, read-only or without the space needed."""
    d = Path(d)
    if not d.is_dir():
        raise UpcycleError(f"the {flag}'s parent directory {d} does not exist; create it first.")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UpcycleError(f"cannot write under {d} (read-only or no permission); choose a writable {flag} location.")
    free = _free_bytes(d)
    if free < needed_bytes + margin:
        raise UpcycleError(f"not enough disk under {d}: the {flag} needs {needed_bytes / 2**30:.2f} GiB, "
                           f"{free / 2**30:.2f} GiB are free; free space or choose another location.")


@contextlib.contextmanager
def atomic_path(path: Path, needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to (any writer: text, JSON, a plot's ``savefig``); renamed to
    ``path`` when the block ends, removed if it fails: ``path`` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with write_errors(path.parent, needed_bytes):
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name in the same directory and a rename (never half-written)."""
    with atomic_path(path, len(text)) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, record) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")


# ---- staging directories ----------------------------------------------------------------------------------------
class Terminated(SystemExit):
    """SIGTERM / SIGHUP inside a ``staging`` block: raised so that the cleanup runs; exits with 128 + signal."""


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While open (main thread only), SIGTERM and SIGHUP raise ``Terminated`` (SIGINT raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def sweep_stale(out: Path) -> list[Path]:
    """Remove staging / replaced directories of ``out`` left by processes of ours that are gone; return them."""
    removed = []
    for d in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        rec = read_mark(d)
        if rec is not None and rec.get("kind") in ("staging", "replaced") and not process_alive(rec):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def staging(out: Path, needed_bytes: int = 0) -> Iterator[Path]:
    """A marked temporary directory next to ``out`` to write into; removed on any failure or signal.

    Stale staging directories of ``out`` whose process is gone are swept first. Put it in place with ``publish``.
    """
    out = Path(out)
    sweep_stale(out)
    tmp = staging_path(out)
    if tmp.exists():
        remove_ours(tmp, ("staging",))
    with write_errors(out.parent, needed_bytes):
        tmp.mkdir()
        write_mark(tmp, "staging", target=str(out))
    try:
        with signals_as_exceptions(), write_errors(out.parent, needed_bytes):
            yield tmp
    except BaseException:
        if is_ours(tmp):  # any kind: publish re-marks it (convert, export, ...) before its renames, which may fail
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, kind: str, kinds: Iterable[str] = (), protect: Iterable[Path] = (),
            legacy: Optional[Callable[[Path], bool]] = None, **info) -> None:
    """Rename the finished staging directory onto ``out`` (marked ``kind``). An existing ``out`` is checked again with
    ``check_replaceable`` (``kinds``) right before, moved aside, and removed only after the new one is in place."""
    exists = out.exists() or out.is_symlink()
    if exists:
        check_replaceable(out, tuple(kinds) or (kind,), protect, legacy=legacy)
    write_mark(tmp, kind, **info)
    old = None
    if exists:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            remove_ours(old, ("replaced",))
        prev = (out / MARK).read_bytes() if (out / MARK).is_file() else None
        out.rename(old)
        write_mark(old, "replaced", target=str(out))
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:  # put the previous output back, with its own mark: a failed replace must not lose it
            if prev is None:
                (old / MARK).unlink()
            else:
                (old / MARK).write_bytes(prev)
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- locks ------------------------------------------------------------------------------------------------------
class FileLock:
    """An exclusive ``flock`` on a lock file, released by the kernel if the holder dies (never stuck), and removed
    when released. After the lock is taken, the path must still name the locked file (a holder removes it when
    done; a waiter that locked the removed file tries again), so removing it never lets two holders in at once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; with ``wait=False`` return False at once if another process holds it."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            st = os.fstat(fd)
            if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_process_identity()) + "\n").encode())
        self._fd = fd
        return True

    def holder(self) -> Optional[dict]:
        """The process recorded by the current holder (or the last one), if readable."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
