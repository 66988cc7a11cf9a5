"""The table of refusals: bad input gives one line ``error: ...`` on stderr, exit code 2, and touches nothing.

Sections: data loss (what ``--overwrite`` may replace), interrupted conversions, bad values (CLI numbers, config.json
values, tensor dtypes), sizes that cannot fit, write errors, source paths, ``verify``'s inputs, the export entry
point. Every refusal has its accepted neighbour (the negative control) next to it; files that must survive are
compared byte for byte.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_llama
from nemo_upcycle.apps.cli import main
from nemo_upcycle.system.files import MARK

REPO = Path(__file__).resolve().parent.parent
OPTS = ("-E", 4, "-k", 2, "--no-progress")


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(code: int, err: str, match: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by content hash, links by target, directories by name (byte for byte)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def assert_refused(capsys, tmp_path: Path, src, *extra, match: str, out_name: str = "moe"):
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "convert", src, tmp_path / out_name, "--num-experts", 4, "--topk", 2,
                        "--no-progress", *extra)
    one_line(code, err, match)
    assert snapshot(tmp_path) == before, "something was left behind or changed"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def cli_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "nemo-upcycle"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nemo_upcycle.apps.cli"]


@pytest.fixture()
def dense_copy(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "dense"))


# ---- data loss: --overwrite replaces only what nemo-upcycle wrote --------------------------------------------------
@pytest.fixture()
def work(tmp_path, tiny_llama) -> Path:
    """A user's working folder: notes, a sub-folder of data, and the dense model inside it."""
    w = tmp_path / "work"
    (w / "sub").mkdir(parents=True)
    (w / "notes.txt").write_text("a user's file")
    (w / "sub" / "data.bin").write_bytes(os.urandom(256))
    shutil.copytree(tiny_llama, w / "dense")
    return w


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("case,src,out,match", [
    ("cwd", "dense", ".", "is the current directory"),
    ("parent_of_source", "work/dense", "work", "holds the source work/dense"),
    ("source", "work/dense", "work/dense", "is the source work/dense"),
    ("foreign", "work/dense", "work/sub", "holds files nemo-upcycle did not write"),
    ("home", "work/dense", "home", "is the home directory"),
    ("holds_home", "work/dense", "work", "holds the home directory"),
])
def test_never_replaces_what_is_not_ours(capsys, monkeypatch, tmp_path, work, case, src, out, match, overwrite):
    """Each refused before the source is read (open_dense would raise), and nothing under tmp_path changes."""
    import nemo_upcycle.offline.convert as conv

    def no_read(*a, **k):
        raise AssertionError("the source was read before the output was checked")

    monkeypatch.setattr(conv, "open_dense", no_read)
    home = tmp_path / ("work/sub" if case == "holds_home" else "home")
    home.mkdir(exist_ok=True)
    (home / ".bashrc").write_text("# mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work if case == "cwd" else tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "convert", src, out, *OPTS, *(["--overwrite"] if overwrite else []))
    one_line(code, err, match)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_our_own_output(capsys, monkeypatch, tmp_path, work):
    """The accepted neighbours: a new output, then --overwrite of it (our mark), an empty directory."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "convert", "work/dense", "work/moe", *OPTS)
    assert code == 0, err
    assert json.loads((work / "moe" / MARK).read_text())["kind"] == "convert"
    around = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("work/moe")}
    one_line(*run_cli(capsys, "convert", "work/dense", "work/moe", *OPTS), "already exists; choose another output "
             "or pass --overwrite")
    code, err = run_cli(capsys, "convert", "work/dense", "work/moe", "-E", 2, "-k", 1, "--no-progress", "--overwrite")
    assert code == 0, err
    assert json.loads((work / "moe" / "config.json").read_text())["num_local_experts"] == 2
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("work/moe")} == around
    (work / "empty").mkdir()
    assert run_cli(capsys, "convert", "work/dense", "work/empty", *OPTS, "--overwrite")[0] == 0
    assert not [p for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failed_replace_keeps_the_previous_output(capsys, tmp_path, tiny_llama, monkeypatch):
    """The last rename of --overwrite fails (here: injected EIO): the previous output is back in place, byte for byte,
    and neither the staging directory nor the moved-aside copy is left."""
    out = tmp_path / "moe"
    assert run_cli(capsys, "convert", tiny_llama, out, *OPTS)[0] == 0
    before = snapshot(tmp_path)
    rename = Path.rename

    def failing(self, target):
        if ".moe.tmp-" in self.name:
            raise OSError(errno.EIO, "Input/output error")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        main(["convert", str(tiny_llama), str(out), "-E", "2", "-k", "1", "--no-progress", "--overwrite"])
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(Path, "rename", rename)  # control: the same replace without the fault goes through
    assert run_cli(capsys, "convert", tiny_llama, out, "-E", 2, "-k", 1, "--no-progress", "--overwrite")[0] == 0
    assert snapshot(tmp_path) != before and sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_overwrite_legacy_output(capsys, tmp_path, tiny_llama):
    """An output from before marks (HF Mixtral + upcycling record + only our files) may be replaced; the same with a
    user's file in it, or without the upcycling record, may not."""
    out = tmp_path / "moe"
    assert run_cli(capsys, "convert", tiny_llama, out, *OPTS)[0] == 0
    (out / MARK).unlink()
    assert run_cli(capsys, "convert", tiny_llama, out, *OPTS, "--overwrite")[0] == 0
    (out / MARK).unlink()
    (out / "notes.txt").write_text("mine")
    assert_refused(capsys, tmp_path, tiny_llama, "--overwrite", match="did not write (no .nemo-upcycle mark)")
    (out / "notes.txt").unlink()
    cfg = json.loads((out / "config.json").read_text())
    del cfg["upcycling"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, tmp_path, tiny_llama, "--overwrite", match="did not write")


def test_output_link_and_file_refused(capsys, tmp_path, tiny_llama):
    assert run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", *OPTS)[0] == 0
    (tmp_path / "link").symlink_to(tmp_path / "moe")
    assert_refused(capsys, tmp_path, tiny_llama, "--overwrite", out_name="link", match="is a symbolic link")
    (tmp_path / "file").write_text("mine")
    assert_refused(capsys, tmp_path, tiny_llama, "--overwrite", out_name="file", match="is not a directory")


# ---- interrupted conversions -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medium_llama(tmp_path_factory) -> Path:
    """Big enough that E=32 with noise takes seconds to write (~200 MB), so a signal lands mid-write."""
    return make_llama(tmp_path_factory.mktemp("medium") / "dense", hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def start_convert(src: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A real ``nemo-upcycle convert``, returned once its staging directory holds a first shard (mid-write)."""
    p = subprocess.Popen(cli_cmd() + ["convert", str(src), str(out), "-E", "32", "-k", "2", "--noise-std", "0.01",
                                      "--shard-size-mb", "4", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    tmp = out.parent / f".{out.name}.tmp-{p.pid}"
    deadline = time.monotonic() + 120
    while not list(tmp.glob("model-*.safetensors")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.01)
    return p, tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_staging(tmp_path, medium_llama, sig):
    out = tmp_path / "moe"
    p, tmp = start_convert(medium_llama, out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"error: interrupted by {signal.Signals(sig).name}."]
    assert not tmp.exists() and not out.exists() and list(tmp_path.iterdir()) == []


def test_sigkill_leftover_swept_by_next_convert(capsys, tmp_path, medium_llama):
    out = tmp_path / "moe"
    p, tmp = start_convert(medium_llama, out)
    p.kill()
    p.wait()
    assert tmp.is_dir() and (tmp / MARK).is_file()  # control: SIGKILL leaves it (nothing can run)
    assert run_cli(capsys, "convert", medium_llama, out, "-E", 2, "-k", 1, "--no-progress")[0] == 0
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_signal_handlers_only_while_writing(capsys, tmp_path, tiny_llama, monkeypatch):
    """The CLI installs nothing global: SIGTERM's handler is ours only while the output is being written."""
    from nemo_upcycle.formats.safetensors_stream import ShardedWriter

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    during = []
    write = ShardedWriter.write
    monkeypatch.setattr(ShardedWriter, "write", lambda self, *a: (during.append(signal.getsignal(signal.SIGTERM)),
                                                                  write(self, *a))[1])
    assert run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", *OPTS)[0] == 0
    assert during and during[0] != before[signal.SIGTERM]  # control: the handler was on while writing
    assert {s: signal.getsignal(s) for s in before} == before


# ---- bad values --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--router-std", "nan"), ("--noise-std", "inf"), ("--capacity-factor", "nan"),
                                        ("--drop-ratio", "nan"), ("--aux-loss-coeff", "-inf"),
                                        ("--aux-loss-coeff", "nan")])
def test_non_finite_cli_numbers(capsys, tmp_path, tiny_llama, flag, value):
    assert_refused(capsys, tmp_path, tiny_llama, f"{flag}={value}", match=f"{flag} (")
    assert "not a finite number" in run_cli(capsys, "convert", tiny_llama, tmp_path / "m", *OPTS, f"{flag}={value}")[1]


def test_finite_cli_numbers_accepted(capsys, tmp_path, tiny_llama):
    code, err = run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", *OPTS, "--router-std", "0.01",
                        "--noise-std", "0.001", "--capacity-factor", "1.5", "--drop-ratio", "0.25",
                        "--aux-loss-coeff", "0")
    assert code == 0, err


