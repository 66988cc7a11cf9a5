"""Parallel layouts through the real engine, on CPU ranks (gloo), for tests/test_layouts.py.

    torchrun --standalone --nproc_per_node N tests/dist_layouts.py --plan plan.json --out results.json

As ``train.py mode=train`` does: the tiny recipe (``tiny_llama_upcycle``) composed with the run's Hydra overrides,
``engine.partial.train_partial`` -> ``UpcycledLlamaModel(upcycle_from=<random tiny dense HF Llama>)`` (online
upcycling), the local spec, ``nl.MegatronStrategy`` and ``llm.train``; only the callbacks are this file's (no step-0
check, metrics file or export: they are other tests' subjects), validation and checkpoints are off. The runs of a
plan are done one after the other in this process (importing NeMo is slow); the world (the torchrun processes) is
the same for all of them. Run keys:
    name, overrides (Hydra overrides, e.g. ``parallel.tensor_model_parallel_size=2``), steps,
    dump (a list of "start" / "end": every rank writes its parameters before step 1 / after the last step under
    global names, ``<name>.<when>.rank<r>.pt``),
    grads (the same for the gradients of step 1, ``<name>.grads.rank<r>.pt``; clipped when ``optim.clip_grad`` is),
    wrong_shard ({"rank": r, "param": <local name>}: rank r fills that parameter with the shard of tensor-, expert-
    and expert-tensor-parallel rank 0 instead of its own, after the upcycling: the negative control),
    stock_expert_grads (true: without ``spec.reduce_expert_grads_over_expert_groups``, as megatron-core 0.15.3 is).
Rank 0 writes ``{name: {"losses": [...], "grad_norms": [...], "seconds": s}}`` after each run.

Distributed-checkpoint workers re-import ``__main__``: keep the guard below.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
import time
from pathlib import Path

import torch

RECIPE = "tiny_llama_upcycle"
BASE = ["trainer.checkpoint_every_n_steps=0", "logging.tensorboard=false", "logging.report=false",
        "logging.export_hf=false"]


def chunks(trainer) -> list:
    """This rank's Megatron GPT modules, one per virtual-pipeline chunk."""
    from nemo_upcycle.engine.export import unwrap

    return [unwrap(c) for c in trainer.strategy.megatron_parallel]


def global_named(trainer, attr: str = "data") -> dict[str, torch.Tensor]:
    """This rank's parameters (or ``main_grad``s) under global names: the layer number from the layer itself (PP / VP
    offsets), expert ``local_experts.j`` -> ``local_experts.<EP rank x local experts + j>``; TP / ETP shards as held."""
    from megatron.core import parallel_state as ps

    out = {}
    for module in chunks(trainer):
        layers = module.decoder.layers
        for name, p in module.named_parameters():
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if m:
                layer = layers[int(m.group(1))]
                name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None and ".local_experts." in name:
                    n_local = len(experts.local_experts)
                    first = ps.get_expert_model_parallel_rank() * n_local
                    name = re.sub(r"local_experts\.(\d+)\.",
                                  lambda e: f"local_experts.{first + int(e.group(1))}.", name)
            t = p.detach() if attr == "data" else getattr(p, attr, None)
            if t is not None:
                out[name] = t.detach().clone()
    return out


def rank_info() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
            "rank": torch.distributed.get_rank()}


def fill_wrong_shard(trainer, config, source: str, param: str) -> None:
    """Refill ``param`` (a local name of the first chunk holding it) with the shard of TP / EP / ETP rank 0."""
    from nemo_upcycle.engine.filler import MegatronFiller
    from nemo_upcycle.engine.model import rank_layout
    from nemo_upcycle.formats.base import open_dense

    for module in chunks(trainer):
        params = dict(module.named_parameters())
        if param in params:
            here = rank_layout(module)
            wrong = type(here)(tp_size=here.tp_size, ep_size=here.ep_size, etp_size=here.etp_size,
                               layer_offset=here.layer_offset)
            src = open_dense(source)
            filler = MegatronFiller(src.get, src.config, config.upcycle_options(), wrong,
                                    num_local_experts=config.num_moe_experts // here.ep_size,
                                    padded_vocab=config.vocab_size)
            with torch.no_grad():
                params[param].copy_(filler.tensor(param))
            return
    raise KeyError(f"no parameter {param} on rank {torch.distributed.get_rank()}")


