"""Routed experts as batched matrix products on the CPU, behind Megatron's expert interface.

Megatron's local spec runs the experts as ``SequentialMLP`` (megatron/core/transformer/moe/experts.py): one small
GEMM per expert and projection. On a CPU those small GEMMs run at well under half the rate of one large product of
the same FLOPs (``bench/step_profile.py``), and torch's ``_grouped_mm`` falls back to such a loop on the CPU (and
its backward fails there in torch 2.13). ``BatchedMLP`` is a ``SequentialMLP`` -- the same parameters, state dict,
sharded checkpoint and hooks, so the filler, the step-0 check and the export see no difference -- whose forward
computes every local expert in one ``torch.bmm`` per projection over the tokens padded to the busiest expert's
count; the weights enter the product without a copy (``stacked``: the experts' weights are re-homed at build time as
views of one [E, out, in] tensor). Numerically it is ``SequentialMLP``'s math (fc1, GLU, x routing probability, fc2)
with the sums of another GEMM kernel: equal to it within fp32 rounding; each expert's weight gradient is computed on
its own rows as the linear layer does, and under ``gradient_accumulation_fusion`` (bf16-mixed) added into
``main_grad`` in fp32 by the same function: bit-identical there (tests/test_experts.py).

It falls back to ``SequentialMLP.forward`` where that does more than local products: expert-tensor parallelism
inside the expert linears (EP = 1 with ETP > 1), biases, fp8, non-GLU or clamped activations, and loads so uneven
that padding would waste more than it saves (``MAX_PAD_WASTE``). ``resolve`` picks the experts module: ``batched``
on the local spec unless the config field ``expert_backend`` or ``NEMO_UPCYCLE_EXPERTS`` says ``sequential``.
"""

from __future__ import annotations

import os

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from nemo_upcycle.errors import UpcycleError

EXPERT_BACKENDS = ("auto", "sequential", "batched")
MAX_PAD_WASTE = 0.5  # padded rows / all rows above which the per-expert loop is cheaper


def resolve(requested: str = "auto") -> str:
    """"sequential" | "batched": the local spec's experts module."""
    requested = os.environ.get("NEMO_UPCYCLE_EXPERTS", requested) or "auto"
    if requested not in EXPERT_BACKENDS:
        raise UpcycleError(f"expert backend {requested!r} is not one of {', '.join(EXPERT_BACKENDS)}.")
    return "batched" if requested == "auto" else requested


def stacked(weights: list) -> torch.Tensor:
    """[E, out, in] from E equally shaped weights, without autograd: a view when they sit at equal strides in one
    storage (as ``rehome`` lays them out), else a copy, so any later re-allocation stays correct."""
    w0 = weights[0]
    step = w0.numel()
    with torch.no_grad():
        if all(w.shape == w0.shape and w.dtype == w0.dtype and w.is_contiguous()
               and w.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr()
               and w.storage_offset() == w0.storage_offset() + i * step for i, w in enumerate(weights)):
            return w0.detach().as_strided((len(weights), *w0.shape), (step, *w0.stride()), w0.storage_offset())
        return torch.stack([w.detach() for w in weights])


