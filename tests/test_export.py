"""A trained Megatron-core MoE exported as HF Mixtral: transformers reproduces its logits, verify checks the proof.

One process, one gloo group of world size 1 (module fixture), the local spec on CPU. Each model is upcycled
from a tiny dense Llama and then trained for two Adam steps on random tokens, so it no longer computes the
dense function (checked); its vocabulary is padded (99 -> 128) as Megatron pads it. Then:
- ``MixtralForCausalLM`` on the export equals the Megatron module's logits (fp32, within 1e-5), tied and
  untied embeddings, sharded output, and a pre-softmax router (verify's recorded routing is needed: control);
- negative controls: w1/w3 swapped in one expert, or two experts swapped, break the equality;
- ``nemo-upcycle verify`` passes on the export, fails on a tampered reference and on a broken export;
- refusals: a sharded layout, a dense layer, routing HF cannot express, a mismatching dense config.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
from helpers import load_llama

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)

ATOL = 1e-5  # fp32 on CPU, the brief's tolerance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_upcycle.engine.cpu import enable_cpu_support

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this session")
    enable_cpu_support()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def megatron_logits(module, ids):
    from nemo_upcycle.engine.model import megatron_forward_logits

    return megatron_forward_logits(module, ids)


def trained_moe(dense, steps: int = 2, **moe):
    """Upcycle ``dense`` into a Megatron MoE (vocab padded to 128), then take ``steps`` Adam steps on random tokens."""
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.model import upcycle_into
    from nemo_upcycle.hf.source import open_dense

    src = open_dense(dense)
    moe = {"num_moe_experts": 4, "moe_router_topk": 2, "moe_token_dispatcher_type": "allgather", **moe}
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, vocab_size=128,
                                         **{**cpu_config_overrides(), **moe})
    module = cfg.configure_model(None)
    upcycle_into(module, cfg, src, progress=False)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(steps):
        ids = torch.randint(0, 99, (2, 17), generator=g)
        T = ids.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)[None, None]
        loss = module(input_ids=ids, position_ids=torch.arange(T)[None].expand(2, T), attention_mask=mask,
                      labels=torch.roll(ids, -1, 1))
        opt.zero_grad()
        loss.float().mean().backward()
        opt.step()
    return src, cfg, module.eval()


def export(module, cfg, src, out, ids, **kw):
    from nemo_upcycle.engine.export import export_hf_mixtral

    return export_hf_mixtral(module, cfg, out, hf_llama_config=src.config, tokenizer_dir=None, reference_ids=ids,
                             progress=False, **kw)


def hf_logits(path, recorded_routing: bool = True):
    from nemo_upcycle.verify import load_moe

    if recorded_routing:
        model = load_moe(path).eval()
    else:
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return lambda ids: model(ids).logits


@pytest.fixture(scope="module")
def untied(megatron_world, tiny_llama, tmp_path_factory, token_ids):
    src, cfg, module = trained_moe(tiny_llama)
    out = export(module, cfg, src, tmp_path_factory.mktemp("export") / "moe", token_ids, info={"steps": 2},
                 max_shard_bytes=64 << 10)
    return src, cfg, module, out


def test_export_equals_megatron(untied, tiny_llama, token_ids):
    from nemo_upcycle.engine.export import load_reference

    src, cfg, module, out = untied
    ref = megatron_logits(module, token_ids)[..., :99]
    with torch.no_grad():
        moved = (ref - load_llama(tiny_llama)(token_ids).logits).abs().max().item()
        diff = (hf_logits(out)(token_ids) - ref).abs().max().item()
    assert moved > 1e-2, f"training must move the MoE away from the dense model (max |dlogit| {moved:.2e})"
    assert diff < ATOL, f"HF Mixtral vs Megatron: max |dlogit| {diff:.2e}"
    ids, logits, meta = load_reference(out / "nemo_reference.safetensors")
    assert torch.equal(ids, token_ids) and torch.equal(logits, ref) and meta["megatron_dtype"] == "float32"
    c = json.loads((out / "config.json").read_text())
    assert c["vocab_size"] == 99 and c["num_local_experts"] == 4 and c["tie_word_embeddings"] is False
    assert c["trained"]["steps"] == 2 and c["trained"]["padded_vocab_size"] == 128
    assert c["upcycling"]["norm_topk_prob"] is True
    assert (out / "model.safetensors.index.json").is_file()  # 64 KiB shards: several files + index
    assert not list(out.parent.glob(".moe.tmp-*"))


def test_negative_controls_swapped_weights(untied, token_ids, tmp_path):
    """w1 <-> w3 of one expert, or experts 0 <-> 1 of one layer: the export no longer equals the module."""
    from safetensors.torch import load_file, save_file

    _, _, module, out = untied
    ref = megatron_logits(module, token_ids)[..., :99]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.1.block_sparse_moe.experts."
    for name, pairs in [("w1w3", [(p + "2.w1.weight", p + "2.w3.weight")]),
                        ("experts", [(f"{p}0.{w}.weight", f"{p}1.{w}.weight") for w in ("w1", "w2", "w3")])]:
        bad = tmp_path / name
        bad.mkdir()
        tensors = {}
        for f in set(index.values()):
            tensors.update(load_file(out / f))
        for a, b in pairs:
            tensors[a], tensors[b] = tensors[b], tensors[a]
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
        (bad / "config.json").write_text((out / "config.json").read_text())
        with torch.no_grad():
            diff = (hf_logits(bad)(token_ids) - ref).abs().max().item()
        assert diff > 1e-3, f"{name}: a broken export must differ (max |dlogit| {diff:.2e})"


def test_verify_cli_trained_export(untied, tiny_llama, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from nemo_upcycle.cli import main

    out = untied[3]
    assert main(["verify", str(tiny_llama), str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "trained export" in text and "dense model" in text
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    ref = load_file(tampered / "nemo_reference.safetensors")
    ref["logits"][0, 3, 5] += 0.01
    save_file(ref, tampered / "nemo_reference.safetensors", metadata={"format": "pt", "megatron_dtype": "float32"})
    assert main(["verify", str(tiny_llama), str(tampered)]) == 1
    assert "FAIL" in capsys.readouterr().out
    (tampered / "nemo_reference.safetensors").write_bytes(b"junk")
    assert main(["verify", str(tiny_llama), str(tampered)]) == 2


def test_tied_embeddings_and_tokenizer(megatron_world, tiny_llama_tied, tmp_path, token_ids):
    src, cfg, module = trained_moe(tiny_llama_tied)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "config.json").write_text("{}")
    from nemo_upcycle.engine.export import export_hf_mixtral

    out = export_hf_mixtral(module, cfg, tmp_path / "moe", hf_llama_config=src.config, tokenizer_dir=tok,
                            reference_ids=token_ids, progress=False)
    c = json.loads((out / "config.json").read_text())
    assert c["tie_word_embeddings"] is True and (out / "tokenizer.json").read_text() == "{}"
    with torch.no_grad():
        diff = (hf_logits(out)(token_ids) - megatron_logits(module, token_ids)[..., :99]).abs().max().item()
    assert diff < ATOL, f"tied: max |dlogit| {diff:.2e}"


def test_pre_softmax_routing_is_recorded(megatron_world, tiny_llama, tmp_path, token_ids):
    """softmax then top-k, no renormalization: only the recorded routing reproduces Megatron (control: HF default)."""
    src, cfg, module = trained_moe(tiny_llama, moe_router_pre_softmax=True)
    out = export(module, cfg, src, tmp_path / "moe", token_ids)
    ref = megatron_logits(module, token_ids)[..., :99]
    with torch.no_grad():
        assert (hf_logits(out)(token_ids) - ref).abs().max().item() < ATOL
        assert (hf_logits(out, recorded_routing=False)(token_ids) - ref).abs().max().item() > 1e-3


def test_refusals(untied, tiny_llama, tmp_path, token_ids):
    from nemo_upcycle.engine.export import export_hf_mixtral, unwrap
    from nemo_upcycle.errors import UpcycleError

    src, cfg, module, _ = untied
    target = tmp_path / "moe"

    def refused(match, config=cfg, hf=src.config, mod=module, **kw):
        with pytest.raises(UpcycleError, match=match):
            export_hf_mixtral(mod, config, target, hf_llama_config=hf, progress=False, **kw)
        assert not target.exists() and not list(tmp_path.glob(".moe.tmp-*"))

    for field, value in [("expert_model_parallel_size", 2), ("tensor_model_parallel_size", 2)]:
        sharded = copy.copy(cfg)
        setattr(sharded, field, value)
        refused("export from a 1-rank process", config=sharded)
    scaled = copy.copy(cfg)
    scaled.moe_router_topk_scaling_factor = 2.5
    refused("moe_router_topk_scaling_factor set: HF Mixtral cannot express", config=scaled)
    refused("hidden_size=36 but hf_llama_config says 48", hf={**src.config, "hidden_size": 48})
    refused("reference_ids hold ids outside", reference_ids=token_ids + 100)
    _, dense_cfg, dense_first = trained_moe(tiny_llama, steps=0, moe_layer_freq=[0, 1, 1])
    refused(r"layer 0 is dense \(moe_layer_freq=\[0, 1, 1\]\)", config=dense_cfg, mod=dense_first)
    # unwrap: NeMo-style wrappers (a ModuleList of one LightningModule-like holder of DDP-like .module)
    holder = torch.nn.Module()
    holder.module = torch.nn.Module()
    holder.module.module = module
    assert unwrap(torch.nn.ModuleList([holder])) is module
    with pytest.raises(UpcycleError, match="2 pipeline chunks"):
        unwrap(torch.nn.ModuleList([holder, holder]))
    with pytest.raises(UpcycleError, match="no Megatron GPTModel"):
        unwrap(torch.nn.Linear(1, 1))
