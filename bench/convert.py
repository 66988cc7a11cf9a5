#!/usr/bin/env python
"""Benchmark: ``nemo-upcycle convert`` bandwidth and peak memory against a plain copy of the same bytes.

What it measures
  * Source: a random dense checkpoint shaped like Llama-3.2-1B (hidden 2048, FFN 8192, 16 layers, 32 heads,
    8 KV heads, head_dim 64, vocab 128256, tied embeddings, llama3 rope scaling, bf16), written as sharded
    safetensors + index + an HF LlamaConfig config.json, one tensor at a time with the project's
    ``ShardedWriter``. It is kept (and reused) when ``--workdir`` is given.
  * convert: ``python -m nemo_upcycle.apps.cli convert SRC OUT -E 8 -k 2 --no-progress`` in a child process
    (about 13.7 GB of output for the full model).
  * copy (baseline): a child process writing the same number of bytes to the same filesystem by copying
    the source shards' bytes over and over with 16 MiB unbuffered reads and writes, in 2 GiB files.
  For each child: wall time and peak RSS (the kernel's high-water mark VmHWM, polled from /proc every 20 ms:
  ``ru_maxrss`` is not used because a forked child inherits the parent's RSS at fork), plus the peak of
  RssAnon, which tells anonymous memory from file pages (mmap) counted in RSS.
  The output is deleted after every run; ``--repeats`` runs are interleaved (convert, copy, convert, ...)
  and the table reports every run and the medians. Both children start a Python interpreter, but convert
  also imports torch, which weighs more in the ``--small`` (4-layer, 3.8 GB) quick run.

Targets (PASS/FAIL lines; exit code 0 unless ``--check`` is given and a target fails)
  * bandwidth ratio convert / copy >= 0.70
  * peak RSS of convert < 2 GB (2e9 bytes)

Bookkeeping per output tensor (``--per-tensor``): child processes convert a micro Llama (hidden 8, FFN 8, 1 layer)
into E = 20,000 and 60,000 experts (60k / 180k tiny output tensors), with one shard and with 1 MiB shards, and report
the growth of the peak RSS over the RSS before the conversion (the high-water mark is reset through
/proc/self/clear_refs), per output tensor; ``convert.BYTES_PER_TENSOR`` is set from it.

Every directory this script makes carries the project's mark (``files.write_mark``: the mkdtemp work directory, the
source, the copy baseline's output; convert marks its own) and is removed with ``files.remove_ours``: with a
``--workdir`` of yours, nothing there that the bench did not write is deleted.

Usage: python bench/convert.py [--workdir DIR] [--repeats N] [--small] [--check] [--per-tensor]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OUT_KINDS = ("convert", "bench-copy")  # what may stand at WORKDIR/out: a convert output or the copy baseline's
RATIO_TARGET = 0.70
RSS_TARGET = 2e9
SRC_SHARD_BYTES = 1 << 30
COPY_FILE_BYTES = 2 << 30
CHUNK = 16 << 20
GB = 1e9
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
from nemo_upcycle.system.files import remove_ours, write_mark  # noqa: E402 (no torch here: children time their own import)


def llama_config(layers: int) -> dict:
    """config.json of Llama-3.2-1B (HF LlamaConfig form), with ``layers`` decoder layers."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "num_attention_heads": 32, "num_hidden_layers": layers, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "use_cache": True, "vocab_size": 128256,
    }


def dense_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the tied-embedding dense Llama, in HF's (sorted-per-layer) order."""
    D, F, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    H, KV = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], D))]
    for i in range(c["num_hidden_layers"]):
        out += [(f"model.layers.{i}.{k}", s) for k, s in (
            ("input_layernorm.weight", (D,)), ("mlp.down_proj.weight", (D, F)), ("mlp.gate_proj.weight", (F, D)),
            ("mlp.up_proj.weight", (F, D)), ("post_attention_layernorm.weight", (D,)),
            ("self_attn.k_proj.weight", (KV, D)), ("self_attn.o_proj.weight", (D, H)),
            ("self_attn.q_proj.weight", (H, D)), ("self_attn.v_proj.weight", (KV, D)))]
    return out + [("model.norm.weight", (D,))]


