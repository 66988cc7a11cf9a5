"""Real tiny-recipe processes: one training run per directory, resuming past a damaged checkpoint, and compare's
training processes dying with it.

  * run A (``python train.py --config-name=tiny_llama_upcycle``, checkpoints every 2 steps) holds its directory:
    run B on the same ``hydra.run.dir`` is refused in one line (exit 2, before NeMo is imported) while A lives;
  * A is killed with SIGKILL (its pid only, as a user would): the lock is not stuck, run C on the directory
    proceeds; the newest checkpoint was truncated first: C warns, naming the file, resumes from the newest
    complete checkpoint, lists every step once in metrics.jsonl; the damaged checkpoint is left byte for byte;
    C's export replaces the old export of ours in ``hf_mixtral/``;
  * a copy of the run whose checkpoints are all damaged is refused in one line;
  * ``nemo-upcycle compare`` killed with SIGKILL takes its training process with it (and a live one is found
    while compare lives: the check can fail).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nemo_upcycle.apps.compare import TRAIN_MODULE
from nemo_upcycle.apps.run_dir import LOCK, checkpoint_problem, nemo_pick
from nemo_upcycle.system.files import read_mark, write_mark

pytestmark = pytest.mark.slow  # two NeMo training processes

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _cmd(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "train.py", "--config-name=tiny_llama_upcycle", f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=2", f"hydra.run.dir={run_dir}"]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            out.append(rec["step"])
    return out


def _one_error(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    run = base / "run"
    r: dict = {"run": run}
    with open(base / "a.log", "w") as log:
        a = subprocess.Popen(_cmd(run, 40), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and a.poll() is None and max(_steps(run), default=0) < 5:
                time.sleep(0.2)
            r["lock_holder"] = json.loads((run / LOCK).read_text())
            r["mark"] = read_mark(run)
            t0 = time.perf_counter()
            r["b"] = subprocess.run(_cmd(run, 40), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
            r["b_seconds"] = time.perf_counter() - t0
            r["a_alive_after_b"] = a.poll() is None
            r["a_pid"] = a.pid
        finally:
            a.send_signal(signal.SIGKILL)
            a.wait()
    ckdir = run / "run" / "checkpoints"
    newest = nemo_pick(ckdir).resolve()
    r["bad_file"] = bad = sorted((newest / "weights").glob("*.distcp"))[-1]
    bad.write_bytes(bad.read_bytes()[:1000])
    r["bad_bytes"], r["newest"] = bad.read_bytes(), newest
    old = run / "hf_mixtral"  # an export of ours from an earlier run: replaced by C's
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"trained": {"exported_from": "megatron-core GPTModel"}}))
    write_mark(old, "export")
    (old / "old.txt").write_text("old")
    r["c"] = subprocess.run(_cmd(run, 12), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
    return r


def test_second_run_on_a_held_directory_is_refused_in_one_line(runs):
    a_pid = runs["a_pid"]
    assert runs["lock_holder"]["pid"] == a_pid and runs["mark"]["kind"] == "train-run" and runs["mark"]["pid"] == a_pid
    line = _one_error(runs["b"])
    assert f"is in use by another training run (pid {a_pid} on " in line and "hydra.run.dir" in line
    assert runs["a_alive_after_b"]  # the refusal met a live holder (not a run that had already ended)
    assert runs["b_seconds"] < 60  # refused in train.py's precheck, before NeMo is imported


def test_killed_run_leaves_no_stuck_lock_and_a_damaged_checkpoint_is_passed_over(runs):
    c, run = runs["c"], runs["run"]
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-3000:]
    warn = [ln for ln in c.stderr.splitlines() if ln.startswith("warning: checkpoint")]
    assert len(warn) == 1 and str(runs["bad_file"]) in warn[0] and "1,000 bytes" in warn[0], c.stderr[-3000:]
    good = warn[0].split("resuming from ")[1].split(",")[0]
    assert (run / "run" / "checkpoints" / good).is_dir() and good != runs["newest"].name
    assert f"Restoring states from the checkpoint path at {run / 'run' / 'checkpoints' / good}" in c.stdout + c.stderr
    assert _steps(run) == list(range(1, 13))  # every step once: resumed, the killed run's later records dropped
    assert runs["bad_file"].read_bytes() == runs["bad_bytes"]  # the damaged checkpoint is left as it was
    assert checkpoint_problem(runs["newest"]) is not None
    assert not (run / LOCK).exists() and read_mark(run)["pid"] == runs["a_pid"]  # released at exit; A's mark kept
    hf = run / "hf_mixtral"
    assert not (hf / "old.txt").exists() and "trained" in json.loads((hf / "config.json").read_text())


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_in_one_line(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["run"], copy, symlinks=True)
    for common in (copy / "run" / "checkpoints").glob("*/weights/common.pt"):
        common.write_bytes(b"")
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    line = _one_error(subprocess.run(_cmd(copy, 14), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300))
    assert "cannot be resumed" in line and "common.pt is missing or unreadable" in line and "move" in line
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_compare_killed_with_sigkill_takes_its_training_process_with_it(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "nemo_upcycle.apps.cli", "compare", "--config-name=tiny_llama_upcycle", "--variants",
           "copy", "--steps", "30", "--out", str(out)]
    parent = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and parent.poll() is None and child is None:
            kids = [k for k in psutil.Process(parent.pid).children() if TRAIN_MODULE in " ".join(k.cmdline())]
            child = kids[0] if kids else None
            time.sleep(0.1)
        assert child is not None, "compare started no training process"
        time.sleep(2)
        assert not _gone(child.pid)  # negative control: while compare lives, its training runs
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and not _gone(child.pid):
        time.sleep(0.1)
    assert _gone(child.pid), f"training process {child.pid} outlived compare"
