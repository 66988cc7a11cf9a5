"""Megatron's optimizer on CPU steps with torch's fused Adam (``engine/cpu_optim.py``), and the update is torch's own
for-loop ``AdamW`` -- what megatron-core builds without the change -- up to float rounding.

Reference: ``torch.optim.AdamW`` with Megatron's hyper-parameters on copies of the same parameters and gradients.
Control: the same comparison sees a 10% different learning rate.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # imports Megatron-core

HF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=64, max_position_embeddings=8)


def _build(bf16: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides

    torch.manual_seed(0)
    cfg = UpcycledLlamaConfig.from_dense(HF, params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                                         seq_length=8, num_moe_experts=4, moe_router_topk=2, **cpu_config_overrides())
    module = cfg.configure_model(None)
    module = Float16Module(cfg, module) if bf16 else module
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=bf16), module)
    oc = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=bf16, params_dtype=torch.float32,
                         clip_grad=0.0, use_distributed_optimizer=False)
    return model, get_megatron_optimizer(oc, [model]), oc


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_adam_equals_torchs_for_loop(megatron_world, bf16):
    from nemo_upcycle.engine.cpu_optim import torch_adams

    model, opt, oc = _build(bf16)
    adams = torch_adams(opt)
    assert adams and all(g["fused"] and not g["foreach"] for a in adams for g in a.param_groups)
    mains = [p for a in adams for g in a.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in mains)
    groups = [[dict(g) for g in a.param_groups] for a in adams]
    ref = {lr: [torch.nn.Parameter(p.detach().clone()) for p in mains] for lr in (oc.lr, 1.1 * oc.lr)}
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in mains] for _ in range(3)]
    for step in grads:  # Megatron's step on the fused kernel, with these gradients as the main grads
        for p, gr in zip(mains, step):
            p.grad = gr.clone()
        for a in adams:
            a.step()
    for lr, params in ref.items():
        flat = iter(params)
        opts = [torch.optim.AdamW([{"params": [next(flat) for _ in grp["params"]], "weight_decay": grp["weight_decay"]}
                                   for grp in gs], lr=lr, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_eps)
                for gs in groups]
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            for o in opts:
                o.step()
    worst = {lr: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(mains, ps))
             for lr, ps in ref.items()}
    assert worst[oc.lr] < 1e-6 and worst[1.1 * oc.lr] > 1e-4, worst