def generate(workdir: Path, layers: int, cfg: dict | None = None, name: str | None = None) -> Path:
    """Write (or reuse) the random dense source (default: Llama-3.2-1B-shaped); peak memory is one tensor."""
    import torch

    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.formats.base import open_dense
    from nemo_upcycle.formats.safetensors_stream import ShardedWriter, TensorSpec
    from nemo_upcycle.system.files import check_writable, publish, remove_ours, staging

    cfg = cfg or llama_config(layers)
    src = workdir / (name or f"llama-3.2-1b-shaped-L{layers}")
    if src.is_dir():
        try:
            open_dense(src)
            print(f"reusing source {src}")
            return src
        except UpcycleError as e:
            print(f"regenerating source ({e})")
            remove_ours(src, ("bench-source",))  # a directory of yours with that name is left alone (refused)
    specs = [TensorSpec(k, shp, torch.bfloat16) for k, shp in dense_shapes(cfg)]
    need = sum(s.nbytes for s in specs)
    check_writable(workdir, need + (1 << 30), flag="source")
    print(f"generating {need / GB:.2f} GB source in {src} ...", flush=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    with staging(src, need) as tmp:  # marked, removed on failure or SIGTERM / SIGINT
        writer = ShardedWriter(tmp, specs, SRC_SHARD_BYTES)
        for s in specs:
            t = torch.ones(s.shape, dtype=s.dtype) if len(s.shape) == 1 else \
                torch.empty(s.shape, dtype=s.dtype).normal_(0.0, 0.02, generator=g)
            writer.write(s.name, t)
            del t
        writer.close()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        publish(tmp, src, "bench-source")
    open_dense(src)
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return src


def copy_child(src: Path, out: Path, nbytes: int) -> None:
    """The baseline: write ``nbytes`` to ``out`` by copying the source shards' bytes, over and over."""
    from nemo_upcycle.system.files import write_mark

    out.mkdir()
    write_mark(out, "bench-copy")
    shards = sorted(src.glob("*.safetensors"))
    buf = memoryview(bytearray(CHUNK))
    left, i, si = nbytes, 0, 0
    fin = open(shards[0], "rb", buffering=0)
    while left:
        with open(out / f"copy-{i:05d}.bin", "wb", buffering=0) as fo:
            room = min(left, COPY_FILE_BYTES)
            while room:
                n = fin.readinto(buf[:min(room, CHUNK)])
                if not n:  # end of this shard: go on with the next (cyclically)
                    fin.close()
                    si = (si + 1) % len(shards)
                    fin = open(shards[si], "rb", buffering=0)
                    continue
                done = 0
                while done < n:
                    done += fo.write(buf[done:n])
                room -= n
                left -= n
        i += 1
    fin.close()


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of a live process, in bytes ({} once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in fh)
                    if k.startswith(("Vm", "Rss"))}
    except (OSError, ValueError):
        return {}


def measure(cmd: list[str], out: Path, log: Path) -> dict:
    """Run one child; return wall seconds, output bytes, peak RSS and peak anonymous RSS."""
    rss = anon = 0
    with open(log, "ab") as fh:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while p.poll() is None:
            st = proc_status(p.pid)
            rss, anon = max(rss, st.get("VmHWM", 0), st.get("VmRSS", 0)), max(anon, st.get("RssAnon", 0))
            time.sleep(0.02)
        secs = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"child failed ({p.returncode}): {' '.join(cmd)}; see {log}")
    nbytes = du(out)
    remove_ours(out, OUT_KINDS)
    os.sync()  # let writeback settle so the next run starts from the same state (not timed)
    return {"secs": secs, "bytes": nbytes, "rss": rss, "anon": anon}


MICRO = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8,
         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 4, "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}


def per_tensor_child(src: Path, out: Path, experts: int, shard_bytes: int) -> None:
    """Convert ``src`` into ``experts`` experts in this process; print output tensors and the peak-RSS growth."""
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.offline.convert import convert
    from nemo_upcycle.system.files import remove_ours

    def status(key: str) -> int:
        with open("/proc/self/status") as fh:
            return int(next(ln for ln in fh if ln.startswith(key)).split()[1]) * 1024

    convert(src, out, UpcycleOptions(2, 1), progress=False)  # warm up: imports, allocator
    remove_ours(out, ("convert",))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    rss = status("VmRSS")
    res = convert(src, out, UpcycleOptions(experts, 1), progress=False, max_shard_bytes=shard_bytes)
    print(res.num_tensors, status("VmHWM") - rss)
    remove_ours(out, ("convert",))