class _ExpertsLinear(torch.autograd.Function):
    """y[e] = x[e] W[e]^T for every local expert e at once. Forward and input gradient are batched GEMMs over the
    padded rows; each expert's weight gradient is computed on its own rows only (``counts``), as Megatron's linear
    layer computes it (megatron/core/tensor_parallel/layers.py, ``LinearWithGradAccumulationAndAsyncCommunication``):
    ``grad_output^T input``, or -- with ``gradient_accumulation_fusion`` and a ``main_grad`` -- added into
    ``main_grad`` by the same ``fused_weight_gradient_mlp_cuda`` function the linear layers call (on CPU the fp32
    stand-in of ``engine.cpu_mixed``), returning the placeholder gradient that tells DDP it is already added."""

    @staticmethod
    def forward(ctx, x, counts, fuse, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.counts, ctx.fuse = counts, fuse
        return torch.bmm(x, stacked(list(weights)).transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        from megatron.core.tensor_parallel import layers

        x, *weights = ctx.saved_tensors
        gx = torch.bmm(g, stacked(weights))
        grads = []
        for i, w in enumerate(weights):
            gi, xi = g[i, :ctx.counts[i]], x[i, :ctx.counts[i]]
            if ctx.fuse and hasattr(w, "main_grad"):
                accum = layers.fused_weight_gradient_mlp_cuda
                add = accum.wgrad_gemm_accum_fp32 if w.main_grad.dtype == torch.float32 else accum.wgrad_gemm_accum_fp16
                add(xi, gi, w.main_grad)
                placeholder = hasattr(w, "grad_added_to_main_grad")
                if placeholder:
                    w.grad_added_to_main_grad = True
                grads.append(torch.empty(w.main_grad.shape, dtype=x.dtype, device=x.device) if placeholder else None)
            else:
                grads.append(gi.t().matmul(xi))
        return (gx, None, None, *grads)


def rehome(params: list) -> None:
    """Re-allocate equally shaped parameters as consecutive views of one tensor (values kept, identity kept)."""
    with torch.no_grad():
        buf = torch.stack([p.data for p in params])
        for i, p in enumerate(params):
            p.data = buf[i]


class BatchedMLP(SequentialMLP):
    """``SequentialMLP`` whose local experts run as batched products (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if self.num_local_experts > 1:
            rehome([e.linear_fc1.weight for e in self.local_experts])
            rehome([e.linear_fc2.weight for e in self.local_experts])

    def _batchable(self) -> bool:
        c, e = self.config, self.local_experts[0]
        return (self.num_local_experts > 1 and not c.fp8 and c.gated_linear_unit and not c.add_bias_linear
                and not c.use_te_activation_func and not c.bias_activation_fusion
                and c.activation_func_clamp_value is None and c.glu_linear_offset == 0
                and e.linear_fc1.tp_group.size() == 1 and e.linear_fc2.tp_group.size() == 1)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        if self.config.moe_apply_probs_on_input or not self._batchable():
            return super().forward(hidden, tokens_per_expert, probs)
        counts = tokens_per_expert.tolist()
        E, n, total = len(counts), max(counts), sum(counts)
        if n == 0 or E * n - total > MAX_PAD_WASTE * E * n:
            return super().forward(hidden, tokens_per_expert, probs)
        D = hidden.shape[-1]
        if all(c == n for c in counts):
            x, p, rows = hidden.reshape(E, n, D), probs.reshape(E, n), None
        else:  # expert e's j-th token goes to padded row e * n + j
            starts = torch.tensor([0] + counts[:-1]).cumsum(0)
            expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
            rows = expert * n + torch.arange(total) - starts[expert]
            rows = rows.to(hidden.device)
            x = hidden.new_zeros(E * n, D).index_copy(0, rows, hidden.reshape(total, D)).view(E, n, D)
            p = probs.new_zeros(E * n).index_copy(0, rows, probs.reshape(total)).view(E, n)
        fuse = self.config.gradient_accumulation_fusion
        h = _ExpertsLinear.apply(x, counts, fuse, *(m.linear_fc1.weight for m in self.local_experts))
        gate, linear = torch.chunk(h, 2, dim=-1)
        a = self.config.activation_func(gate) * linear
        a = (a * p.unsqueeze(-1)).to(a.dtype)  # MLP.forward: x per-token scale, back to the activation's dtype
        out = _ExpertsLinear.apply(a, counts, fuse, *(m.linear_fc2.weight for m in self.local_experts))
        out = out.reshape(E * n, D)
        return (out if rows is None else out.index_select(0, rows)), None


def experts_module(backend: str):
    """The experts class of the local spec for a resolved backend."""
    return BatchedMLP if backend == "batched" else SequentialMLP
