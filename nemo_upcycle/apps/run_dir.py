"""A training run directory: written by one run at a time, marked as ours, resumed only from a complete checkpoint.

- ``claim``: global rank 0 holds ``RUN/.nemo-upcycle.lock`` (``system.files.FileLock``) until it exits; a second run
  on the directory is refused in one line. ``write_run_identity``, when training starts, writes the run's identity
  and the mark ``train-run`` (unless the directory has one, e.g. ``compare-run``).
- ``check_contents`` refuses a non-empty directory nemo-upcycle did not write (no mark, no ``.hydra/`` or
  ``run_identity.json`` of an older run); ``check_export_target``: ``RUN/hf_mixtral`` is replaced only if ours.
- ``checkpoint_problem`` / ``resume_checkpoint``: the checkpoint NeMo's ``AutoResume`` would pick (the newest
  ``*-last``) is checked from its own records without importing NeMo (``weights/.metadata``: every storage item's
  file and extent; ``metadata.json``; ``common.pt``'s zip CRCs; ``context/``). A damaged one is never deleted: the
  newest complete one is resumed with a warning naming the bad file, or the run is refused.
- ``die_with_parent``: the processes ``compare`` starts, and theirs, die with it (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pickle
import re
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.moe_dir import export_problem
from nemo_upcycle.system import files, launcher

LOCK = files.MARK + ".lock"
CHECKPOINTS = Path("run") / "checkpoints"
PARENT_ENV = "NEMO_UPCYCLE_PARENT"
_HELD: dict[str, files.FileLock] = {}


# ---- one run at a time ------------------------------------------------------------------------------------------
def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    when = time.strftime(" since %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{when}"


def claim(run_dir: Path) -> None:
    """Rank 0: hold ``run_dir``'s lock until this process exits; refuse if another process holds it.
    A directory that does not exist yet is left alone (``start`` claims it once Hydra has made it)."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if not launcher.is_rank0() or key in _HELD or not run_dir.is_dir():
        return
    check_contents(run_dir)
    lock = files.FileLock(run_dir / LOCK)
    if not lock.acquire(wait=False):
        raise UpcycleError(f"run directory {run_dir} is in use by another training run ({describe(lock.holder())}); "
                           "wait for it to finish or stop it, or choose another hydra.run.dir.")
    if not _HELD:
        atexit.register(release_all)
    _HELD[key] = lock


def release_all() -> None:
    while _HELD:
        _HELD.popitem()[1].release()


def holder(run_dir: Path) -> Optional[dict]:
    """The process holding ``run_dir``'s lock (a running training run), or None when no process holds it."""
    if not Path(run_dir).is_dir():
        return None
    lock = files.FileLock(Path(run_dir) / LOCK)
    try:
        if lock.acquire(wait=False):
            lock.release()
            return None
    except OSError:  # cannot even open the lock file (read-only): nobody can be training there
        return None
    return lock.holder() or {}


# ---- what may be written or replaced ----------------------------------------------------------------------------
def legacy_run_dir(d: Path) -> bool:
    """A run directory written before marks existed: Hydra's ``.hydra/`` or our ``run_identity.json``."""
    return (d / ".hydra").is_dir() or (d / "run_identity.json").is_file()


def check_contents(run_dir: Path) -> None:
    """Refuse a non-empty ``hydra.run.dir`` that nemo-upcycle did not write (nothing in it is touched)."""
    d = Path(run_dir)
    if not d.exists() and not d.is_symlink():
        return
    if not d.is_dir():
        raise UpcycleError(f"hydra.run.dir {d} exists and is not a directory; choose a new hydra.run.dir.")
    if files.is_ours(d) or legacy_run_dir(d) or not [p for p in d.iterdir() if p.name != LOCK]:
        return
    raise UpcycleError(f"hydra.run.dir {d} holds files nemo-upcycle did not write (no {files.MARK} mark); training "
                       "writes and replaces files there: choose a new or empty hydra.run.dir.")


def check_export_target(run_dir: Path) -> None:
    problem = export_problem(run_dir)
    if problem is not None:
        raise UpcycleError(f"{problem}; the export at the end of training would replace it: move it away, set "
                           "logging.export_hf=false, or choose another hydra.run.dir.")


