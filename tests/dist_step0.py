"""Online-upcycled tiny-recipe runs at several layouts in one torchrun launch, for tests/test_step0_layouts.py.

    torchrun --standalone --nproc_per_node 2 tests/dist_step0.py --plan plan.json --work DIR

Each run is what ``train.py --config-name=tiny_llama_upcycle <overrides>`` does in mode=train (the recipe composed
and validated, then ``apps.training.train``: the dense source made, the recipe's ``llm.train`` Partial built and
called, step0.json written by the step-0 check), into ``DIR/<name>/``, one after the other in this process
(importing NeMo costs ~25 s a process). Run keys: ``name``, ``overrides`` (Hydra overrides on top of the ones below),
``perturb`` (optional ``{"layer", "expert", "rank", "scale"}``: right after online upcycling, global rank ``rank``
multiplies the down projection of its copy (or expert-tensor shard) of ``expert`` in global ``layer`` by
``1 + scale`` and writes ``<name>/perturbed.json``; the negative control of the step-0 check). Rank 0 writes
``DIR/results.json``: ``{name: {"seconds": s}}``.

Distributed-checkpoint saves start worker processes that re-import ``__main__``: keep the guard below.
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

BASE = ["trainer.max_steps=1", "trainer.checkpoint_every_n_steps=0", "logging.export_hf=false"]


def perturbing(upcycle_into, spec: dict, out: Path):
    """``engine.model.upcycle_into`` that then perturbs one expert on one rank (when ``spec``); that rank writes
    ``out/perturbed.json`` (so a plan naming a rank that does not hold the expert is seen)."""
    from nemo_upcycle.engine.step0 import moe_layers
    from nemo_upcycle.system.launcher import rank

    def wrapped(module, config, source, **kw):
        n = upcycle_into(module, config, source, **kw)
        if spec and rank() == spec["rank"]:
            for moe in moe_layers([module]):
                if moe.layer_number - 1 == spec["layer"] and spec["expert"] in moe.local_expert_indices:
                    j = list(moe.local_expert_indices).index(spec["expert"])
                    w = moe.experts.local_experts[j].linear_fc2.weight
                    with torch.no_grad():
                        w.mul_(1.0 + spec["scale"])
                    (out / "perturbed.json").write_text(json.dumps({**spec, "done_on": rank()}))
        return n

    return wrapped


def fresh_store(index: int):
    """The torchrun store under a new key prefix for each run (a re-created process group would otherwise find the
    previous run's rendezvous keys and hang; see tests/dist_train_tiny.py)."""
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"run{index}/", base)


def one_run(index: int, run: dict, work: Path) -> dict:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    import nemo_upcycle.engine.build as build_mod
    import nemo_upcycle.engine.model as model_mod
    from nemo_upcycle.apps.training import train
    from nemo_upcycle.config.compose import compose

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = compose("tiny_llama_upcycle", [*BASE, f"parallel.devices={world}", *run.get("overrides", [])])
    out = work / run["name"]
    out.mkdir(parents=True, exist_ok=True)
    stock_build, stock_upcycle = build_mod.build, model_mod.upcycle_into

    def build(partial):
        fn = stock_build(partial)
        fn.keywords["trainer"].strategy.store = fresh_store(index)
        return fn

    build_mod.build, model_mod.upcycle_into = build, perturbing(stock_upcycle, run.get("perturb"), out)
    t0 = time.time()
    try:
        train(cfg, out)
    finally:
        build_mod.build, model_mod.upcycle_into = stock_build, stock_upcycle
    destroy_num_microbatches_calculator()  # leave the process as a fresh one would be (the next run's layout)
    get_moe_layer_wise_logging_tracker().clear()  # sized by the first run's layer count
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return {"seconds": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON file: a list of runs")
    parser.add_argument("--work", required=True, help="run directories and results.json go here")
    args = parser.parse_args()
    work = Path(args.work)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a rank hangs

    from nemo_upcycle.system.launcher import is_rank0

    results = {}
    for index, run in enumerate(json.loads(Path(args.plan).read_text())):
        results[run["name"]] = one_run(index, run, work)
        if is_rank0():
            (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
