"""A trained Megatron-core MoE exported as HF Mixtral: transformers reproduces its logits, verify checks the proof.

One process, one gloo group of world size 1 (module fixture), the local spec on CPU. Each model is upcycled
from a tiny dense Llama and then trained for two Adam steps on random tokens, so it no longer computes the
dense function (checked); its vocabulary is padded (99 -> 128) as Megatron pads it. Then:
- ``MixtralForCausalLM`` on the export equals the Megatron module's logits (fp32, within 1e-5), tied and
  untied embeddings, sharded output, and a pre-softmax router (verify's recorded routing is needed: control);
- negative controls: w1/w3 swapped in one expert, or two experts swapped, break the equality;
- ``nemo-upcycle verify`` passes on the export, fails on a tampered reference and on a broken export;
- refusals: a sharded layout, a dense layer, routing HF cannot express, a mismatching dense config;
- from a NeMo 2 checkpoint (``export_checkpoint``: streamed from the distributed checkpoint, the reference logits from
  the model built on one rank): a fresh process (this file run as a script) saves a trained model with a NeMo trainer
  (``nemo_save``) and exports the checkpoint after teardown; this process exports the same checkpoint again in its
  own world; both equal the saved model's logits. Checkpoints saved at other layouts: tests/test_export_stream.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_llama

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)

ATOL = 1e-5  # fp32 on CPU, the brief's tolerance


def megatron_logits(module, ids):
    from nemo_upcycle.engine.model import megatron_forward_logits

    return megatron_forward_logits(module, ids)


def trained_moe(dense, steps: int = 2, **moe):
    """Upcycle ``dense`` into a Megatron MoE (vocab padded to 128), then take ``steps`` Adam steps on random tokens."""
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.model import upcycle_into
    from nemo_upcycle.formats.base import open_dense

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
    from nemo_upcycle.offline.verify import load_moe

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


@pytest.mark.stack
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

    from nemo_upcycle.apps.cli import main

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
    llama31 = {**src.config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    refused(r"scale_factor \(Llama 3.1 RoPE\)=None but hf_llama_config says 8.0", hf=llama31)
    as_gguf = {**src.config, "rms_norm_eps": torch.tensor(1e-5).item()}  # a GGUF's float32 eps is accepted
    assert export_hf_mixtral(module, cfg, tmp_path / "ok", hf_llama_config=as_gguf, progress=False).is_dir()
    _, dense_cfg, dense_first = trained_moe(tiny_llama, steps=0, moe_layer_freq=[0, 1, 1], export_format="mixtral")
    refused(r"logging.export_format mixtral cannot hold this model: the MoE covers 2 of 3 layers and HF Mixtral has no "
            r"dense layers; use logging.export_format qwen2_moe", config=dense_cfg, mod=dense_first)
    # unwrap: NeMo-style wrappers (a ModuleList of one LightningModule-like holder of DDP-like .module)
    holder = torch.nn.Module()
    holder.module = torch.nn.Module()
    holder.module.module = module
    assert unwrap(torch.nn.ModuleList([holder])) is module
    with pytest.raises(UpcycleError, match="2 pipeline chunks"):
        unwrap(torch.nn.ModuleList([holder, holder]))
    with pytest.raises(UpcycleError, match="no Megatron GPTModel"):
        unwrap(torch.nn.Linear(1, 1))


def test_export_replaces_only_its_own_output(untied, tmp_path, token_ids):
    """overwrite=True (what a training run passes for RUN/hf_mixtral) replaces an export or convert output (mark, or
    an older output without one); a directory holding a user's files is refused and left byte for byte."""
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.system.files import MARK

    src, cfg, module, _ = untied
    out = export(module, cfg, src, tmp_path / "moe", None)
    assert json.loads((out / MARK).read_text())["kind"] == "export"
    with pytest.raises(UpcycleError, match="already exists; choose another output or pass --overwrite"):
        export(module, cfg, src, out, None)
    (out / MARK).unlink()  # an export from before marks: recognised by its files
    assert export(module, cfg, src, out, token_ids, overwrite=True) == out
    assert (out / "nemo_reference.safetensors").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("a user's file")
    (user / "config.json").write_text((out / "config.json").read_text())
    for target in (user, tmp_path):  # a foreign directory; the directory holding other outputs
        before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
        with pytest.raises(UpcycleError, match="did not write|holds"):
            export(module, cfg, src, target, None, overwrite=True)
        assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob(".*.old-*"))


