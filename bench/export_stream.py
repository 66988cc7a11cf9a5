#!/usr/bin/env python
"""Benchmark: the HF export streamed from a NeMo distributed checkpoint far larger than its memory.

What it does
  * Dense source: the random Llama-3.2-1B-shaped checkpoint of ``bench/convert.py`` (hidden 2048, FFN 8192, 16
    layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings, llama3 rope scaling, bf16, 2.5 GB), reused from
    ``--workdir``.
  * Checkpoint (child process, not measured against the target): the upcycled E8 top-2 Megatron-core model is
    built on the meta device as one rank (``UpcycledLlamaConfig.from_dense``, the local spec), each parameter bound
    to the dense tensor the key table gives it (every expert of a layer shares one [gate; up] and one down tensor:
    copy upcycling, so the process holds about the dense model, not the MoE; the router is drawn, std 0.02), then
    saved with Megatron's ``dist_checkpointing.save`` (torch_dist) plus a NeMo ``context/`` (``TrainerContext``
    ``io_dump``): 13.7 GB of bf16 weights on disk, as a training run would save them.
  * Export (child process, measured): ``python -m nemo_upcycle.engine.export CKPT OUT --dense-config ...
    --dtype bfloat16`` (``engine.export_stream``): wall time, peak RSS (VmHWM polled from /proc every 20 ms, as
    ``bench/convert.py``) and peak anonymous RSS. The process imports NeMo (~1 GB) to read the checkpoint's context.
  * Tensor check (this process, one tensor at a time): every exported tensor equals the dense tensor it was
    upcycled from (attention, norms, embeddings; w1 / w3 / w2 of every expert = the dense gate / up / down), the
    router has its shape.
  * ``nemo-upcycle verify DENSE OUT`` (child): transformers loads both models in fp32, so the full-size pair would
    need ~33 GB; it runs on a ``--verify-layers``-layer model of the same widths (made, saved and exported the same
    way). The export has no reference logits (no model at hand), so verify compares it with the dense model: the
    step-0 check, which a checkpoint at step 0 passes.

Target (PASS/FAIL; exit 1 with ``--check`` when missed): peak RSS of the export < 2 GB while the checkpoint holds
~10 GB or more. Disk: the source (2.5 GB, kept with ``--workdir``) + checkpoint and export (13.7 GB each), removed at
the end; every directory carries the project's mark and is removed with ``files.remove_ours``.

Usage: python bench/export_stream.py [--workdir DIR] [--layers 16] [--verify-layers 2] [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RSS_TARGET = 2e9
GB = 1e9
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
from nemo_upcycle.system.files import remove_ours, write_mark  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_convert", Path(__file__).with_name("convert.py"))
bench_convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_convert)  # the dense source generator and /proc polling of bench/convert.py


def build_child(dense: Path, ckpt: Path, experts: int, topk: int) -> None:
    """Save the copy-upcycled MoE of ``dense`` as a NeMo 2 checkpoint (module docstring); holds ~the dense model."""
    import torch
    from megatron.core import dist_checkpointing
    from nemo import lightning as nl
    from nemo.lightning.io.pl import TrainerContext

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides, enable_cpu_support
    from nemo_upcycle.engine.export import one_rank_world
    from nemo_upcycle.engine.model import UpcycledLlamaModel
    from nemo_upcycle.formats.base import open_dense
    from nemo_upcycle.formats.keymap import KEYMAP, Sizes, hf_values

    enable_cpu_support()
    src = open_dense(dense)
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.bfloat16, num_moe_experts=experts,
                                         moe_router_topk=topk, **cpu_config_overrides())
    cfg.spec_backend = "local"
    with one_rank_world():
        with torch.device("meta"):
            module = cfg.configure_model(None)
        padded = module.embedding.word_embeddings.weight.shape[0]
        sizes = Sizes.of(hf_values(src.config, rope=False), padded)
        g, shared = torch.Generator().manual_seed(0), {}
        for name, p in list(module.named_parameters()):
            hit = KEYMAP.megatron(name)
            made = hit.row.hf[0].made_from
            if made == "router":
                t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
            elif made is not None:  # an expert: the dense MLP of its layer, one tensor shared by all experts
                key = (hit.layer, hit.row.transform)
                if key not in shared:
                    dense_parts = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
                    parts = [src.get(f"model.layers.{hit.layer}.{dense_parts[t.made_from]}.weight") for t in hit.row.hf]
                    shared[key] = hit.row.to_megatron(parts, sizes)
                t = shared[key]
            else:
                t = hit.row.to_megatron([src.get(h.key(hit.layer)) for h in hit.row.hf], sizes)
            owner, leaf = module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._parameters[leaf] = torch.nn.Parameter(t.to(p.dtype), requires_grad=False)
        (ckpt / "weights").mkdir(parents=True)
        write_mark(ckpt, "bench-checkpoint")
        dist_checkpointing.save(module.sharded_state_dict(prefix="module."), str(ckpt / "weights"))
    trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    TrainerContext(model=UpcycledLlamaModel(cfg), trainer=trainer, extra={}).io_dump(ckpt / "context",
                                                                                      yaml_attrs=["model"])


def measure(cmd: list[str], log: Path) -> dict:
    """Run one child: wall seconds, peak RSS, peak anonymous RSS, exit code."""
    rss = anon = 0
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while p.poll() is None:
            st = bench_convert.proc_status(p.pid)
            rss, anon = max(rss, st.get("VmHWM", 0), st.get("VmRSS", 0)), max(anon, st.get("RssAnon", 0))
            time.sleep(0.02)
    return {"secs": time.perf_counter() - t0, "rss": rss, "anon": anon, "code": p.returncode}


def check_tensors(dense: Path, out: Path) -> tuple[int, int]:
    """(tensors equal to their dense source, tensors checked) of an export of a copy-upcycled checkpoint."""
    import re

    import torch
    from safetensors import safe_open

    from nemo_upcycle.formats.base import open_dense

    src = open_dense(dense)
    cfg = json.loads((out / "config.json").read_text())
    dense_of = {"w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}
    same = checked = 0
    for f in sorted(out.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.(gate|experts\.\d+\.(w[123]))\.weight", k)
                checked += 1
                if m and m.group(2) == "gate":
                    same += t.shape == (cfg["num_local_experts"], cfg["hidden_size"])
                elif m:
                    same += torch.equal(t, src.get(f"model.layers.{m.group(1)}.{dense_of[m.group(3)]}.weight"))
                else:
                    same += torch.equal(t, src.get(k))
    return same, checked


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_case(workdir: Path, layers: int, experts: int, topk: int, log: Path) -> dict:
    """Source, checkpoint, streamed export of one size; returns the measurements (outputs left for the caller)."""
    dense = bench_convert.generate(workdir, layers)
    ckpt, out = workdir / f"ckpt-L{layers}", workdir / f"hf-L{layers}"
    remove_ours(ckpt, ("bench-checkpoint",))
    remove_ours(out, ("export",))
    print(f"L{layers}: saving the E{experts} checkpoint ...", end=" ", flush=True)
    build = measure([sys.executable, os.path.abspath(__file__), "--build-child", str(dense), str(ckpt),
                     str(experts), str(topk)], log)
    if build["code"]:
        sys.exit(f"checkpoint build failed; see {log}")
    os.sync()
    print(f"{build['secs']:.0f} s; exporting ...", end=" ", flush=True)
    exp = measure([sys.executable, "-m", "nemo_upcycle.engine.export", str(ckpt), str(out), "--dense-config",
                   str(dense / "config.json"), "--dtype", "bfloat16"], log)
    if exp["code"]:
        sys.exit(f"export failed; see {log}")
    print(f"{exp['secs']:.0f} s", flush=True)
    weights = du(ckpt / "weights")
    return {"layers": layers, "dense": dense, "ckpt": ckpt, "out": out, "build": build, "export": exp,
            "ckpt_bytes": weights, "out_bytes": du(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="keeps the dense sources between runs (default: a temp dir in /tmp)")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers of the measured model (16: Llama-3.2-1B)")
    ap.add_argument("--verify-layers", type=int, default=2, help="decoder layers of the model verify runs on")
    ap.add_argument("--experts", "-E", type=int, default=8)
    ap.add_argument("--topk", "-k", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    ap.add_argument("--build-child", nargs=4, metavar=("DENSE", "CKPT", "E", "K"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.build_child:
        build_child(Path(a.build_child[0]), Path(a.build_child[1]), int(a.build_child[2]), int(a.build_child[3]))
        return 0
    temp = a.workdir is None
    if temp:
        workdir = Path(tempfile.mkdtemp(prefix="nemo-upcycle-bench-", dir="/tmp"))
        write_mark(workdir, "bench")
    else:
        workdir = a.workdir.absolute()
        workdir.mkdir(parents=True, exist_ok=True)
    log, cases = workdir / "export_stream.log", []
    try:
        big = export_case(workdir, a.layers, a.experts, a.topk, log)
        t0 = time.perf_counter()
        same, checked = check_tensors(big["dense"], big["out"])
        big["check"] = (same, checked, time.perf_counter() - t0)
        cases.append(big)
        for d in ("ckpt", "out"):  # free the disk before the small case
            remove_ours(big[d], ("bench-checkpoint", "export"))
        small = export_case(workdir, a.verify_layers, a.experts, a.topk, log)
        small["verify"] = measure([sys.executable, "-m", "nemo_upcycle.apps.cli", "verify", str(small["dense"]),
                                   str(small["out"])], log)
        cases.append(small)
    finally:
        for c in cases:
            for d in ("ckpt", "out"):
                remove_ours(c[d], ("bench-checkpoint", "export"))
        if temp:
            remove_ours(workdir, ("bench",))

    print(f"\nLlama-3.2-1B-shaped dense -> E{a.experts} top-{a.topk}, bf16; log {log}")
    print(f"{'layers':>6}{'ckpt GB':>9}{'out GB':>8}{'save s':>8}{'export s':>10}{'GB/s':>7}{'peak RSS':>10}"
          f"{'peak anon':>11}  check")
    for c in cases:
        e = c["export"]
        if "check" in c:
            same, checked, secs = c["check"]
            check = f"{same}/{checked} tensors equal the dense source ({secs:.0f} s)"
        else:
            v = c["verify"]
            check = (f"nemo-upcycle verify: exit {v['code']} ({'PASS' if v['code'] == 0 else 'FAIL'}), "
                     f"{v['secs']:.0f} s, peak RSS {v['rss'] / GB:.1f} GB")
        print(f"{c['layers']:>6}{c['ckpt_bytes'] / GB:>9.2f}{c['out_bytes'] / GB:>8.2f}{c['build']['secs']:>8.0f}"
              f"{e['secs']:>10.0f}{c['out_bytes'] / e['secs'] / GB:>7.2f}{e['rss'] / GB:>10.2f}{e['anon'] / GB:>11.2f}"
              f"  {check}")
    rss, weights = cases[0]["export"]["rss"], cases[0]["ckpt_bytes"]
    same, checked, _ = cases[0]["check"]
    ok = rss < RSS_TARGET and same == checked and cases[1]["verify"]["code"] == 0
    print(f"\npeak RSS of the export {rss / GB:.2f} GB with {weights / GB:.1f} GB of weights in the checkpoint: "
          f"target < {RSS_TARGET / GB:.0f} GB, every tensor checked, verify PASS: {'PASS' if ok else 'FAIL'}")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