@pytest.mark.parametrize("field,value,match", [
    ("router_std", float("nan"), "--router-std (router_std) = nan is not a finite number"),
    ("moe_aux_loss_coeff", float("inf"), "--aux-loss-coeff (moe_aux_loss_coeff) = inf"),
    ("moe_aux_loss_coeff", -0.1, "--aux-loss-coeff -0.1 must be >= 0"),
    ("num_moe_experts", 4.0, "--num-experts (num_moe_experts) = 4.0 is not an integer"),
    ("granularity", True, "is not an integer"),
])
def test_options_validate_hydra_path(field, value, match):
    """The Hydra recipes build UpcycleOptions without argparse: validate() itself refuses (control: defaults pass);
    its error names fields, which the CLI renders by its flags."""
    from nemo_upcycle.apps.cli import OPTION_FLAGS
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.errors import UpcycleError

    UpcycleOptions(4, 2).validate()
    with pytest.raises(UpcycleError) as e:
        dataclasses.replace(UpcycleOptions(4, 2), **{field: value}).validate()
    assert match in e.value.render(OPTION_FLAGS, " ")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", 36, None),  # the accepted neighbour: the same file written the same way
    ("rms_norm_eps", NAN, "rms_norm_eps = NaN is not a finite positive number"),
    ("rope_theta", INF, "rope_theta = Infinity is not a finite positive number"),
    ("rms_norm_eps", 0, "rms_norm_eps = 0 is not a finite positive number"),
    ("hidden_size", 36.0, "hidden_size = 36.0 is a float; a size must be a positive integer"),
    ("intermediate_size", True, "intermediate_size = true is a bool"),
    ("vocab_size", "99", 'vocab_size = "99" is a str'),
    ("num_hidden_layers", 0, "num_hidden_layers = 0 is not positive"),
    ("num_attention_heads", -6, "num_attention_heads = -6 is not positive"),
    ("num_key_value_heads", 4, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ("max_position_embeddings", 64.0, "max_position_embeddings = 64.0 is a float"),
    ("eos_token_id", 2.0, "eos_token_id = 2.0 is not a token id"),
    ("bos_token_id", [1, "2"], 'bos_token_id = [1, "2"] is not a token id'),
    ("rope_scaling", {"rope_type": "llama3", "factor": NAN}, "rope_scaling ="),
    ("num_hidden_layers", 10**9, "holds 30 tensors but its config (1000000000 layers) implies 9000000003"),
])
def test_config_values(capsys, tmp_path, dense_copy, key, value, match):
    cfg = json.loads((dense_copy / "config.json").read_text())
    cfg[key] = value
    text = json.dumps(cfg)  # Python writes NaN / Infinity literals, which Python's json reads back
    if isinstance(value, float) and not math.isfinite(value):
        assert f": {json.dumps(value)}" in text and json.dumps(value) in ("NaN", "Infinity")
    (dense_copy / "config.json").write_text(text)
    if match is None:
        assert run_cli(capsys, "convert", dense_copy, tmp_path / "moe", *OPTS)[0] == 0
    else:
        where = " " if match.startswith("holds") else "/config.json: "
        assert_refused(capsys, tmp_path, dense_copy, match=f"{dense_copy}{where}{match}")


