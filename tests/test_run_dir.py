"""A run directory belongs to one run: train.py refuses one holding another run's checkpoints (one line, exit 2,
nothing there touched), accepts its own (resume), and a resumed run's metrics.jsonl drops the killed run's
records past the checkpoint it resumes from. Also (``run_dir``): a directory or an ``hf_mixtral/`` nemo-upcycle did
not write is refused and never replaced (the lifecycle skips such an export), a directory another process holds is
refused and a killed holder leaves no stuck lock, a damaged checkpoint is named by file and passed over for the
newest complete one (or the run refused), and processes started for a run die with their parent.
Real training processes: tests/test_resume_safety.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.apps.run_dir import check_run_dir, run_identity, write_run_identity
from nemo_upcycle.config.compose import compose
from nemo_upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _fake_checkpoint(run_dir: Path) -> Path:
    """A run directory (Hydra's .hydra/, as every one train.py made) holding a complete checkpoint."""
    import warnings

    (run_dir / ".hydra").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _checkpoint(run_dir / "run" / "checkpoints", "step=3-last")


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in d.rglob("*") if p.is_file()}


def test_own_checkpoints_are_accepted_and_a_changed_model_is_refused(tmp_path):
    run = compose("tiny_llama_upcycle", ["mode=train"])
    _fake_checkpoint(tmp_path)
    write_run_identity(run, tmp_path)
    check_run_dir(run, tmp_path)  # same run: resume
    check_run_dir(compose("tiny_llama_upcycle", ["mode=train", "trainer.max_steps=8"]), tmp_path)  # more steps: fine
    other = compose("tiny_llama_upcycle", ["mode=train", "moe.num_moe_experts=8"])
    with pytest.raises(UpcycleError, match=r"another run \(moe.num_moe_experts=4 there, 8 here\)"):
        check_run_dir(other, tmp_path)


def test_checkpoints_without_identity_are_refused(tmp_path):
    _fake_checkpoint(tmp_path)
    with pytest.raises(UpcycleError, match="unknown run"):
        check_run_dir(compose("tiny_llama_upcycle", ["mode=train"]), tmp_path)
    empty = tmp_path / "fresh"
    check_run_dir(compose("tiny_llama_upcycle", ["mode=train"]), empty)  # nothing there: fine


def test_identity_ignores_trainer_and_optim_but_not_data():
    a = run_identity(compose("tiny_llama_upcycle", ["mode=train"]))
    assert a == run_identity(compose("tiny_llama_upcycle", ["mode=train", "trainer.max_steps=99", "optim.lr=1e-3"]))
    assert a != run_identity(compose("tiny_llama_upcycle", ["mode=train", "data.seq_length=64"]))


