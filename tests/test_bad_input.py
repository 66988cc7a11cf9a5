"""Bad input: one clear line on stderr, exit code 2, and nothing left behind in the output's directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_llama

from nemo_upcycle.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, tmp_path: Path, src, *extra, match: str, out_name: str = "moe"):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, "convert", src, tmp_path / out_name, "--num-experts", 4, "--topk", 2,
                        "--no-progress", *extra)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was left behind"


@pytest.fixture()
def dense_copy(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "dense"))


def test_missing_path(capsys, tmp_path):
    assert_refused(capsys, tmp_path, tmp_path / "nope", match="does not exist")


def test_no_config(capsys, tmp_path, dense_copy):
    (dense_copy / "config.json").unlink()
    assert_refused(capsys, tmp_path, dense_copy, match="no config.json")


def test_already_moe(capsys, tmp_path, tiny_llama):
    code, _ = run_cli(capsys, "convert", tiny_llama, tmp_path / "mixtral", "-E", 2, "-k", 1, "--no-progress")
    assert code == 0
    assert_refused(capsys, tmp_path, tmp_path / "mixtral", match="already a Mixture-of-Experts")


def test_other_family(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    assert_refused(capsys, tmp_path, tmp_path / "gpt2", match="not a dense Llama")


def test_truncated_safetensors(capsys, tmp_path, dense_copy):
    f = dense_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    assert_refused(capsys, tmp_path, dense_copy, match="truncated or corrupt")


def test_corrupt_safetensors(capsys, tmp_path, dense_copy):
    (dense_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    assert_refused(capsys, tmp_path, dense_copy, match="corrupt")


def test_shape_disagrees_with_config(capsys, tmp_path, dense_copy):
    cfg = json.loads((dense_copy / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (dense_copy / "config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, tmp_path, dense_copy, match="config implies")


@pytest.mark.parametrize("extra,match", [
    (("--topk", 5), "between 1 and --num-experts"),
    (("--granularity", 3, "--num-experts", 6), "does not divide the dense FFN size 44"),
    (("--granularity", 4, "--num-experts", 6), "not a multiple of --granularity"),
    (("--drop-ratio", 1.5), "outside [0, 1]"),
    (("--drop-ratio", -0.1), "outside [0, 1]"),
    (("--moe-layers", "0,7"), "outside 0..2"),
    (("--dtype", "int4"), "--dtype"),
])
def test_impossible_options(capsys, tmp_path, tiny_llama, extra, match):
    assert_refused(capsys, tmp_path, tiny_llama, *extra, match=match)


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny_llama):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, tmp_path, tiny_llama, match="--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _ = run_cli(capsys, "convert", tiny_llama, out, "-E", 4, "-k", 2, "--overwrite", "--no-progress")
    assert code == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_too_little_disk(capsys, tmp_path, tiny_llama, monkeypatch):
    import nemo_upcycle.convert as conv

    real = shutil.disk_usage
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    assert_refused(capsys, tmp_path, tiny_llama, match="not enough disk")


def test_failure_midway_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    """A crash while writing (here: a failing expert) removes the temporary directory."""
    import nemo_upcycle.convert as conv
    from nemo_upcycle.core import UpcycleOptions

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(conv, "read_dense_mlp", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        conv.convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "nemo-upcycle"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nemo_upcycle.cli"]
    r = subprocess.run(cmd + ["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "-E", "4", "-k", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