@pytest.mark.parametrize("dtype,match", [(torch.bfloat16, None), (torch.float64, "is float64"),
                                         (torch.int32, "is int32"), (torch.float8_e4m3fn, "is stored as F8_E4M3")])
def test_tensor_dtypes(capsys, tmp_path, dense_copy, dtype, match):
    from safetensors.torch import load_file, save_file

    tensors = load_file(dense_copy / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, dense_copy / "model.safetensors", metadata={"format": "pt"})
    if match is None:
        assert run_cli(capsys, "convert", dense_copy, tmp_path / "moe", *OPTS)[0] == 0
    else:
        assert_refused(capsys, tmp_path, dense_copy, match=f"{key} {match}")


# ---- sizes that cannot fit ---------------------------------------------------------------------------------------
def test_too_many_experts_refused_before_layout(capsys, tmp_path, tiny_llama, monkeypatch):
    """-E 100000000 once ran 160 s building the layout, then the OOM killer struck: refused from the sizes alone."""
    import dataclasses

    from nemo_upcycle.formats.hf_moe import FORMATS

    def no_layout(*a, **k):
        raise AssertionError("layout() was built")

    for name, fmt in FORMATS.items():
        monkeypatch.setitem(FORMATS, name, dataclasses.replace(fmt, layout=no_layout))
    t0 = time.perf_counter()
    code, err = run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", "-E", 100000000, "-k", 2, "--no-progress")
    assert time.perf_counter() - t0 < 10
    line = one_line(code, err, "the conversion needs about ")
    assert "GiB of memory (900,000,024 output tensors for 100,000,000 experts x 3 layers)" in line
    assert "GiB available; lower --num-experts" in line
    assert list(tmp_path.iterdir()) == []
    # control: with memory to spare, the closed-form disk check refuses it, still before layout()
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 1 << 60})())
    one_line(*run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", "-E", 100000000, "-k", 2, "--no-progress"),
             "not enough disk under")