def recorder(run: dict, out_dir: Path, source: str):
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        def __init__(self):
            self.losses, self.grad_norms = [], []

        def save(self, what: str, tensors: dict) -> None:
            torch.save({"tensors": tensors, **rank_info()},
                       out_dir / f"{run['name']}.{what}.rank{torch.distributed.get_rank()}.pt")

        def on_train_start(self, trainer, pl_module):
            wrong = run.get("wrong_shard")
            if wrong and torch.distributed.get_rank() == wrong["rank"]:
                fill_wrong_shard(trainer, pl_module.config, source, wrong["param"])
            if "start" in run.get("dump", ()):
                self.save("start", global_named(trainer))

        def on_train_end(self, trainer, pl_module):
            if "end" in run.get("dump", ()):
                self.save("end", global_named(trainer))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.losses.append(float(m["reduced_train_loss"]))
            if "grad_norm" in m:
                self.grad_norms.append(float(m["grad_norm"]))
            if run.get("grads") and len(self.losses) == 1:
                self.save("grads", global_named(trainer, "main_grad"))

    return Recorder()


def fresh_store(index: int):
    """The torchrun store under a new key prefix for each run (a re-created process group would find the previous
    run's rendezvous keys and hang)."""
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"run{index}/", base)


def train(index: int, run: dict, work: Path) -> dict:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.data.sources import make_tiny_llama
    from nemo_upcycle.engine import config
    from nemo_upcycle.engine.build import build
    from nemo_upcycle.engine.partial import train_partial

    t0 = time.time()
    stock = config.reduce_expert_grads_over_expert_groups
    if run.get("stock_expert_grads"):
        config.reduce_expert_grads_over_expert_groups = lambda model, cfg: 0
    world = int(os.environ.get("WORLD_SIZE", 1))
    r = compose(RECIPE, [*BASE, f"parallel.devices={world}", f"trainer.max_steps={run['steps']}",
                         *run.get("overrides", [])])
    out_dir = work / run["name"]
    source = make_tiny_llama(r.model, work / f"dense_L{r.model.num_layers}", r.seed)  # as model.source=tiny does
    partial = train_partial(r, out_dir, str(source))
    partial.trainer.callbacks = []
    partial.trainer.limit_val_batches = 0
    fn = build(partial)
    trainer = fn.keywords["trainer"]
    rec = recorder(run, work, str(source))
    trainer.callbacks.append(rec)
    trainer.strategy.store = fresh_store(index)
    try:
        fn()
    finally:
        config.reduce_expert_grads_over_expert_groups = stock
    # leave the process as a fresh one: the next run's layout and layer count differ
    destroy_num_microbatches_calculator()
    get_moe_layer_wise_logging_tracker().clear()  # per-layer aux-loss buffers sized for this run's layers
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return {"losses": rec.losses, "grad_norms": rec.grad_norms, "seconds": round(time.time() - t0, 1)}


def uneven_collectives(rank: int, port: int, out: str) -> None:
    """tests/test_layouts.py's check of ``engine.cpu``'s uneven gather / reduce-scatter (torch.multiprocessing worker):
    rank r contributes 3 + 2r rows of value r + 1 (uneven, as tokens routed per rank)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = torch.distributed.group.WORLD
    sizes = [3, 5]
    mine = torch.full((sizes[rank], 2), float(rank + 1))
    result = {}
    try:
        torch.distributed.all_gather(list(torch.empty(8, 2).split(sizes)), mine, group=group)
    except RuntimeError as e:  # control: what megatron-core's uneven gather does on gloo
        result["stock_error"] = str(e)

    def refuse(*args, **kwargs):
        raise AssertionError("the uneven case must not reach the stock function")

    from nemo_upcycle.engine import cpu

    gather, reduce_scatter = cpu._even_collectives(refuse, refuse)
    gathered = gather(mine, group, output_split_sizes=sizes)
    full = torch.arange(16, dtype=torch.float32).reshape(8, 2) * (rank + 1)  # each rank's contribution
    scattered = reduce_scatter(full, group, input_split_sizes=sizes)
    result.update(gathered=gathered.tolist(), scattered=scattered.tolist())
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON file: a list of runs")
    parser.add_argument("--out", required=True, help="results JSON (rank 0); dumps and run directories go next to it")
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