# ---- checkpoints ------------------------------------------------------------------------------------------------
class _Stub:
    """Stands for every class in a checkpoint's ``.metadata`` pickle: its fields are read, no code runs."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                self.__dict__.update(part)


class _MetadataReader(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("builtins", "collections", "copyreg", "_codecs"):
            return super().find_class(module, name)
        return _Stub


def storage_ends(weights: Path) -> dict[str, int]:
    """file name -> bytes it must hold, from torch.distributed.checkpoint's ``.metadata`` (offset + length of each
    storage item); raises on an unreadable index."""
    with open(weights / ".metadata", "rb") as f:
        meta = _MetadataReader(f).load()
    ends: dict[str, int] = {}
    for item in getattr(meta, "storage_data", {}).values():
        rel, end = item.relative_path, int(item.offset) + int(item.length)
        ends[rel] = max(ends.get(rel, 0), end)
    if not ends:
        raise ValueError("no storage items")
    return ends


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """None for a complete NeMo 2 distributed checkpoint directory, else which file is damaged or missing."""
    w = Path(ckpt) / "weights"
    if not w.is_dir():
        return f"{w} is missing"
    try:
        backend = json.loads((w / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return f"{w / 'metadata.json'} is missing or unreadable"
    try:
        with zipfile.ZipFile(w / "common.pt") as z:
            bad = z.testzip()
        if bad is not None:
            return f"{w / 'common.pt'} is damaged (member {bad})"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{w / 'common.pt'} is missing or unreadable ({e.__class__.__name__})"
    if backend == "torch_dist":
        try:
            ends = storage_ends(w)
        except Exception as e:  # noqa: BLE001 -- any failure to read the index means the checkpoint is unusable
            return f"{w / '.metadata'} is missing or unreadable ({e.__class__.__name__})"
        for rel, end in sorted(ends.items()):
            f = w / rel
            size = f.stat().st_size if f.is_file() else None
            if size is None:
                return f"{f} is missing"
            if size < end:
                return f"{f} is {size:,} bytes, {end:,} expected (truncated)"
    if not (Path(ckpt) / "context").is_dir():
        return f"{Path(ckpt) / 'context'} is missing"
    return None


def _unfinished(d: Path) -> bool:
    """NeMo's marker of a checkpoint being written (``<checkpoint>-unfinished``), on the name or on its target."""
    return Path(f"{d}-unfinished").exists() or Path(f"{d.resolve()}-unfinished").exists()


def _step(d: Path) -> int:
    m = re.search(r"step=(\d+)", d.name)
    return int(m.group(1)) if m else -1


def nemo_pick(ckdir: Path) -> Optional[Path]:
    """The checkpoint NeMo 2.7.3's ``AutoResume`` resumes (nemo/lightning/resume.py ``_find_trainer_ckpt_path``):
    of the finished ``*last`` directories (links), the one with the latest modification time."""
    last = [d for d in ckdir.glob("*") if d.is_dir() and d.match("*last") and not _unfinished(d)]
    return max(last, key=lambda d: d.lstat().st_mtime) if last else None


def resume_checkpoint(run_dir: Path, warn: bool = False) -> Optional[Path]:
    """The checkpoint to resume when NeMo's own pick is damaged (None: no checkpoint, or NeMo's pick is complete).

    Raises ``UpcycleError`` when no checkpoint of the run is complete. Nothing is deleted."""
    ckdir = Path(run_dir) / CHECKPOINTS
    pick = nemo_pick(ckdir) if ckdir.is_dir() else None
    if pick is None:
        return None
    bad = pick.resolve()
    problem = checkpoint_problem(bad)  # named by its real path (the pick is usually a link)
    if problem is None:
        return None
    seen, others = {bad}, []
    for d in sorted(ckdir.glob("step=*"), key=lambda d: (_step(d), d.lstat().st_mtime), reverse=True):
        real = d.resolve()
        if real in seen or not real.is_dir() or _unfinished(d) or _step(d) < 0:
            continue
        seen.add(real)
        others.append(real)
    good = next((d for d in others if checkpoint_problem(d) is None), None)
    name = pick.name if pick.resolve() == pick else f"{pick.name} (-> {bad.name})"
    if good is None:
        raise UpcycleError(f"checkpoint {ckdir / name} cannot be resumed: {problem}, and no earlier checkpoint in "
                           f"{ckdir} is complete; move {ckdir} away to start this run again (nothing was deleted), "
                           "or choose a new hydra.run.dir.")
    if warn and launcher.is_rank0():
        print(f"warning: checkpoint {ckdir / name} is damaged: {problem}; resuming from {good.name}, the newest "
              f"complete checkpoint (the damaged one is left as it is: remove it yourself once you no longer need it)",
              file=sys.stderr, flush=True)
    return good


