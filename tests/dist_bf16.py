"""bf16-mixed training through the real engine on CPU ranks (gloo), for tests/test_bf16.py.

    torchrun --standalone --nproc_per_node N tests/dist_bf16.py --plan plan.json --out results.json

As ``train.py mode=train`` does: the tiny recipe (``tiny_llama_upcycle``) composed with the run's Hydra overrides,
``engine.partial.train_partial`` (NeMo's precision plugin, ``UpcycledLlamaModel`` upcycled online from a random tiny
dense HF Llama, the recipe's callbacks: step-0 check, ``metrics.jsonl``, HF export) and ``llm.train``; validation is
off. The runs of a plan are done one after the other in this process (importing NeMo is slow); the world (the torchrun
processes) is the same for all of them. Run keys:
    name, overrides (Hydra overrides), steps, run_dir (a name under the work directory; the same name again resumes
    it, as ``hydra.run.dir`` does), stop_after (end ``fit`` after that step, as a finished shorter run would: the
    checkpoints of ``trainer.checkpoint_every_n_steps`` and the last one are written),
    export_bf16 (also export the trained module with ``dtype=torch.bfloat16`` to ``<run_dir>/hf_mixtral_bf16``),
    config (model config fields set after the recipe, e.g. ``{"gradient_accumulation_fusion": false}``).
Rank 0 writes ``{name: {"losses", "grad_norms", "steps", "seconds", "dtypes"}}`` after each run; ``dtypes``: what the
run trained with (module parameters, Megatron optimizer classes, its main parameters, the DDP gradient buffers).

Distributed-checkpoint workers re-import ``__main__``: keep the guard below.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import time
from pathlib import Path

import torch

RECIPE = "tiny_llama_upcycle"
BASE = ["logging.tensorboard=false", "logging.report=false"]


def dtypes(trainer, pl_module) -> dict:
    """The dtypes a run trains with: module parameters, Megatron optimizers (their main parameters), DDP buffers."""
    from nemo_upcycle.engine.export import unwrap

    mcore = getattr(trainer.optimizers[0], "mcore_optimizer", None)
    optims = getattr(mcore, "chained_optimizers", None) or [mcore]
    main = {str(p.dtype) for o in optims for g in getattr(o, "fp32_from_float16_groups", []) for p in g}
    grads = {str(p.main_grad.dtype) for p in pl_module.parameters() if getattr(p, "main_grad", None) is not None}
    cfg, ddp = pl_module.config, trainer.strategy.ddp_config
    return {"params": sorted({str(p.dtype) for p in unwrap(pl_module.module).parameters()}),
            "optimizers": sorted({type(o).__name__ for o in optims}), "main_params": sorted(main),
            "main_grads": sorted(grads), "wrappers": _wrappers(pl_module.module),
            "config": {"params_dtype": str(cfg.params_dtype), "bf16": cfg.bf16,
                       "pipeline_dtype": str(cfg.pipeline_dtype),
                       "gradient_accumulation_fusion": cfg.gradient_accumulation_fusion,
                       "optim_bf16": pl_module.optim.config.bf16, "grad_reduce_in_fp32": ddp.grad_reduce_in_fp32},
            "precision": str(trainer.precision)}


def _wrappers(module) -> list:
    names = []
    while module is not None:
        names.append(type(module).__name__)
        module = module[0] if isinstance(module, list) else getattr(module, "module", None)
    return names


def recorder(run: dict, run_dir: Path):
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        def __init__(self):
            self.losses, self.grad_norms, self.steps, self.dtypes = [], [], [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.losses.append(float(m["reduced_train_loss"]))
            self.grad_norms.append(float(m["grad_norm"]) if "grad_norm" in m else None)
            self.steps.append(int(trainer.global_step))
            if self.dtypes is None:
                self.dtypes = dtypes(trainer, pl_module)
            if run.get("stop_after") and trainer.global_step >= run["stop_after"]:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            if run.get("export_bf16") and torch.distributed.get_rank() == 0:
                export_bf16(trainer, pl_module, run_dir)

    return Recorder()


def export_bf16(trainer, pl_module, run_dir: Path) -> None:
    """The trained module exported again with ``dtype=torch.bfloat16``, on the lifecycle's reference windows."""
    from nemo_upcycle.engine.export import export_hf_mixtral, unwrap
    from nemo_upcycle.engine.lifecycle import UpcycleLifecycle

    life = next(c for c in trainer.callbacks if isinstance(c, UpcycleLifecycle))
    export_hf_mixtral(unwrap(pl_module.module), pl_module.config, run_dir / "hf_mixtral_bf16",
                      hf_llama_config=life._dense_config(), reference_ids=life.check_ids, dtype=torch.bfloat16,
                      overwrite=True, progress=False, info={"steps": int(trainer.global_step)})


def fresh_store(index: int):
    """The torchrun store under a new key prefix for each run (a re-created process group would find the previous
    run's rendezvous keys and hang)."""
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"run{index}/", base)


def train(index: int, run: dict, work: Path) -> dict:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.data.sources import make_tiny_llama
    from nemo_upcycle.engine.build import build
    from nemo_upcycle.engine.partial import train_partial

    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", 1))
    r = compose(RECIPE, [*BASE, f"parallel.devices={world}", f"trainer.max_steps={run['steps']}",
                         *run.get("overrides", [])])
    run_dir = work / run.get("run_dir", run["name"])
    source = make_tiny_llama(r.model, work / "dense_tiny", r.seed)  # as model.source=tiny does
    partial = train_partial(r, run_dir, str(source))
    partial.trainer.limit_val_batches = 0
    for k, v in run.get("config", {}).items():  # model config fields set by hand (the tests' controls)
        setattr(partial.model.config, k, v)
    fn = build(partial)
    trainer = fn.keywords["trainer"]
    rec = recorder(run, run_dir)
    trainer.callbacks.insert(0, rec)
    trainer.strategy.store = fresh_store(index)
    fn()
    destroy_num_microbatches_calculator()  # leave the process as a fresh one (the next run's layout differs)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return {"losses": rec.losses, "grad_norms": rec.grad_norms, "steps": rec.steps, "dtypes": rec.dtypes,
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON file: a list of runs")
    parser.add_argument("--out", required=True, help="results JSON (rank 0); run directories go next to it")
    args = parser.parse_args()
    out = Path(args.out)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a rank hangs

    from nemo_upcycle.engine import cpu
    from nemo_upcycle.system.launcher import is_rank0

    if not torch.cuda.is_available():
        cpu.enable_cpu_support()
    results = {}
    for index, run in enumerate(json.loads(Path(args.plan).read_text())):
        results[run["name"]] = train(index, run, out.parent)
        if is_rank0():
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
