"""Cost of MetricsLogger's router hooks: forward + backward of a Megatron MoE on CPU with and without them.

    python bench/metrics_overhead.py [--layers 2] [--seq 256] [--mbs 2] [--reps 5]

SmolLM2-135M-shaped layers (hidden 576, FFN 1536, 9 heads, 3 KV heads; vocab cut to 2048 so that the MoE
layers, not the logits, make the step) upcycled to E8 top-2, random weights, fp32, one gloo rank. The hook
recomputes the router logits (tokens x hidden x E) for the entropy and sums the routing map: about
E / (k * 3 * FFN) of the expert matmuls. Steps alternate (with, without) to share the machine's load; the
table gives the median per step and, less sensitive to a busy machine, the time spent inside the hooks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _world import close_world, one_rank_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.metrics import RouterStats

    one_rank_world()
    model_parallel_cuda_manual_seed(0)
    hf = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=2048, max_position_embeddings=args.seq)
    cfg = UpcycledLlamaConfig.from_dense(hf, params_dtype=torch.float32, seq_length=args.seq, num_moe_experts=8,
                                         moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                                         **cpu_config_overrides())
    module = cfg.configure_model(None).train()
    B, T = args.mbs, args.seq
    ids = torch.randint(0, 2048, (B, T), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T).unsqueeze(0).expand(B, T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)[None, None]

    def step() -> float:
        t0 = time.perf_counter()
        out = module(input_ids=ids, position_ids=pos, attention_mask=mask, labels=ids)
        out.float().mean().backward()
        module.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up
    stats = RouterStats(cfg.num_layers, 8, 2)
    inside = []
    hook = stats._hook

    def timed_hook(*a):
        t0 = time.perf_counter()
        hook(*a)
        inside.append(time.perf_counter() - t0)

    stats._hook = timed_hook
    with_hooks, without = [], []
    for r in range(args.reps):  # alternate which goes first: a busy machine drifts
        for hooked in ((True, False) if r % 2 == 0 else (False, True)):
            if hooked:
                stats.attach([module])
                with_hooks.append(step())
                stats.detach()
            else:
                without.append(step())
    a, b = statistics.median(with_hooks), statistics.median(without)
    print(f"{args.layers} layers, {B}x{T} tokens, E8 top-2, threads {torch.get_num_threads()}")
    print(f"{'':14}{'median s/step':>14}")
    print(f"{'without hooks':14}{b:14.4f}")
    print(f"{'with hooks':14}{a:14.4f}")
    share = 100 * sum(inside) / sum(with_hooks)
    print(f"in the hooks  {sum(inside) / args.reps:14.4f}  ({share:.2f}% of the steps with hooks)")
    print(f"overhead      {100 * (a - b) / b:+.2f}% of the median step (analytic: logits "
          f"{B * T * 576 * 8 / 1e6:.1f} M MACs per layer vs experts {B * T * 2 * 3 * 576 * 1536 / 1e9:.2f} G)")
    close_world()


if __name__ == "__main__":
    main()
