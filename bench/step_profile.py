"""Where a training step's time goes, dense vs MoE: forward, backward, router, token dispatch, experts, optimizer.

    python bench/step_profile.py [--layers 30] [--mbs 4] [--seq 128] [--steps 3] [--precision 32|bf16-mixed]
                                 [--experts sequential|batched|both]

SmolLM2-135M shapes (hidden 576, FFN 1536, 9 heads, 3 KV heads, vocab 49152), random weights, one gloo rank, the
Megatron-core modules and optimizer the trainer uses (local spec, DDP, Adam; bf16-mixed: bf16 module, fp32 grads
and main parameters). Models: dense, and E8 top-2 (alltoall dispatcher, aux loss) with each experts module asked
for. Steps of each model alternate (the machine is shared and noisy); medians over ``--steps``.

Sections, timed inside the real step: forward / backward time of the router (``TopKRouter``: logits, top-k, aux
loss), the token dispatch (permute, dispatch, un-permute: ``token_dispatcher`` calls) and the expert MLPs
(``experts``), or the dense MLP; the rest of the forward / backward (attention, norms, embedding, logits, loss);
the optimizer step (gradient finalisation + Adam); the metrics hooks (``engine.metrics.RouterStats``, as training
attaches them). Backward times come from identity autograd nodes placed around each section (the CPU autograd
engine runs one node at a time). FLOP rate = model FLOPs (``planning.flops``) / time, relative to the dense model's:
``rate vs dense`` over forward + backward (the goal: >= 0.85), ``whole step rate`` with the optimizer and hooks. The
optimizer is inherent to the MoE's size (it updates every expert: E/k times the MLP parameters per token), so it is
shown per parameter: equal ns/param for dense and MoE means no MoE overhead there.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections import defaultdict

import torch

HF = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


class Clock:
    """Forward / backward seconds per section of the current step."""

    def __init__(self):
        self.fwd, self.bwd, self.open = defaultdict(float), defaultdict(float), {}

    def reset(self):
        self.fwd.clear(), self.bwd.clear(), self.open.clear()


class _Mark(torch.autograd.Function):
    """Identity; its backward stamps a section's backward start (``edge="out"``) or end (``edge="in"``)."""

    @staticmethod
    def forward(ctx, x, clock, key, edge):
        ctx.clock, ctx.key, ctx.edge = clock, key, edge
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        now, c = time.perf_counter(), ctx.clock
        if ctx.edge == "out":
            c.open.setdefault(ctx.key, now)
        elif ctx.key in c.open:
            c.bwd[ctx.key[0]] += now - c.open.pop(ctx.key)
        return g, None, None, None


def _mark(obj, clock, key, edge):
    if isinstance(obj, torch.Tensor) and obj.requires_grad and obj.is_floating_point():
        return _Mark.apply(obj, clock, key, edge)
    if isinstance(obj, tuple):
        return tuple(_mark(o, clock, key, edge) for o in obj)
    return obj


def timed(obj, name: str, section: str, clock: Clock) -> None:
    """Wrap ``obj.name`` so that its forward and backward time count for ``section``."""
    fn, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        key = (section, id(obj), name, calls[0])
        args = _mark(args, clock, key, "in")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        clock.fwd[section] += time.perf_counter() - t0
        return _mark(out, clock, key, "out")

    setattr(obj, name, wrapper)


DISPATCH = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess", "token_combine",
            "combine_postprocess")


def instrument(module, clock: Clock) -> None:
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    has_moe = any(isinstance(m, MoELayer) for m in module.modules())
    for m in list(module.modules()):
        if isinstance(m, MoELayer):
            timed(m.router, "forward", "router", clock)
            for name in DISPATCH:
                timed(m.token_dispatcher, name, "dispatch", clock)
            timed(m.experts, "forward", "experts", clock)
        elif type(m) is MLP and not has_moe:
            timed(m, "forward", "mlp", clock)


def build(args, experts: int, backend: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides

    bf16 = args.precision == "bf16-mixed"
    model_parallel_cuda_manual_seed(0)
    moe = dict(num_moe_experts=None)
    if experts:
        moe = dict(num_moe_experts=experts, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                   moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss")
    cfg = UpcycledLlamaConfig.from_dense({**HF, "num_hidden_layers": args.layers, "max_position_embeddings": args.seq},
                                         params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                                         seq_length=args.seq, expert_backend=backend, **moe, **cpu_config_overrides())
    module = cfg.configure_model(None)
    if bf16:
        module = Float16Module(cfg, module)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False)
    model = DistributedDataParallel(cfg, ddp, module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, params_dtype=torch.float32,
                                                 clip_grad=1.0, use_distributed_optimizer=False), [model])
    return cfg, model, opt


