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


# ---- training input refused before anything exists (train.py's precheck: no NeMo import, no run directory)


def _train_py(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--config-name=tiny_llama_upcycle", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(p: subprocess.CompletedProcess, tmp_path: Path) -> str:
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def _tokenizer(path: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(str(path))
    return path


def test_missing_and_empty_corpus_are_refused(tmp_path):
    line = _one_error_line(_train_py(tmp_path, "data=text_files", f"data.paths=[{tmp_path / 'nope.txt'}]"), tmp_path)
    assert "nope.txt does not exist" in line
    (tmp_path / "empty.txt").write_text("")
    line = _one_error_line(_train_py(tmp_path, "data=text_files", f"data.paths=[{tmp_path / 'empty.txt'}]"), tmp_path)
    assert "empty.txt is empty" in line
    line = _one_error_line(_train_py(tmp_path, "data=text_files"), tmp_path)
    assert "data.paths" in line


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("w1 w2 w3 " * 100)
    big = _tokenizer(tmp_path / "tok200", 200)  # the tiny model's vocabulary is 99
    line = _one_error_line(_train_py(tmp_path, "data=text_files", f"data.paths=[{tmp_path / 'c.txt'}]",
                                     f"data.tokenizer={big}"), tmp_path)
    assert "has 200 tokens but the model's vocabulary is 99" in line
    # negative control: a tokenizer that fits passes the precheck (checked without training: mode=plan skips data)
    from nemo_upcycle.run import check_data

    check_data(compose("tiny_llama_upcycle", ["data=text_files", f"data.paths=[{tmp_path / 'c.txt'}]",
                                              f"data.tokenizer={_tokenizer(tmp_path / 'tok50', 50)}"]))