# ---------------------------------------------------------------------------------------------- from a checkpoint


def save_trained_checkpoint(work: Path) -> None:
    """Run as a script (fresh process): a NeMo trainer saves a perturbed upcycled MoE, then the checkpoint is
    exported."""
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.base import teardown
    from nemo.lightning.io.connector import ModelConnector

    from helpers import make_llama
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides, cpu_strategy_kwargs, enable_cpu_support
    from nemo_upcycle.engine.export import export_checkpoint
    from nemo_upcycle.engine.model import UpcycledLlamaModel, megatron_forward_logits
    from nemo_upcycle.formats.base import open_dense

    enable_cpu_support()
    src = open_dense(make_llama(work / "dense"))
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, vocab_size=128, num_moe_experts=4,
                                         moe_router_topk=2, **cpu_config_overrides())
    model = UpcycledLlamaModel(cfg, upcycle_from=str(work / "dense"))
    trainer = Trainer(devices=1, accelerator="cpu",
                      strategy=MegatronStrategy(ckpt_save_optimizer=False, **cpu_strategy_kwargs()))
    trainer.state.fn = TrainerFn.FITTING
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    model.configure_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": every weight moves
        for p in model.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 99, (2, 23), generator=g)
    torch.save({"ids": ids, "logits": megatron_forward_logits(model.module.eval(), ids)[..., :99]}, work / "ref.pt")
    ckpt = work / "tiny--step=3"
    ModelConnector.nemo_save(None, ckpt, trainer)
    teardown(trainer, model)
    export_checkpoint(ckpt, work / "hf", hf_llama_config=src.config, reference_ids=ids, progress=False)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ckpt")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0 and (work / "hf").is_dir(), r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.mark.stack
def test_export_from_nemo_checkpoint(megatron_world, saved_checkpoint, tmp_path):
    from nemo_upcycle.apps.cli import main
    from nemo_upcycle.engine.export import export_checkpoint

    work = saved_checkpoint
    ref = torch.load(work / "ref.pt")
    again = export_checkpoint(work / "tiny--step=3", tmp_path / "hf", hf_llama_config=json.loads(
        (work / "dense" / "config.json").read_text()), progress=False)  # this process: its world is reused
    with torch.no_grad():
        moved = (ref["logits"] - load_llama(work / "dense")(ref["ids"]).logits).abs().max().item()
        for out in (work / "hf", again):
            diff = (hf_logits(out)(ref["ids"]) - ref["logits"]).abs().max().item()
            assert diff < ATOL, f"{out}: max |dlogit| {diff:.2e}"
    assert moved > 1e-2
    c = json.loads((work / "hf" / "config.json").read_text())
    assert c["trained"]["steps"] == 3 and c["trained"]["checkpoint"].endswith("tiny--step=3")
    assert main(["verify", str(work / "dense"), str(work / "hf")]) == 0


def test_export_module_entry_point_on_cpu(saved_checkpoint, tmp_path):
    """``python -m nemo_upcycle.engine.export CKPT OUT`` in a fresh process without CUDA (it crashed with "Torch not
    compiled with CUDA enabled": the seed call ran before the CPU support); the export equals the saved model."""
    work = saved_checkpoint
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "nemo_upcycle.engine.export", str(work / "tiny--step=3"), str(out),
                        "--dense-config", str(work / "dense" / "config.json")],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"wrote {out}"
    ref = torch.load(work / "ref.pt")
    with torch.no_grad():
        diff = (hf_logits(out)(ref["ids"]) - ref["logits"]).abs().max().item()
    assert diff < ATOL, f"max |dlogit| {diff:.2e}"
    assert not list(tmp_path.glob(".hf.tmp-*"))


if __name__ == "__main__":
    save_trained_checkpoint(Path(sys.argv[1]))
