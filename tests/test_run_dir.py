"""A run directory belongs to one run: train.py refuses one holding another run's checkpoints (one line, exit 2,
nothing there touched), accepts its own (resume), and a resumed run's metrics.jsonl drops the killed run's
records past the checkpoint it resumes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.catalog import compose
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.run import check_run_dir, run_identity, write_run_identity

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _fake_checkpoint(run_dir: Path) -> Path:
    ck = run_dir / "run" / "checkpoints" / "step=3-last"
    ck.mkdir(parents=True)
    (ck / "common.pt").write_bytes(b"weights")
    return ck


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
    assert len(lines) == 1 and lines[0].startswith("error: run directory") and "upcycle.granularity=2 there, 1 here" in lines[0]
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
