#!/usr/bin/env python
"""Benchmark: per-rank peak memory and time of the online upcycle start against Megatron-LM's ``--moe-use-upcycling``.

What it measures
  Two random dense Llamas written by transformers as fp32 safetensors (``tests/helpers.make_llama``): the tiny
  test model (hidden 36, 3 layers) and one shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads,
  FFN 1536, vocab 49152, tied). Target: E8 top-2, granularity 1, local spec, fp32, CPU / gloo.
  (A) online: each rank builds only its MoE shard (``UpcycledLlamaConfig.from_dense(...).configure_model``)
      and fills it with ``nemo_upcycle.engine.model.upcycle_into`` straight from the HF directory.
  (B) Megatron-LM's way (``megatron/training/training.py`` with ``--moe-use-upcycling``): each rank builds
      the MoE model, then the whole dense model (same config, no experts), loads the dense weights into it
      (our ``MegatronFiller``, dense ``mlp.linear_fc1/fc2`` names), runs megatron-core's real
      ``upcycling_utils.upcycle_state_dict([moe], [dense])`` and ``moe.load_state_dict(..., strict=True)``.
  Each (model, method, ranks) runs in a fresh ``torchrun --standalone --nproc_per_node N`` (N = 1: EP=1,
  N = 2: EP=2, each rank holds 4 of the 8 experts). Every rank reports, after imports, gloo and
  ``initialize_model_parallel`` (the baseline, ~0.8 GB of NeMo/Megatron imports), its VmRSS; after the model
  is filled, its VmHWM (peak RSS of this process image; ``ru_maxrss`` is printed as a cross-check: it is the
  larger of that and the RSS of the torchrun agent it was forked from) and the time from the start of the
  build to the filled model (build = Megatron's constructors incl. random init; the rest is the fill).
  "increment" = VmHWM - baseline VmRSS.
  "expect" is the analytic estimate: (A) the MoE shard (the fill adds one dense tensor or MLP at a time on
  top, the largest being the 113 MB embedding read); (B) dense + MoE shard + upcycle_state_dict's deep
  copies of both state dicts (2 x (dense + shard)).
  Ranks run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (``--stock-malloc``: without). With glibc's dynamic mmap
  threshold about 1 rank in 4 (EP=2, either method) keeps ~0.5 GB more resident after Megatron's MoE
  constructors (``use_cpu_initialization`` allocates and frees a master weight and a copy per parameter, and
  freed heap chunks stay resident); a fixed threshold returns them and makes peaks repeatable to ~1 MB.
  ``--repeats`` keeps the largest peak and the median time. Times are wall times on a shared 2-core machine
  and mostly Megatron's random initialization of the MoE (``build s``), which both methods then overwrite.
  After measuring, each rank hashes its parameters: (A) and (B) must give identical weights except the router
  (both leave fp32 experts equal to the dense MLP at G=1; the routers are different random draws).

Targets (PASS/FAIL lines; exit code 0 unless ``--check`` is given and a target fails)
  * SmolLM2-sized, every rank count: increment (B) / (A) >= 1.8
  * (A) and (B) weights identical except the routers (every model, rank count, rank)

Usage: python bench/online_upcycle.py [--workdir DIR] [--only tiny|smol] [--repeats N] [--stock-malloc] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from nemo_upcycle.system import files  # noqa: E402 -- marks: this script removes only the directories it made

GB = 1e9
RATIO_TARGET = 1.8
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0)
MOE = dict(num_moe_experts=8, moe_router_topk=2)
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)


def status() -> dict[str, int]:
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in fh) if k in ("VmRSS", "VmHWM")}


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rank_child(method: str, dense: str, out: str) -> None:
    """One torchrun rank: build and fill the MoE shard by (A) or (B); write ``out/rank<r>.json``."""
    import resource

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides, enable_cpu_support
    from nemo_upcycle.engine.filler import MegatronFiller
    from nemo_upcycle.engine.model import rank_layout, upcycle_into
    from nemo_upcycle.formats.base import open_dense

    enable_cpu_support()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    src = open_dense(dense)
    common = dict(params_dtype=torch.float32, **cpu_config_overrides())
    cfg = UpcycledLlamaConfig.from_dense(src.config, **MOE, **common)
    dist.barrier()
    base = status()
    t0 = time.perf_counter()
    moe = cfg.configure_model(None)
    t_build = time.perf_counter() - t0
    dense_bytes = 0
    if method == "A":
        upcycle_into(moe, cfg, src, progress=False)
    else:  # Megatron-LM: the MoE model, then the whole dense model; load it; upcycle its state dict into the MoE
        dcfg = UpcycledLlamaConfig.from_dense(src.config, num_moe_experts=None, **common)
        t1 = time.perf_counter()
        dense_model = dcfg.configure_model(None)
        t_build += time.perf_counter() - t1
        dense_bytes = nbytes(dense_model)
        MegatronFiller(src.get, src.config, cfg.upcycle_options(), rank_layout(dense_model), num_local_experts=1,
                       padded_vocab=dcfg.vocab_size).fill(list(dense_model.named_parameters()))
        state = upcycle_state_dict([moe], [dense_model])
        moe.load_state_dict(state["model"], strict=True)
        del state, dense_model
    secs = time.perf_counter() - t0
    end = status()
    row = dict(rank=dist.get_rank(), world=world, base=base["VmRSS"], base_hwm=base["VmHWM"], hwm=end["VmHWM"],
               maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, secs=secs, build=t_build,
               shard=nbytes(moe), dense=dense_bytes, hashes={})
    for name, p in moe.named_parameters():  # after the measurement: no copies (hashes read the buffer)
        if not name.endswith("router.weight"):
            row["hashes"][name] = hashlib.sha1(p.detach().contiguous().numpy().data).hexdigest()
    Path(out, f"rank{row['rank']}.json").write_text(json.dumps(row))  # not stdout: ranks' lines interleave
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def make_models(workdir: Path, which: list[str]) -> dict[str, Path]:
    """Write the dense sources (in a child, so the parent stays small); reuse them when present."""
    out = {}
    for name in which:
        path = workdir / f"dense-{name}"
        if not path.is_dir():  # written into a marked staging directory, renamed into place (files.staging)
            print(f"writing {path} ...", flush=True)
            with files.staging(path) as tmp:
                subprocess.run([sys.executable, __file__, "--make", name, str(tmp)], check=True)
                files.publish(tmp, path, "bench-dense")
        out[name] = path
    return out


def make_child(name: str, path: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_llama

    make_llama(Path(path), tied=name == "smol", **(SMOL if name == "smol" else {}))


def launch(method: str, dense: Path, ranks: int, log: Path, stock_malloc: bool) -> tuple[list[dict], float]:
    torchrun = Path(sys.executable).with_name("torchrun")
    out = log.parent / "ranks"
    files.remove_ours(out, ("bench-ranks",))  # a previous launch's (never a directory this script did not make)
    out.mkdir()
    files.write_mark(out, "bench-ranks")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), __file__, "--rank-child", method, str(dense),
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if ranks > 1 else "2", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    if not stock_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode:
        sys.exit(f"child failed ({p.returncode}): {' '.join(cmd)}; see {log}\n{p.stderr[-3000:]}")
    rows = [json.loads(f.read_text()) for f in out.glob("rank*.json")]
    files.remove_ours(out, ("bench-ranks",))
    if len(rows) != ranks:
        sys.exit(f"expected {ranks} rank results, got {len(rows)}; see {log}")
    return sorted(rows, key=lambda r: r["rank"]), wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="keeps the dense sources between runs (default: a temp dir)")
    ap.add_argument("--only", choices=["tiny", "smol"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per case, interleaved (A, B, A, B, ...)")
    ap.add_argument("--stock-malloc", action="store_true", help="glibc's dynamic mmap threshold (noisier peaks)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--rank-child", nargs=3, metavar=("METHOD", "DENSE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank_child:
        rank_child(*a.rank_child)
        return 0
    if a.make:
        make_child(*a.make)
        return 0

    temp = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="nemo-upcycle-online-", dir="/tmp")) if temp else a.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if temp:
        files.write_mark(workdir, "bench-work")
    log = workdir / "bench.log"
    names = [a.only] if a.only else ["tiny", "smol"]
    results: dict[tuple[str, str, int], list[list[dict]]] = {}
    try:
        models = make_models(workdir, names)
        for name in names:
            for ranks in (1, 2):
                for rep, method in [(i, m) for i in range(a.repeats) for m in "AB"]:  # one launch at a time
                    print(f"{name} ({method}) x{ranks} run {rep + 1} ...", end=" ", flush=True)
                    rows, wall = launch(method, models[name], ranks, log, a.stock_malloc)
                    results.setdefault((name, method, ranks), []).append(rows)
                    print(f"{wall:.0f} s wall (incl. imports)", flush=True)
        if not temp:
            print(f"log: {log}")
    finally:
        if temp:
            files.remove_ours(workdir, ("bench-work",))

    label = {"A": "(A) online", "B": "(B) megatron"}
    print(f"\nE{MOE['num_moe_experts']} top-{MOE['moe_router_topk']}, fp32, CPU/gloo; GB = 1e9 bytes; "
          f"increment = peak RSS - RSS after imports; {a.repeats} run(s): largest peak, median seconds; "
          f"malloc: {'stock glibc' if a.stock_malloc else 'MALLOC_MMAP_THRESHOLD_=1 MiB'}")
    print(f"{'model':<7}{'method':<14}{'ranks':>5}{'rank':>5}{'base':>7}{'peak RSS':>10}{'incr':>9}{'expect':>9}"
          f"{'ru_max':>8}{'build s':>9}{'total s':>9}")
    print(f"{'':<31}{'GB':>7}{'GB':>10}{'MB':>9}{'MB':>9}{'GB':>8}")
    for (name, method, ranks), runs in results.items():
        for rank in range(ranks):
            rr = [rows[rank] for rows in runs]
            r = {**max(rr, key=lambda x: x["hwm"]),
                 **{k: statistics.median(x[k] for x in rr) for k in ("build", "secs")}}
            expect = r["shard"] if method == "A" else 2 * (r["shard"] + r["dense"])
            print(f"{name:<7}{label[method]:<14}{ranks:>5}{r['rank']:>5}{r['base'] / GB:>7.2f}{r['hwm'] / GB:>10.2f}"
                  f"{(r['hwm'] - r['base']) / 1e6:>9.1f}{expect / 1e6:>9.1f}{r['maxrss'] / GB:>8.2f}"
                  f"{r['build']:>9.1f}{r['secs']:>9.1f}")
    ok = True
    for name in names:
        for ranks in (1, 2):
            runs = results[name, "A", ranks] + results[name, "B", ranks]
            same = all(r["hashes"] == runs[0][r["rank"]]["hashes"] and r["hashes"] for rows in runs for r in rows)
            ok &= same
            print(f"{name} x{ranks}: (A) and (B) weights identical except routers"
                  f"{'':<8}{'PASS' if same else 'FAIL'}")
    if "smol" in names:
        for ranks in (1, 2):
            inc = {m: max(r["hwm"] - r["base"] for rows in results["smol", m, ranks] for r in rows) for m in "AB"}
            secs = {m: statistics.median(max(r["secs"] for r in rows) for rows in results["smol", m, ranks])
                    for m in "AB"}
            ratio = inc["B"] / inc["A"]
            ok &= ratio >= RATIO_TARGET
            print(f"smol x{ranks}: increment (B)/(A) = {inc['B'] / GB:.2f}/{inc['A'] / GB:.2f} GB = {ratio:.2f}   "
                  f"time (B)/(A) = {secs['B'] / secs['A']:.2f}   target ratio >= {RATIO_TARGET}  "
                  f"{'PASS' if ratio >= RATIO_TARGET else 'FAIL'}")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
