"""``engine.experts.BatchedMLP`` against Megatron-core's own ``SequentialMLP`` (the reference nobody here wrote).

Same weights (the state dict loads across), same dispatched tokens: outputs and every gradient agree within fp32
rounding for balanced, uneven and empty-expert loads, and within bf16 rounding in bf16; the weights enter the
batched product as views of the parameters (no copy) and stay correct when a parameter is re-allocated. Negative
controls: two experts' weights swapped, or the routing probabilities dropped, are caught by the same comparison.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # imports Megatron-core (~10 s)

HF = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128, max_position_embeddings=16)


def _experts(backend: str, dtype=torch.float32):
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides

    torch.manual_seed(0)
    cfg = UpcycledLlamaConfig.from_dense(HF, params_dtype=dtype, bf16=dtype == torch.bfloat16, seq_length=16,
                                         num_moe_experts=6, moe_router_topk=2, expert_backend=backend,
                                         **cpu_config_overrides())
    return cfg.configure_model(None).decoder.layers[0].mlp.experts


@pytest.fixture(scope="module")
def pair(megatron_world):
    seq, bat = _experts("sequential"), _experts("batched")
    bat.load_state_dict(seq.state_dict())
    return seq, bat


def _run(experts, counts, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), HF["hidden_size"], generator=g).to(dtype).requires_grad_()
    probs = torch.rand(sum(counts), generator=g)
    experts.zero_grad(set_to_none=True)
    out, bias = experts(x, torch.tensor(counts), probs)
    assert bias is None
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in experts.named_parameters()}
    return out.detach().float(), x.grad.float().clone(), grads


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _worst(r_bat, r_seq) -> float:
    (o1, x1, g1), (o2, x2, g2) = r_bat, r_seq
    assert g1.keys() == g2.keys()
    return max([_rel(o1, o2), _rel(x1, x2)] + [_rel(g1[k], g2[k]) for k in g2])


@pytest.mark.parametrize("counts", [[4, 4, 4, 4, 4, 4], [6, 5, 6, 0, 6, 4], [2, 3, 2, 3, 2, 3]])
def test_batched_equals_sequential(pair, counts):
    from nemo_upcycle.engine.experts import BatchedMLP

    seq, bat = pair
    assert isinstance(bat, BatchedMLP) and type(seq).__name__ == "SequentialMLP"
    assert bat.state_dict().keys() == seq.state_dict().keys()
    calls = []
    orig = torch.bmm
    with pytest.MonkeyPatch.context() as mp:  # the batched path ran (not the per-expert fallback)
        mp.setattr(torch, "bmm", lambda *a: calls.append(1) or orig(*a))
        got = _run(bat, counts)
    assert calls
    assert _worst(got, _run(seq, counts)) < 1e-5


def test_uneven_load_falls_back_to_the_loop(pair):
    seq, bat = pair
    counts = [9, 1, 0, 0, 2, 0]  # padding would be 2/3 of the rows
    calls = []
    orig = torch.bmm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", lambda *a: calls.append(1) or orig(*a))
        got = _run(bat, counts)
    assert not calls and _worst(got, _run(seq, counts)) < 1e-6


def test_negative_controls(pair):
    seq, bat = pair
    counts = [4, 4, 4, 4, 4, 4]
    ref = _run(seq, counts)
    w = [e.linear_fc1.weight for e in bat.local_experts]
    with torch.no_grad():  # experts 0 and 1 swapped
        a = w[0].clone()
        w[0].copy_(w[1])
        w[1].copy_(a)
    try:
        assert _worst(_run(bat, counts), ref) > 1e-2
    finally:
        bat.load_state_dict(seq.state_dict())
    with pytest.MonkeyPatch.context() as mp:  # the routing probabilities not applied
        mp.setattr(bat, "forward", lambda x, t, p: type(bat).forward(bat, x, t, torch.ones_like(p)))
        assert _worst(_run(bat, counts), ref) > 1e-2
    assert _worst(_run(bat, counts), ref) < 1e-5


def test_weights_enter_without_copy_and_survive_reallocation(pair):
    from nemo_upcycle.engine.experts import stacked

    seq, bat = pair
    w = [e.linear_fc2.weight for e in bat.local_experts]
    s = stacked(w)
    assert s.data_ptr() == w[0].data_ptr() and torch.equal(s[3], w[3])
    keep = w[2].data
    w[2].data = w[2].data.clone()  # as a cast or a re-allocating wrapper would
    try:
        assert stacked(w).data_ptr() != w[0].data_ptr()  # now a copy, still right:
        assert _worst(_run(bat, [3, 5, 4, 4, 2, 6]), _run(seq, [3, 5, 4, 4, 2, 6])) < 1e-5
    finally:
        w[2].data = keep


def test_bf16_within_bf16_rounding(megatron_world):
    seq, bat = _experts("sequential", torch.bfloat16), _experts("batched", torch.bfloat16)
    bat.load_state_dict(seq.state_dict())
    counts = [5, 3, 4, 6, 2, 4]
    # each side rounds its products to bf16 (8 bits): a few 2^-8 relative apart at most
    assert _worst(_run(bat, counts, dtype=torch.bfloat16), _run(seq, counts, dtype=torch.bfloat16)) < 3e-2


def test_resolve(monkeypatch):
    from nemo_upcycle.engine.experts import resolve
    from nemo_upcycle.errors import UpcycleError

    assert resolve("auto") == "batched" and resolve("sequential") == "sequential"
    monkeypatch.setenv("NEMO_UPCYCLE_EXPERTS", "sequential")
    assert resolve("auto") == "sequential"
    monkeypatch.setenv("NEMO_UPCYCLE_EXPERTS", "grouped")
    with pytest.raises(UpcycleError, match="not one of"):
        resolve("auto")


def test_bf16_fused_weight_gradients_are_bit_identical(megatron_world):
    """bf16-mixed (``gradient_accumulation_fusion``): each expert's weight gradient is added into its fp32 main_grad
    from that expert's own rows by the function the linear layers call, so it equals SequentialMLP's bit for bit."""
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides

    def build(backend):
        torch.manual_seed(0)
        cfg = UpcycledLlamaConfig.from_dense(HF, params_dtype=torch.bfloat16, bf16=True, seq_length=16,
                                             num_moe_experts=6, moe_router_topk=2, expert_backend=backend,
                                             **{**cpu_config_overrides(), "gradient_accumulation_fusion": True})
        experts = cfg.configure_model(None).decoder.layers[0].mlp.experts
        for p in experts.parameters():
            p.main_grad, p.grad_added_to_main_grad = torch.zeros(p.shape), False
        return experts

    seq, bat = build("sequential"), build("batched")
    bat.load_state_dict(seq.state_dict())
    counts = [5, 3, 4, 6, 0, 4]
    got = {}
    for name, experts in (("seq", seq), ("bat", bat)):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(sum(counts), HF["hidden_size"], generator=g).bfloat16().requires_grad_()
        out, _ = experts(x, torch.tensor(counts), torch.rand(sum(counts), generator=g))
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        got[name] = {n: p.main_grad.clone() for n, p in experts.named_parameters()}
        assert all(p.grad_added_to_main_grad for p in experts.parameters())
    assert got["seq"].keys() == got["bat"].keys()
    assert all(torch.equal(got["seq"][k], got["bat"][k]) for k in got["seq"])
    assert any(got["seq"][k].abs().sum() > 0 for k in got["seq"])
    k = next(iter(got["seq"]))  # control: the comparison sees a changed gradient
    assert not torch.equal(got["seq"][k], got["bat"][k] * (1 + 2 ** -7))

