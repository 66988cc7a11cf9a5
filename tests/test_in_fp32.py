"""``engine.step0.in_fp32``: the fp32 view the step-0 check takes of a bf16-mixed model (needs torch only)."""

from __future__ import annotations

import torch


def test_in_fp32_keeps_ddp_gradient_hooks():
    """The step-0 check's fp32 view of a bf16 model leaves its parameters alone: a hook on a parameter's gradient
    accumulator (where Megatron's DDP adds gradients into main_grad) still fires afterwards. Control: changing the
    parameter's dtype through ``.data`` (the obvious way) silently drops that hook."""
    from nemo_upcycle.engine.step0 import in_fp32

    def fired_after(swap) -> bool:
        lin = torch.nn.Linear(4, 3).bfloat16()
        acc = lin.weight.expand_as(lin.weight).grad_fn.next_functions[0][0]  # as DDP registers it
        seen = []
        acc.register_hook(lambda *a: seen.append(1))
        swap(lin)
        assert lin.weight.dtype == torch.bfloat16
        lin(torch.randn(2, 4).bfloat16()).float().sum().backward()
        return bool(seen)

    def ours(lin):
        with in_fp32([lin]) as low:
            assert low == torch.bfloat16 and lin.weight.dtype == torch.float32
            out = lin(torch.randn(2, 4))
            assert out.dtype == torch.float32

    def data_swap(lin):
        keep = lin.weight.data
        lin.weight.data = keep.float()
        lin.weight.data = keep

    assert fired_after(ours) and not fired_after(data_swap)
