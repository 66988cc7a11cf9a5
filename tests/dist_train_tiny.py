"""Tiny NeMo 2 MoE training runs on CPU, for tests/test_engine_cpu.py (run under torchrun, gloo).

    torchrun --standalone --nproc_per_node 2 tests/dist_train_tiny.py --plan plan.json --out results.json

The plan is a JSON list of runs, done one after the other in this process (importing NeMo is slow, so one
launch serves several configurations). A run is ``nl.Trainer(accelerator="cpu")`` +
``nl.MegatronStrategy`` + ``llm.GPTModel`` with a 2-layer MoE (4 experts, top-2, local spec) on
deterministic learnable token sequences. Run keys:
    name, ep (expert_model_parallel_size), dispatcher ("alltoall" | "allgather"), steps, lr (Adam, 3e-3),
    data_seed, data_offset (first sample index), restore (checkpoint dir; weights, as NeMo's
    RestoreConfig), restore_optim (the optimizer state too),
    save (checkpoint dir, written with trainer.save_checkpoint after the last step), dump (write weights).
Rank 0 writes ``{name: {"losses": [...], "seconds": s}}``; with ``dump`` every rank writes
``<name>.<start|end>.rank<r>.pt``: its parameters under global names (``...mlp.experts.expert<i>...``,
i = EP rank * local experts + local index), so the test can compare weights across parallel layouts.

Distributed-checkpoint saves start worker processes that re-import ``__main__``: keep the guard below.
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

SEQ, VOCAB, MBS, GBS = 32, 128, 2, 4


def sample(seed: int, index: int) -> torch.Tensor:
    """Token ids (SEQ + 1,): an arithmetic progression mod VOCAB with a random start and stride 1..3."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = torch.randint(0, VOCAB, (1,), generator=g)
    stride = torch.randint(1, 4, (1,), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def tiny_moe_config(dispatcher: str):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from nemo.collections import llm

    from nemo_upcycle.engine import cpu

    return llm.GPTConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type=dispatcher, vocab_size=VOCAB, seq_length=SEQ, normalization="RMSNorm",
        activation_func=F.silu, gated_linear_unit=True, position_embedding_type="rope", add_bias_linear=False,
        share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=False, params_dtype=torch.float32,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False,
                                                        normalization="RMSNorm"),
        **cpu.cpu_config_overrides(),
    )


def make_datamodule(seed: int, offset: int, n: int):
    import lightning.pytorch as pl
    from nemo import lightning as nl
    from torch.utils.data import DataLoader, Dataset

    causal = torch.ones(1, SEQ, SEQ, dtype=torch.bool).triu(1)  # True = masked (Megatron convention)

    class Tokens(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            t = sample(seed, offset + i)
            return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ), position_ids=torch.arange(SEQ),
                        attention_mask=causal)

    class Data(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.data_sampler = nl.MegatronDataSampler(seq_len=SEQ, micro_batch_size=MBS, global_batch_size=GBS)

        def train_dataloader(self):
            return DataLoader(Tokens(), num_workers=0)

    return Data()


def global_name(name: str, ep_rank: int, local_experts: int) -> str:
    name = name[re.search(r"(embedding|decoder|output_layer)\.", name).start():]
    return re.sub(r"local_experts\.(\d+)\.", lambda m: f"expert{ep_rank * local_experts + int(m.group(1))}.", name)


def recorder(run: dict, out_dir: Path):
    import lightning.pytorch as pl
    from megatron.core import parallel_state

    class Recorder(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(trainer.callback_metrics["reduced_train_loss"]))

        def dump(self, pl_module, when):
            if not run.get("dump"):
                return
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            local = 4 // parallel_state.get_expert_model_parallel_world_size()
            weights = {global_name(n, ep_rank, local): p.detach().clone() for n, p in pl_module.named_parameters()}
            torch.save(weights, out_dir / f"{run['name']}.{when}.rank{torch.distributed.get_rank()}.pt")

        def on_train_start(self, trainer, pl_module):  # after the strategy restored the checkpoint
            self.dump(pl_module, "start")

        def on_train_end(self, trainer, pl_module):
            self.dump(pl_module, "end")
            if run.get("save"):  # inside fit, as NeMo's ModelCheckpoint does (after fit the keys gain a prefix)
                trainer.save_checkpoint(run["save"])

    return Recorder()


def fresh_store(index: int):
    """The torchrun store under a new key prefix for each run.

    The store outlives destroy_process_group(); a re-created process group names its subgroups as before,
    finds the previous run's rendezvous keys and hangs. A prefix per run keeps them apart.
    """
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"run{index}/", base)


def train(index: int, run: dict, out_dir: Path) -> dict:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_upcycle.engine import cpu

    t0 = time.time()
    adam = OptimizerConfig(optimizer="adam", lr=run.get("lr", 3e-3), clip_grad=1.0, bf16=False,
                           use_distributed_optimizer=False)
    optim = nl.MegatronOptimizerModule(adam)
    model = llm.GPTModel(tiny_moe_config(run["dispatcher"]), optim=optim)
    restore = None
    if run.get("restore"):
        restore = nl.RestoreConfig(path=run["restore"], load_optim_state=run.get("restore_optim", False))
    strategy = nl.MegatronStrategy(expert_model_parallel_size=run["ep"], restore_config=restore,
                                   **cpu.cpu_strategy_kwargs())
    strategy.store = fresh_store(index)
    rec = recorder(run, out_dir)
    trainer = nl.Trainer(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 1)), strategy=strategy,
                         max_steps=run["steps"], callbacks=[rec], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                         plugins=nl.MegatronMixedPrecision(precision="32"))
    data = make_datamodule(run.get("data_seed", 0), run.get("data_offset", 0), n=GBS * run["steps"])
    trainer.fit(model, data)
    # Leave the process as a fresh one would be: the strategy sets up the process groups, Megatron's
    # parallel state and the microbatch calculator only when none exist (the next run may change EP and DP).
    destroy_num_microbatches_calculator()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return {"losses": rec.losses, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON file: a list of runs")
    parser.add_argument("--out", required=True, help="results JSON (rank 0); dumps go next to it")
    args = parser.parse_args()
    out = Path(args.out)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a rank hangs

    from nemo_upcycle.engine import cpu
    from nemo_upcycle.system.launcher import is_rank0

    cpu.enable_cpu_support()
    results = {}
    for index, run in enumerate(json.loads(Path(args.plan).read_text())):
        results[run["name"]] = train(index, run, out.parent)
        if is_rank0():
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