def test_train_py_refuses_another_runs_directory_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "r"
    _fake_checkpoint(run_dir)
    write_run_identity(compose("tiny_llama_upcycle", ["mode=train", "upcycle=granular_g2"]), run_dir)
    before = _snapshot(run_dir)
    p = subprocess.run([sys.executable, "train.py", "--config-name=tiny_llama_upcycle", "mode=train",
                        f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert (len(lines) == 1 and lines[0].startswith("error: run directory")
            and "upcycle.granularity=2 there, 1 here" in lines[0])
    assert _snapshot(run_dir) == before


def test_truncate_metrics_drops_records_past_the_resume_step(tmp_path):
    from nemo_upcycle.engine.lifecycle import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "val_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "lo')  # a line cut by the kill
    assert truncate_metrics(path, 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4]
    assert truncate_metrics(path, 4) == 0  # idempotent


# ---- whose directory it is: foreign run directories and hf_mixtral/ are refused, ours accepted -------------------


def _user_dir(path: Path, name: str = "notes.txt") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text("a user's file")
    return path


def test_foreign_run_dir_is_refused_and_ours_or_empty_accepted(tmp_path):
    from nemo_upcycle.apps.run_dir import LOCK, check_contents
    from nemo_upcycle.system.files import write_mark

    user = _user_dir(tmp_path / "user")
    with pytest.raises(UpcycleError, match="holds files nemo-upcycle did not write"):
        check_contents(user)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UpcycleError, match="is not a directory"):
        check_contents(tmp_path / "f")
    # negative controls: absent, empty (a lock file alone counts as empty), marked, or written before marks existed
    check_contents(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK).write_text("")
    check_contents(tmp_path / "empty")
    write_mark(user, "train-run")
    check_contents(user)
    legacy = _user_dir(tmp_path / "legacy")
    (legacy / ".hydra").mkdir()
    check_contents(legacy)


def _hydra_run_dir(path: Path) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("mode: train\n")
    return path


def _tree(d: Path) -> dict:
    """Every path under ``d`` with its bytes (None for a directory): what must survive byte for byte."""
    return {str(p.relative_to(d)): None if p.is_dir() else p.read_bytes() for p in d.rglob("*")}


def test_train_py_refuses_a_foreign_run_dir_and_a_foreign_hf_mixtral_touching_nothing(tmp_path):
    user = _user_dir(tmp_path / "user")
    run_dir = _hydra_run_dir(tmp_path / "r")
    _user_dir(run_dir / "hf_mixtral", "my_model.bin")
    for d, words in ((user, f"hydra.run.dir {user} holds files nemo-upcycle did not write"),
                     (run_dir, "hf_mixtral holds files nemo-upcycle did not write")):
        before = _tree(d)
        p = subprocess.run([sys.executable, "train.py", "--config-name=tiny_llama_upcycle", f"hydra.run.dir={d}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
        assert _tree(d) == before
    assert "logging.export_hf=false" in lines[0]


def test_hf_mixtral_of_ours_is_accepted(tmp_path):
    from nemo_upcycle.apps.run_dir import check_export_target
    from nemo_upcycle.formats.moe_dir import export_problem
    from nemo_upcycle.system.files import write_mark

    run_dir = _hydra_run_dir(tmp_path / "r")
    hf = _user_dir(run_dir / "hf_mixtral", "model.safetensors")
    with pytest.raises(UpcycleError, match="hf_mixtral holds files"):
        check_export_target(run_dir)
    check_run_dir(compose("tiny_llama_upcycle", ["mode=train", "logging.export_hf=false"]), run_dir)  # no export
    (hf / "config.json").write_text(json.dumps({"trained": {"exported_from": "megatron-core GPTModel"}}))
    assert export_problem(run_dir) is None  # an export written before marks existed
    (hf / "config.json").unlink()
    write_mark(hf, "export")
    assert export_problem(run_dir) is None
    check_run_dir(compose("tiny_llama_upcycle", ["mode=train"]), run_dir)


def test_lifecycle_never_passes_a_foreign_hf_mixtral_to_the_export(tmp_path, monkeypatch):
    """on_train_end with a fake export module: a foreign hf_mixtral/ is skipped with a note, ours is replaced."""
    import types

    from nemo_upcycle.engine.lifecycle import UpcycleLifecycle
    from nemo_upcycle.system.files import write_mark

    calls = []
    fake = types.ModuleType("nemo_upcycle.engine.export")
    fake.unwrap = lambda m: m
    fake.export_hf_mixtral = lambda module, config, out, **kw: calls.append((out, kw["overwrite"])) or out
    monkeypatch.setitem(sys.modules, "nemo_upcycle.engine.export", fake)
    trainer = types.SimpleNamespace(global_step=3)
    module = types.SimpleNamespace(module=None, config=types.SimpleNamespace(num_moe_experts=4))
    hf = _user_dir(tmp_path / "hf_mixtral", "my_model.bin")
    cb = UpcycleLifecycle(str(tmp_path), eval_windows=0, dense_source=None)
    cb.on_train_end(trainer, module)
    rec = json.loads((tmp_path / "final_eval.json").read_text())
    assert calls == [] and rec["hf_mixtral"] is None and "did not write" in rec["export_skipped"]
    assert (hf / "my_model.bin").read_text() == "a user's file"
    write_mark(hf, "export")  # negative control: our own export is replaced
    cb.on_train_end(trainer, module)
    assert calls == [(hf, True)] and json.loads((tmp_path / "final_eval.json").read_text())["hf_mixtral"] == str(hf)


# ---- one run at a time: the run directory's lock -------------------------------------------------------------------


def test_a_held_run_dir_is_refused_and_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    from nemo_upcycle.apps import run_dir as rd

    d = tmp_path / "r"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nemo_upcycle.apps.run_dir import claim; "
                               f"claim({str(d)!r}); print('held', flush=True); time.sleep(300)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UpcycleError, match=rf"is in use by another training run \(pid {holder.pid} on "):
            rd.claim(d)
        assert rd.holder(d)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert (d / rd.LOCK).exists()  # SIGKILL: no cleanup ran, the file stays, the flock went with the process
    assert rd.holder(d) is None
    rd.claim(d)  # negative control: the same call now succeeds
    assert str(d.resolve()) in rd._HELD
    rd.release_all()
    assert not (d / rd.LOCK).exists()  # released: the lock file is removed


# ---- resume only from a complete checkpoint -------------------------------------------------------------------------


def _checkpoint(ckdir: Path, name: str) -> Path:
    """A NeMo-2-shaped distributed checkpoint written by torch.distributed.checkpoint itself (one process)."""
    import torch
    import torch.distributed.checkpoint as dcp

    ck = ckdir / name
    (ck / "context").mkdir(parents=True)
    (ck / "context" / "io.json").write_text("{}")
    dcp.save({"a": torch.arange(1000.0), "b": torch.ones(50, 3)}, checkpoint_id=str(ck / "weights"))
    (ck / "weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"optimizer": {"step": 3}}, ck / "weights" / "common.pt")
    return ck


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    import warnings

    ckdir = tmp_path_factory.mktemp("ck") / "run" / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _checkpoint(ckdir, "step=1")
        _checkpoint(ckdir, "step=3")
    (ckdir / "step=3-last").symlink_to("step=3")
    return ckdir


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("damage, words", [
    ("truncate distcp", "__0_0.distcp is 100 bytes, 7,698 expected (truncated)"),
    ("truncate .metadata", ".metadata is missing or unreadable"),
    ("truncate common.pt", "common.pt is missing or unreadable"),
    ("remove metadata.json", "metadata.json is missing or unreadable"),
    ("remove context", "context is missing"),
])
def test_checkpoint_problem_names_the_damaged_file(checkpoint_dir, tmp_path, damage, words):
    from nemo_upcycle.apps.run_dir import checkpoint_problem

    ck = _copy_tree(checkpoint_dir / "step=1", tmp_path / "step=1")
    assert checkpoint_problem(ck) is None  # negative control: the intact checkpoint passes
    w = ck / "weights"
    if damage == "truncate distcp":
        _truncate(w / "__0_0.distcp", 100)
    elif damage == "truncate .metadata":
        _truncate(w / ".metadata", 200)
    elif damage == "truncate common.pt":
        _truncate(w / "common.pt", 300)
    elif damage == "remove metadata.json":
        (w / "metadata.json").unlink()
    else:
        import shutil

        shutil.rmtree(ck / "context")
    problem = checkpoint_problem(ck)
    assert problem is not None and words in problem, problem


def test_resume_falls_back_to_the_newest_complete_checkpoint_or_refuses(checkpoint_dir, tmp_path, capsys):
    from nemo_upcycle.apps.run_dir import resume_checkpoint

    run = tmp_path / "r"
    _copy_tree(checkpoint_dir, run / "run" / "checkpoints")
    ckdir = run / "run" / "checkpoints"
    assert resume_checkpoint(run, warn=True) is None  # negative control: NeMo's own pick (step=3-last) is complete
    assert capsys.readouterr().err == ""
    bad = ckdir / "step=3" / "weights" / "__0_1.distcp"
    bad = bad if bad.exists() else ckdir / "step=3" / "weights" / "__0_0.distcp"
    _truncate(bad, 10)
    damaged = bad.read_bytes()
    assert resume_checkpoint(run, warn=True) == (ckdir / "step=1").resolve()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("warning: checkpoint") and bad.name in err and "step=1" in err
    _truncate(ckdir / "step=1" / "weights" / "common.pt", 10)
    with pytest.raises(UpcycleError) as e:
        resume_checkpoint(run)
    assert "cannot be resumed" in str(e.value) and bad.name in str(e.value) and "move" in str(e.value)
    assert bad.read_bytes() == damaged and (ckdir / "step=3-last").is_symlink()  # nothing deleted or changed
    # train.py's precheck refuses it in one line before training (check_run_dir)
    write_run_identity(compose("tiny_llama_upcycle", ["mode=train"]), run)
    with pytest.raises(UpcycleError, match="cannot be resumed"):
        check_run_dir(compose("tiny_llama_upcycle", ["mode=train"]), run)


# ---- processes started for a run die with their parent ------------------------------------------------------------
MID = """
import os, subprocess, sys, time
from nemo_upcycle.apps.run_dir import die_with_parent_if_asked
die_with_parent_if_asked()
leaf = subprocess.Popen([sys.executable, "-c",
                         "import time; from nemo_upcycle.apps.run_dir import die_with_parent_if_asked;"
                         " die_with_parent_if_asked(); time.sleep(300)"])
print(leaf.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    import time

    deadline = time.time() + seconds
    while time.time() < deadline and _alive(pid):
        time.sleep(0.05)
    return not _alive(pid)


def test_the_processes_a_child_starts_die_with_it(tmp_path):
    """train.py started by compare passes the request on: Lightning's per-device processes die with train.py."""
    from nemo_upcycle.apps.run_dir import PARENT_ENV, child_env

    mid = subprocess.Popen([sys.executable, "-c", MID], cwd=REPO, env={**ENV, **child_env()}, stdout=subprocess.PIPE,
                           text=True)
    try:
        leaf = int(mid.stdout.readline())
        import time

        time.sleep(1.0)
        assert _alive(leaf)  # negative control: with its parent alive, the leaf runs
    finally:
        mid.kill()
        mid.wait()
    assert _wait_gone(leaf), f"process {leaf} outlived its parent"
    # a process whose named parent is already gone (it was re-parented) dies at once
    late = subprocess.Popen([sys.executable, "-c", "import time; from nemo_upcycle.apps.run_dir import "
                             "die_with_parent_if_asked; die_with_parent_if_asked(); time.sleep(300)"],
                            cwd=REPO, env={**ENV, PARENT_ENV: "1"})
    assert late.wait(timeout=60) == -9