def test_memory_estimate_bounds_the_measured_peak(tmp_path):
    """BYTES_PER_TENSOR is measured: the estimate is above a real conversion's peak and not far above it."""
    script = """
import shutil, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import torch
from helpers import make_llama
from nemo_upcycle.offline.convert import convert, peak_memory_bytes
from nemo_upcycle.core import UpcycleOptions
d = make_llama(Path(sys.argv[1]) / "dense", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
convert(d, Path(sys.argv[1]) / "warm", UpcycleOptions(2, 1), progress=False)
status = lambda k: int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
rss = status("VmRSS")
res = convert(d, Path(sys.argv[1]) / "moe", UpcycleOptions(20000, 1), progress=False)
print(status("VmHWM") - rss, peak_memory_bytes(res.config | {"intermediate_size": 8}, UpcycleOptions(20000, 1),
                                                torch.float32, torch.float32))
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(REPO / "tests")], capture_output=True,
                       text=True, env=env(), timeout=300)
    if r.returncode and "clear_refs" in r.stderr:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert r.returncode == 0, r.stderr[-2000:]
    measured, estimate = map(int, r.stdout.split())
    assert measured < estimate < 3 * measured, (measured, estimate)


@pytest.mark.parametrize("tied,G,dtype", [(False, 1, torch.float32), (True, 2, torch.bfloat16),
                                         (False, 4, torch.float16)])
def test_closed_form_sizes_equal_layout(tiny_llama, tied, G, dtype):
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.formats.mixtral import layout, num_output_tensors, output_bytes

    cfg = {**json.loads((tiny_llama / "config.json").read_text()), "tie_word_embeddings": tied}
    opts = UpcycleOptions(8, 2, granularity=G)
    plan = layout(cfg, opts, dtype)
    assert num_output_tensors(cfg, opts) == len(plan)
    assert output_bytes(cfg, opts, dtype) == sum(s.nbytes for s, _ in plan)


def test_too_little_disk(capsys, tmp_path, tiny_llama, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    assert_refused(capsys, tmp_path, tiny_llama, match="not enough disk")


# ---- write errors ------------------------------------------------------------------------------------------------
def test_read_only_parent(capsys, tmp_path, tiny_llama):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root) can still write into a mode-555 directory; see test_not_writable_parent")
        assert_refused(capsys, tmp_path, tiny_llama, match=f"cannot write under {ro}", out_name="ro/moe")
    finally:
        ro.chmod(0o755)


def test_not_writable_parent(capsys, tmp_path, tiny_llama, monkeypatch):
    """os.access says no (read-only mount, no permission): refused up front; control: the same call converts."""
    import nemo_upcycle.system.files as files

    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert_refused(capsys, tmp_path, tiny_llama, match=f"cannot write under {tmp_path} (read-only or no permission)")
    monkeypatch.setattr(files.os, "access", real)
    assert run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", *OPTS)[0] == 0


@pytest.mark.parametrize("err,match", [(errno.ENOSPC, "is full ("), (errno.EROFS, "Read-only file system")])
def test_write_error_mid_write(capsys, tmp_path, tiny_llama, monkeypatch, err, match):
    """A disk that fills (or turns read-only) mid-write: one line naming the path (and the space needed); the
    staging directory is removed."""
    from nemo_upcycle.formats.safetensors_stream import ShardedWriter

    calls = []
    write = ShardedWriter.write

    def failing(self, name, t):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(err, os.strerror(err))
        return write(self, name, t)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    line = one_line(*run_cli(capsys, "convert", tiny_llama, tmp_path / "moe", *OPTS), match)
    assert str(tmp_path) in line and (err != errno.ENOSPC or "GiB needed" in line)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


# ---- source paths ------------------------------------------------------------------------------------------------
def test_source_paths(capsys, tmp_path, dense_copy):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    (tmp_path / "empty_dir").mkdir()
    for src, match in [("loop_a", "is a symlink loop"), ("broken", "is a broken symbolic link"),
                       ("nope", "does not exist"), ("weights.bin", "is neither a directory nor a .gguf file"),
                       ("empty_dir", "has no config.json")]:
        assert_refused(capsys, tmp_path, tmp_path / src, match=f"{tmp_path / src} {match}")
    (tmp_path / "link").symlink_to(dense_copy)  # control: a link to a real model is followed
    assert run_cli(capsys, "convert", tmp_path / "link", tmp_path / "moe", *OPTS)[0] == 0


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
    (("--shard-size-mb", 0), "--shard-size-mb 0 must be at least 1"),
    (("--num-experts", "1e8"), "argument --num-experts/-E: invalid int value: '1e8'; see nemo-upcycle convert -h"),
])
def test_impossible_options(capsys, tmp_path, tiny_llama, extra, match):
    if extra[0] == "--num-experts" and extra[1] == "1e8":  # argparse's own errors exit through SystemExit(2)
        with pytest.raises(SystemExit) as e:
            main(["convert", str(tiny_llama), str(tmp_path / "moe"), "-k", "2", *map(str, extra)])
        one_line(e.value.code, capsys.readouterr().err.strip(), match)
        return
    assert_refused(capsys, tmp_path, tiny_llama, *extra, match=match)


# ---- verify: the same input checks as convert, before transformers loads anything ---------------------------------
@pytest.fixture(scope="module")
def moe_of_tiny(tiny_llama, tmp_path_factory) -> Path:
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.offline.convert import convert

    return convert(tiny_llama, tmp_path_factory.mktemp("moe") / "moe", UpcycleOptions(4, 2), progress=False,
                   max_shard_bytes=20_000).out_dir


def _sharded_dense(path: Path) -> Path:
    from helpers import load_llama

    load_llama(make_llama(path / "single")).save_pretrained(path / "sharded", max_shard_size="20KB")
    return path / "sharded"


def _mixtral_without_record(path: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    from helpers import TINY

    cfg = MixtralConfig(**{k: v for k, v in TINY.items()}, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


VERIFY_CASES = {  # name: (how to make (dense, moe) from (tiny dense, its MoE, a scratch dir), what the line says)
    "swapped": (lambda d, m, t: (m, d), "the arguments are swapped: "),
    "dense_as_moe": (lambda d, m, t: (d, d), "is a dense Llama, not an upcycled MoE"),
    "moe_as_dense": (lambda d, m, t: (m, m), "is a Mixture-of-Experts, not the dense model"),
    "truncated_dense": (lambda d, m, t: (_truncate(Path(shutil.copytree(d, t / "d")) / "model.safetensors"), m),
                        "is truncated or corrupt"),
    "missing_dense_shard": (lambda d, m, t: (_drop_shard(_sharded_dense(t)), m), "which is missing"),
    "f64_dense": (lambda d, m, t: (_to_f64(Path(shutil.copytree(d, t / "d"))), m), "is float64"),
    "vocab_mismatch": (lambda d, m, t: (make_llama(t / "d", vocab_size=128), m),
                       "differ in vocab_size (128 vs 99): the MoE was not upcycled from this dense model"),
    "ffn_mismatch": (lambda d, m, t: (make_llama(t / "d", intermediate_size=48), m),
                     "has experts of FFN size 44 x granularity 1, the dense FFN"),
    "not_upcycled": (lambda d, m, t: (d, _mixtral_without_record(t / "m")), "without an upcycling record"),
    "missing_moe_shard": (lambda d, m, t: (d, _drop_shard(Path(shutil.copytree(m, t / "m")))), "which is missing"),
    "truncated_moe": (lambda d, m, t: (d, _truncate(sorted(Path(shutil.copytree(m, t / "m")).glob("model-*"))[1])),
                      "is truncated or corrupt"),
    "moe_experts_edited": (lambda d, m, t: (d, _edited(m, t, num_local_experts=8)),
                           "holds 60 tensors but its config (3 layers, 8 experts) implies 96"),
    "moe_ffn_edited": (lambda d, m, t: (d, _edited(m, t, intermediate_size=22)), "but config.json implies [22, 36]"),
    "nemo_checkpoint": (lambda d, m, t: (_fake_nemo(t), m), "is a NeMo checkpoint"),
    "moe_loop": (lambda d, m, t: (d, _loop(t)), "is a symlink loop"),
}


def _truncate(f: Path) -> Path:
    f.write_bytes(f.read_bytes()[:-100])
    return f.parent


def _drop_shard(d: Path) -> Path:
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    return d


def _to_f64(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    t = load_file(d / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].double()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _edited(m: Path, t: Path, **changes) -> Path:
    d = Path(shutil.copytree(m, t / "m"))
    _edit_json(d / "config.json", **changes)
    return d


def _fake_nemo(t: Path) -> Path:
    for sub in ("context", "weights"):
        (t / "ckpt" / sub).mkdir(parents=True)
    return t / "ckpt"


def _loop(t: Path) -> Path:
    (t / "a").symlink_to(t / "b")
    (t / "b").symlink_to(t / "a")
    return t / "a"


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_refusals(capsys, tmp_path, tiny_llama, moe_of_tiny, monkeypatch, case):
    import nemo_upcycle.offline.verify as verify

    make, match = VERIFY_CASES[case]
    dense, moe = make(tiny_llama, moe_of_tiny, tmp_path)
    for name in ("load_dense", "load_moe"):  # every refusal comes before transformers loads a model
        monkeypatch.setattr(verify, name, lambda *a: pytest.fail("transformers loaded a model"))
    one_line(*run_cli(capsys, "verify", dense, moe), match)


def test_verify_accepts_the_right_order(capsys, tiny_llama, moe_of_tiny):
    """The control for the table above: the same pair in the right order passes."""
    assert main(["verify", str(tiny_llama), str(moe_of_tiny), "--atol", "1e-5"]) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--atol", "nan"), ("--max-tokens", "0"), ("--min-top1", "nan")])
def test_verify_bad_numbers(capsys, tiny_llama, moe_of_tiny, flag, value):
    one_line(*run_cli(capsys, "verify", tiny_llama, moe_of_tiny, f"{flag}={value}"), f"{flag} {value}")


# ---- the export entry point (python -m nemo_upcycle.engine.export): refused before NeMo is imported ---------------
@pytest.mark.parametrize("case", ["not_a_checkpoint", "foreign_out", "foreign_out_overwrite", "bad_dense_config"])
def test_export_entry_point_refusals(tmp_path, case):
    ckpt = _fake_nemo(tmp_path) if case != "not_a_checkpoint" else tmp_path / "dense"
    ckpt.mkdir(exist_ok=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    args = [str(ckpt), str(out if case.startswith("foreign") else tmp_path / "new")]
    args += ["--overwrite"] if case == "foreign_out_overwrite" else []
    if case == "bad_dense_config":
        (tmp_path / "config.json").write_text("{not json")
        args += ["--dense-config", str(tmp_path / "config.json")]
    match = {"not_a_checkpoint": "is not a NeMo 2 checkpoint", "foreign_out": "holds files nemo-upcycle did not write",
             "bad_dense_config": "cannot read --dense-config"}.get(case, "holds files nemo-upcycle did not write")
    before = snapshot(tmp_path)
    code = ("import sys\nfrom nemo_upcycle.engine.export import main\nrc = main(sys.argv[1:])\n"
            "assert not any(m == 'nemo' or m.startswith('nemo.') for m in sys.modules), 'NeMo was imported'\n"
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env())
    one_line(r.returncode, r.stderr.strip(), match)
    assert snapshot(tmp_path) == before


def test_export_module_refuses_as_module(tmp_path):
    """The documented command itself (python -m): one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "nemo_upcycle.engine.export", str(tmp_path), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env())
    one_line(r.returncode, r.stderr.strip(), "is not a NeMo 2 checkpoint")


def test_failure_midway_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    """A crash while writing (here: a failing expert) removes the temporary directory."""
    import nemo_upcycle.offline.convert as conv
    from nemo_upcycle.core import UpcycleOptions

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(conv, "read_dense_mlp", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        conv.convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path):
    r = subprocess.run(cli_cmd() + ["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "-E", "4", "-k", "2"],
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
