"""The NeMo engine at step 0: a Megatron-core MoE built by NeMo from ``UpcycledLlamaConfig`` and filled from
the dense checkpoint computes transformers' dense ``LlamaForCausalLM`` logits (fp32, CPU, within 1e-5).

One process, one gloo group of world size 1 (module fixture). The per-rank filler is also checked at TP=2 /
EP=2 / ETP=2 without launching ranks: the shards of all ranks put together equal the single-rank tensors, and
the q/k/v merge equals NeMo's own ``TransformFns.merge_qkv``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import build_moe as build
from helpers import free_port, load_llama

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)


def logits(module, ids):
    from nemo_upcycle.engine.model import megatron_forward_logits

    return megatron_forward_logits(module, ids)


@pytest.mark.stack
@pytest.mark.parametrize("moe", [dict(num_moe_experts=8, moe_router_topk=2),
                                 dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall"),
                                 dict(num_moe_experts=8, moe_router_topk=2, upcycle_granularity=2),
                                 dict(num_moe_experts=8, moe_router_topk=4, upcycle_granularity=4)],
                         ids=["E8k2", "E4k2-alltoall", "E8k2G2", "E8k4G4"])
def test_step0_logits_equal_dense(megatron_world, tiny_llama, token_ids, moe):
    from nemo_upcycle.engine.model import upcycle_into

    src, cfg, module = build(tiny_llama, **moe)
    upcycle_into(module, cfg, src, progress=False)
    ref = load_llama(tiny_llama)(token_ids).logits
    diff = (logits(module, token_ids) - ref).abs().max().item()
    assert diff < 1e-5, f"{moe}: max |dlogit| {diff:.2e}"


@pytest.mark.stack
def test_step0_tied_and_negative_controls(megatron_world, tiny_llama_tied, token_ids):
    from nemo_upcycle.engine.model import upcycle_into

    ref = load_llama(tiny_llama_tied)(token_ids).logits
    src, cfg, module = build(tiny_llama_tied)
    upcycle_into(module, cfg, src, progress=False)
    assert (logits(module, token_ids) - ref).abs().max().item() < 1e-5
    with torch.no_grad():  # negative control 1: one expert perturbed
        module.decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.weight.mul_(1.05)
    assert (logits(module, token_ids) - ref).abs().max().item() > 1e-3
    src, cfg, module = build(tiny_llama_tied, upcycle_granularity=2, moe_router_topk=2, upcycle_scaling="megatron")
    upcycle_into(module, cfg, src, progress=False)  # negative control 2: megatron scaling is not exact for SiLU
    assert (logits(module, token_ids) - ref).abs().max().item() > 1e-3


def test_filler_shards_reassemble(tiny_llama):
    """Every TP / EP / ETP rank's shard, put back together, equals the single-rank tensor."""
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.engine.filler import MegatronFiller, RankLayout
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(tiny_llama)
    opts = UpcycleOptions(4, 2, granularity=2)

    def filler(**lay):
        ep = lay.get("ep_size", 1)
        return MegatronFiller(src.get, src.config, opts, RankLayout(**lay), num_local_experts=4 // ep, padded_vocab=100)

    one = filler()
    tp = [filler(tp_rank=r, tp_size=2) for r in range(2)]
    for name, dim in [("decoder.layers.1.self_attention.linear_qkv.weight", 0),
                      ("decoder.layers.1.self_attention.linear_proj.weight", 1),
                      ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0)]:
        assert torch.equal(torch.cat([f.tensor(name) for f in tp], dim), one.tensor(name)), name
    assert one.tensor("embedding.word_embeddings.weight")[99:].abs().sum() == 0  # padded vocab row
    ep = [filler(ep_rank=r, ep_size=2) for r in range(2)]
    for e in range(4):
        name = f"decoder.layers.2.mlp.experts.local_experts.{e % 2}.linear_fc1.weight"
        assert torch.equal(ep[e // 2].tensor(name),
                           one.tensor(f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc1.weight"))
    etp = [filler(etp_rank=r, etp_size=2) for r in range(2)]
    fc1 = [f.tensor("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight") for f in etp]
    full = one.tensor("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight")
    gate, up = full.chunk(2)
    assert torch.equal(torch.cat([fc1[0].chunk(2)[0], fc1[1].chunk(2)[0]]), gate)
    assert torch.equal(torch.cat([fc1[0].chunk(2)[1], fc1[1].chunk(2)[1]]), up)
    grouped = one.tensor("decoder.layers.0.mlp.experts.linear_fc1.weight3")  # TE grouped-GEMM naming
    assert torch.equal(grouped, full)
    with pytest.raises(KeyError):
        one.tensor("decoder.layers.0.mlp.something_else.weight")


def test_merge_qkv_equals_nemo(tiny_llama):
    from nemo.lightning.io.state import TransformFns

    from nemo_upcycle.formats.keymap import merge_qkv, split_qkv

    g = torch.Generator().manual_seed(0)
    H, KV, hd, D = 6, 2, 5, 7
    q, k, v = (torch.randn(n * hd, D, generator=g) for n in (H, KV, KV))
    ctx = SimpleNamespace(target=SimpleNamespace(config=SimpleNamespace(
        num_attention_heads=H, num_query_groups=KV, kv_channels=hd, hidden_size=D)))
    ours = merge_qkv(q, k, v, H, KV)
    assert torch.equal(ours, TransformFns.merge_qkv(ctx, q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(ours, H, KV), (q, k, v)))
    assert not torch.equal(merge_qkv(k.repeat(3, 1), q[: KV * hd], v, H, KV), ours)  # negative control


def test_bad_dense_source_and_layout(megatron_world, tiny_llama):
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.model import check_dense_matches, check_parallel_layout
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(tiny_llama)
    cfg = UpcycledLlamaConfig.from_dense({**src.config, "hidden_size": 48})
    with pytest.raises(UpcycleError, match="hidden_size=36 but the MoE config says 48"):
        check_dense_matches(src, cfg)
    good = UpcycledLlamaConfig.from_dense(src.config, num_moe_experts=6, moe_router_topk=2)
    with pytest.raises(UpcycleError, match="expert_model_parallel_size=4 does not divide num_moe_experts=6"):
        check_parallel_layout(good, tp=1, ep=4)
    with pytest.raises(UpcycleError, match="tensor_model_parallel_size=4 does not divide num_attention_heads=6"):
        check_parallel_layout(good, tp=4, ep=1)
    with pytest.raises(UpcycleError, match="need sequence_parallel=true"):  # MoE with TP needs SP (megatron-core)
        check_parallel_layout(good, tp=2, ep=3)
    good.sequence_parallel = True  # the config the strategy hands over (MegatronStrategy(sequence_parallel=True))
    check_parallel_layout(good, tp=2, ep=3)
    with pytest.raises(UpcycleError, match="does not divide ffn_hidden_size"):
        UpcycledLlamaConfig.from_dense(src.config, upcycle_granularity=3)
    with pytest.raises(UpcycleError, match="moe_router_topk=1 needs moe_router_pre_softmax"):
        UpcycledLlamaConfig.from_dense(src.config, moe_router_topk=1)
    with pytest.raises(UpcycleError, match="unknown config field"):
        UpcycledLlamaConfig.from_dense(src.config, num_experts=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine spec and grouped GEMM need a CUDA GPU")
def test_te_spec_grouped_gemm_on_gpu(tiny_llama, token_ids):
    """On a GPU: the TE spec with grouped-GEMM experts (TEGroupedMLP) upcycled the same way matches the dense model."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.model import upcycle_into
    from nemo_upcycle.engine.spec import resolve_backend
    from nemo_upcycle.formats.base import open_dense

    assert resolve_backend("auto") == "te"
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)
        src = open_dense(tiny_llama)
        cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, spec_backend="te",
                                             moe_token_dispatcher_type="alltoall")
        module = cfg.configure_model(None).cuda().eval()
        assert cfg.moe_grouped_gemm and any("experts.linear_fc1.weight0" in n for n, _ in module.named_parameters())
        upcycle_into(module, cfg, src, progress=False)
        ids = token_ids.cuda()
        ref = load_llama(tiny_llama).cuda()(ids).logits
        assert (logits(module, ids) - ref).abs().max().item() < 1e-4  # TF32 / TE kernels on GPU
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