def flops_per_token(args, experts: int) -> float:
    from nemo_upcycle.planning.flops import flops_per_token as fpt
    from nemo_upcycle.planning.layout import ModelDims

    dims = ModelDims(num_layers=args.layers, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                     num_query_groups=3, vocab_size=49152, share_embeddings_and_output_weights=True,
                     num_moe_experts=experts or None, moe_router_topk=2)
    return fpt(dims, args.seq)


class Run:
    """One model: its step, instrumented, and the per-step records."""

    def __init__(self, args, name: str, experts: int, backend: str):
        from nemo_upcycle.engine.metrics import RouterStats

        self.name, self.args, self.clock, self.records = name, args, Clock(), []
        self.cfg, self.model, self.opt = build(args, experts, backend)
        instrument(self.model, self.clock)
        self.stats = RouterStats(args.layers, experts, 2) if experts else None
        self.hook_seconds = [0.0]
        if self.stats:
            hook = self.stats._hook

            def timed_hook(*a):
                t0 = time.perf_counter()
                hook(*a)
                self.hook_seconds[0] += time.perf_counter() - t0

            self.stats._hook = timed_hook
            self.stats.attach([self.model])
        B, T = args.mbs, args.seq
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, HF["vocab_size"], (B, T), generator=g)
        self.pos = torch.arange(T).unsqueeze(0).expand(B, T)
        self.mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)[None, None]
        self.flops = flops_per_token(args, experts) * B * T
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        c = self.clock
        c.reset()
        self.hook_seconds[0] = 0.0
        self.model.zero_grad_buffer()
        self.opt.zero_grad()
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask, labels=self.ids)
        loss = loss.float().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.model.finish_grad_sync()
        self.opt.step()
        t3 = time.perf_counter()
        hooks = self.hook_seconds[0]
        rec = {"forward": t1 - t0 - hooks, "backward": t2 - t1, "optimizer": t3 - t2, "hooks": hooks}
        for s in ("router", "dispatch", "experts", "mlp"):
            rec[f"{s} fwd"], rec[f"{s} bwd"] = c.fwd.get(s, 0.0), c.bwd.get(s, 0.0)
        self.records.append(rec)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    ap.add_argument("--experts", choices=("sequential", "batched", "both"), default="both")
    args = ap.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_upcycle.engine.cpu import enable_cpu_support

    enable_cpu_support()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    print(f"{args.layers} layers, {args.mbs}x{args.seq} tokens, precision {args.precision}, "
          f"threads {torch.get_num_threads()}, median of {args.steps} steps (seconds)")
    dense = Run(args, "dense", 0, "sequential")
    dense.step()  # warm-up
    backends = ("sequential", "batched") if args.experts == "both" else (args.experts,)
    for backend in backends:  # one MoE at a time (30 E8 layers in fp32 with Adam: ~10 GB), alternating with dense
        moe = Run(args, f"E8 top-2, {backend}", 8, backend)
        moe.step()
        dense.records.clear()
        for i in range(args.steps):
            for r in ((dense, moe) if i % 2 == 0 else (moe, dense)):
                r.step()
        table([dense, moe])
        del moe
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def table(runs: list) -> None:
    dense = runs[0]
    keys = ["forward", "backward", "router fwd", "router bwd", "dispatch fwd", "dispatch bwd", "experts fwd",
            "experts bwd", "mlp fwd", "mlp bwd", "optimizer", "hooks"]
    w = max(len(r.name) for r in runs) + 2
    print()
    print(f"{'':16}" + "".join(f"{r.name:>{w}}" for r in runs))
    for k in keys:
        print(f"{k:16}" + "".join(f"{r.median(k):{w}.3f}" for r in runs))
    print(f"{'GFLOP / step':16}" + "".join(f"{r.flops / 1e9:{w}.1f}" for r in runs))
    print(f"{'parameters (M)':16}" + "".join(f"{r.params / 1e6:{w}.1f}" for r in runs))
    print(f"{'optim ns/param':16}" + "".join(f"{1e9 * r.median('optimizer') / r.params:{w}.2f}" for r in runs))
    fb = {r.name: r.median("forward") + r.median("backward") for r in runs}
    rate = {r.name: r.flops / fb[r.name] for r in runs}
    print(f"{'GFLOP/s fwd+bwd':16}" + "".join(f"{rate[r.name] / 1e9:{w}.1f}" for r in runs))
    print(f"{'rate vs dense':16}" + "".join(f"{rate[r.name] / rate[dense.name]:{w}.2f}" for r in runs))
    whole = {r.name: r.flops / (fb[r.name] + r.median("optimizer") + r.median("hooks")) for r in runs}
    print(f"{'whole step rate':16}" + "".join(f"{whole[r.name] / whole[dense.name]:{w}.2f}" for r in runs))


if __name__ == "__main__":
    main()