# ---- children die with their parent -----------------------------------------------------------------------------
_LIBC: list = []


def _libc():
    """The C library (loaded once, before any fork: a ``preexec_fn`` only calls it), or None off Linux."""
    if not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
    return _LIBC[0]


def _prctl_pdeathsig(sig: int) -> bool:
    libc = _libc()
    return libc is not None and libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a child (``preexec_fn``, or first thing at start): be killed when ``parent`` dies, including if it already
    has (then this process is no longer its child). Fit for a ``preexec_fn``: one call into the C library loaded
    before the fork, the environment untouched."""
    if _prctl_pdeathsig(signal.SIGKILL) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def child_preexec():
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child die with this process."""
    parent = os.getpid()
    _libc()  # loaded here, not in the child
    return lambda: die_with_parent(parent)


def child_env() -> dict:
    """The environment for a child of this process: it and the processes it starts die with their parents."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def die_with_parent_if_asked() -> None:
    """``train.py``: when started by ``compare`` (or by a process it started), die with that parent; the processes
    this one starts with the environment (e.g. Lightning's per-device processes) then die with this one."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent))
        os.environ[PARENT_ENV] = str(os.getpid())


def stop(p, grace: float = 10.0) -> None:
    """Stop a child started with ``start_new_session=True`` and everything it started: SIGTERM to its process
    group, ``grace`` seconds, then SIGKILL to whatever of the group is left."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


# ---- whose checkpoints these are ------------------------------------------------------------------------------
IDENTITY_FILE = "run_identity.json"
IDENTITY_GROUPS = ("model", "moe", "upcycle", "data", "parallel")


def run_identity(run: RunConfig) -> dict:
    """What makes a run's checkpoints this run's: the model, MoE, upcycling, data and layout (dotted keys).
    Trainer, optimizer and logging keys may change between restarts (e.g. more steps)."""
    flat = {"seed": run.seed}
    for group in IDENTITY_GROUPS:
        for k, v in dataclasses.asdict(getattr(run, group)).items():
            flat[f"{group}.{k}"] = v
    return json.loads(json.dumps(flat, default=str))


def check_run_dir(run: RunConfig, out_dir: Path) -> None:
    """Refuse, before training and with nothing there touched: a directory nemo-upcycle did not write, one holding
    another run's checkpoints, one whose checkpoints are all damaged, one whose ``hf_mixtral/`` the export at the end
    would replace but is not ours (``run_dir``)."""
    check_contents(out_dir)
    if run.logging.export_hf and run.moe.num_moe_experts:
        check_export_target(out_dir)
    ckpts = out_dir / "run" / "checkpoints"
    if not (ckpts.is_dir() and any(ckpts.iterdir())):
        return
    ident = out_dir / IDENTITY_FILE
    fix = "choose a new hydra.run.dir, or delete that directory to start over"
    if not ident.is_file():
        raise UpcycleError(f"run directory {out_dir} holds checkpoints of an unknown run (no {IDENTITY_FILE}); {fix}.")
    try:
        old = json.loads(ident.read_text())
    except (OSError, json.JSONDecodeError):
        raise UpcycleError(f"{ident} is unreadable, so the checkpoints in {out_dir} cannot be matched to this run; "
                           f"{fix}.") from None
    new = run_identity(run)
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in diff[:3])
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UpcycleError(f"run directory {out_dir} holds checkpoints of another run ({shown}{more}); {fix}.")
    resume_checkpoint(out_dir)  # refuses when no checkpoint is complete (the warning comes when training starts)


def write_run_identity(run: RunConfig, out_dir: Path) -> None:
    """When training really starts (rank 0): the run's identity, and the ``train-run`` mark unless the directory has
    a mark (compare's ``compare-run`` stays). A run refused before this leaves neither."""
    files.atomic_write_json(out_dir / IDENTITY_FILE, run_identity(run))
    if files.read_mark(out_dir) is None:
        files.write_mark(out_dir, "train-run")