def per_tensor(workdir: Path) -> int:
    """Peak-RSS growth per output tensor of a conversion (see the module docstring)."""
    src = generate(workdir, 1, MICRO, "micro-llama")
    rows = []
    for shard in (2 << 30, 1 << 20):
        for experts in (20000, 60000):
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--per-tensor-child", str(src),
                                str(workdir / "out"), str(experts), str(shard)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"child failed: {r.stderr[-2000:]}")
            n, grown = map(int, r.stdout.split()[-2:])
            rows.append((shard, experts, n, grown))
            print(f"shard {shard >> 20:>5} MiB  E={experts:>6}  {n:>7} tensors  peak +{grown / 2**20:7.1f} MiB  "
                  f"{grown / n:7.0f} B/tensor", flush=True)
    for shard in (2 << 30, 1 << 20):
        (_, _, n0, g0), (_, _, n1, g1) = [r for r in rows if r[0] == shard]
        print(f"shard {shard >> 20:>5} MiB: slope {(g1 - g0) / (n1 - n0):.0f} B per extra output tensor")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="keeps the source between runs (default: a temp dir under /tmp)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="4 layers instead of 16, for a quick run")
    ap.add_argument("--experts", "-E", type=int, default=8)
    ap.add_argument("--topk", "-k", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--per-tensor", action="store_true", help="measure the bookkeeping memory per output tensor")
    ap.add_argument("--copy-child", nargs=3, metavar=("SRC", "OUT", "BYTES"), help=argparse.SUPPRESS)
    ap.add_argument("--per-tensor-child", nargs=4, metavar=("SRC", "OUT", "E", "SHARD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.copy_child:
        copy_child(Path(a.copy_child[0]), Path(a.copy_child[1]), int(a.copy_child[2]))
        return 0
    if a.per_tensor_child:
        per_tensor_child(Path(a.per_tensor_child[0]), Path(a.per_tensor_child[1]), *map(int, a.per_tensor_child[2:]))
        return 0

    temp = a.workdir is None
    if temp:  # made here, and marked at once: the only directory removed whole at the end
        workdir = Path(tempfile.mkdtemp(prefix="nemo-upcycle-bench-", dir="/tmp"))
        write_mark(workdir, "bench")
    else:
        workdir = a.workdir.absolute()
        workdir.mkdir(parents=True, exist_ok=True)
    if a.per_tensor:
        try:
            return per_tensor(workdir)
        finally:
            remove_ours(workdir / "out", OUT_KINDS)
            if temp:
                remove_ours(workdir, ("bench",))
    try:
        src = generate(workdir, 4 if a.small else 16)
        out, log = workdir / "out", workdir / "bench.log"
        remove_ours(out, OUT_KINDS)  # a leftover of an earlier run; refused if it is not one
        conv_cmd = [sys.executable, "-m", "nemo_upcycle.apps.cli", "convert", str(src), str(out),
                    "-E", str(a.experts), "-k", str(a.topk), "--no-progress"]
        runs: dict[str, list[dict]] = {"convert": [], "copy": []}
        os.sync()  # a freshly generated source would still be in writeback during the first run
        for r in range(a.repeats):
            print(f"run {r + 1}/{a.repeats}: convert ...", end=" ", flush=True)
            c = measure(conv_cmd, out, log)
            runs["convert"].append(c)
            print(f"{c['secs']:.1f} s; copy ...", end=" ", flush=True)
            b = measure([sys.executable, os.path.abspath(__file__), "--copy-child", str(src), str(out),
                         str(c["bytes"])], out, log)
            runs["copy"].append(b)
            print(f"{b['secs']:.1f} s", flush=True)
    finally:
        remove_ours(workdir / "out", OUT_KINDS)
        if temp:
            remove_ours(workdir, ("bench",))

    def row(label: str, m: dict) -> str:
        return (f"{label:<22}{m['bytes'] / GB:>10.2f}{m['secs']:>10.1f}{m['bytes'] / m['secs'] / GB:>9.2f}"
                f"{m['rss'] / GB:>11.2f}{m['anon'] / GB:>11.2f}")

    print(f"\nsource {src.name}: E{a.experts} top-{a.topk}, {a.repeats} run(s) each, interleaved")
    print(f"{'':<22}{'out GB':>10}{'seconds':>10}{'GB/s':>9}{'peak RSS':>11}{'peak anon':>11}")
    for kind, ms in runs.items():
        for i, m in enumerate(ms):
            print(row(f"{kind} #{i + 1}", m))
    med = {kind: {k: (statistics.median if k != "rss" and k != "anon" else max)(m[k] for m in ms) for k in ms[0]}
           for kind, ms in runs.items()}
    if a.repeats > 1:
        for kind in runs:
            print(row(f"{kind} (median)", med[kind]))
    ratio = (med["convert"]["bytes"] / med["convert"]["secs"]) / (med["copy"]["bytes"] / med["copy"]["secs"])
    rss = med["convert"]["rss"]
    ok_ratio, ok_rss = ratio >= RATIO_TARGET, rss < RSS_TARGET
    print(f"\nbandwidth ratio convert/copy  {ratio:6.2f}   target ratio >= {RATIO_TARGET:.2f}    "
          f"{'PASS' if ok_ratio else 'FAIL'}")
    print(f"peak RSS of convert        {rss / GB:6.2f} GB   target peak RSS < {RSS_TARGET / GB:.0f} GB  "
          f"{'PASS' if ok_rss else 'FAIL'}")
    return 1 if a.check and not (ok_ratio and ok_rss) else 0


if __name__ == "__main__":
    sys.exit(main())
