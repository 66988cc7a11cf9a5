"""Export at any size: the HF export streamed from a distributed checkpoint (``engine.export_stream``), and at the end
of training split over ranks (``engine.export_scale``).

Fast (no NeMo): the stored key of every key-table row; a synthetic checkpoint (written with torch's distributed
checkpoint, Megatron's stored names and stacking) read back region by region equals the HF tensors it was made from;
an incomplete checkpoint (a chunk missing) and an unread stored tensor are refused; the reference windows' budget;
the end-of-training export takes only a checkpoint saved at the final step.

Slow: ``train.py`` under torchrun at 2 ranks (tiny recipe, 4 layers, 2 steps, a checkpoint at step 2) at EP2,
PP2 x VP2 and TP2 + SP. Each run ends with rank 0 streaming its final checkpoint into ``RUN/hf_mixtral`` with
reference logits from the live ranks. Checked per layout:
- every tensor of that export equals (torch.equal) the 1-rank export of the same checkpoint (the whole model built
  in one process, Megatron's resharding load, ``export_hf_mixtral``) and the CLI's streamed export;
- the live ranks' reference logits equal the 1-rank model's on the same windows within 1e-5 (fp32; TP sums
  partial products in another order: ~1e-7 seen);
- ``nemo-upcycle verify DENSE RUN/hf_mixtral`` passes (transformers reproduces the live ranks' logits);
- negative control: the checkpoint with one stored expert chunk tampered (one element, rewritten in place of the
  saved one) streams into an export that differs in exactly that HF tensor and fails verify.
The same at EP2 with a gated shared expert and MoE on every other layer: the run exports HF Qwen2-MoE, and the
checkpoint stores its layers one by one (Megatron does not stack heterogeneous layers).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LOGIT_ATOL = 1e-5  # fp32 on CPU, the brief's tolerance


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# ---------------------------------------------------------------------------------------------- fast


def test_stored_keys_of_the_key_table():
    """Every Megatron name of the key table -> the key Megatron's dist checkpoint stores it under (seen in the
    checkpoints of the tiny recipe, local and TE alternatives alike) and its stacked axes."""
    from nemo_upcycle.engine.export_stream import stored_location
    from nemo_upcycle.formats.keymap import KEYMAP

    got = {m: stored_location(m) for row in KEYMAP.rows for m in row.megatron}
    L, X = "decoder.layers.", "decoder.layers.mlp.experts.experts."
    assert got["embedding.word_embeddings.weight"] == ("embedding.word_embeddings.weight", 0)
    assert got["decoder.layers.{layer}.self_attention.linear_qkv.weight"] == (L + "self_attention.linear_qkv.weight", 1)
    assert got["decoder.layers.{layer}.input_layernorm.weight"] == (L + "input_layernorm.weight", 1)
    assert got["decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"] == (L + "mlp.linear_fc1.layer_norm_weight", 1)
    for fc in ("linear_fc1", "linear_fc2"):  # local experts and TE grouped GEMM share the stored key
        want = (X + f"{fc}.weight", 2)
        assert got[f"decoder.layers.{{layer}}.mlp.experts.local_experts.{{expert}}.{fc}.weight"] == want
        assert got[f"decoder.layers.{{layer}}.mlp.experts.{fc}.weight{{expert}}"] == want
    assert all("{" not in k for k, _ in got.values())


def tiny_moe():
    """A tiny Mixtral-shaped set of HF tensors, its config (Megatron names) and the stored Megatron tensors."""
    from nemo_upcycle.core.options import UpcycleOptions
    from nemo_upcycle.engine.export_stream import stored_location
    from nemo_upcycle.formats.keymap import KEYMAP, Sizes
    from nemo_upcycle.formats.mixtral import layout

    hf = dict(hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=10, tie_word_embeddings=False)
    opts = UpcycleOptions(3, 2)
    config = SimpleNamespace(num_layers=2, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4, num_query_groups=2,
                             kv_channels=2, vocab_size=12)
    g = torch.Generator().manual_seed(0)
    tensors = {s.name: torch.randn(s.shape, generator=g) for s, _ in layout(hf, opts, torch.float32)}
    sizes = Sizes(4, 2, 10, 12)  # the vocabulary padded to 12 rows, as Megatron pads it
    stored: dict[str, dict] = {}
    for name in tensors:
        hit = KEYMAP.hf(name)
        parts = [tensors[t.key(hit.layer, hit.expert)] for t in hit.row.hf]
        key, axes = stored_location(hit.row.megatron[0])
        stored.setdefault(key, {})[(hit.layer, hit.expert)[:axes]] = hit.row.to_megatron(parts, sizes)
    out = {}
    for key, regions in stored.items():
        idx = sorted(regions)
        if idx == [()]:
            out[key] = regions[()]
        else:  # stack over the layer (and expert) axes
            shape = tuple(max(i[a] for i in idx) + 1 for a in range(len(idx[0])))
            t = torch.empty(shape + tuple(regions[idx[0]].shape))
            for i in idx:
                t[i] = regions[i]
            out[key] = t
    return tensors, config, {"module." + k: v for k, v in out.items()}


def save_dcp(state: dict, path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter, save

    save(state, storage_writer=FileSystemWriter(str(path)), no_dist=True)


def test_synthetic_checkpoint_streams_back(tmp_path):
    from nemo_upcycle.engine.export_stream import CheckpointTensors

    tensors, config, state = tiny_moe()
    save_dcp({**state, "optimizer.state.exp_avg.module.decoder.final_layernorm.weight": torch.ones(8)}, tmp_path)
    src = CheckpointTensors(tmp_path, config, vocab_size=10)
    assert src.padded_vocab == 12 and src.dtype == torch.float32
    for name, want in tensors.items():
        assert torch.equal(src.get(name), want), name
    src.check_all_used()  # the optimizer's tensors are not the model's
    assert src.region("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 2)).shape == (8, 6)
    # control: experts 0 and 1 of layer 0 swapped in the stored tensor are read as swapped
    fc2 = state["module.decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    fc2[0, [0, 1]] = fc2[0, [1, 0]].clone()
    save_dcp(state, tmp_path / "swapped")
    swapped = CheckpointTensors(tmp_path / "swapped", config, vocab_size=10)
    w2 = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    assert torch.equal(swapped.get(w2.format(0)), tensors[w2.format(1)])
    assert not torch.equal(swapped.get(w2.format(0)), tensors[w2.format(0)])


def test_unread_and_missing_tensors_are_refused(tmp_path):
    from nemo_upcycle.engine.export_stream import CheckpointTensors
    from nemo_upcycle.errors import UpcycleError

    tensors, config, state = tiny_moe()
    save_dcp({**state, "module.decoder.layers.extra.weight": torch.ones(2, 3)}, tmp_path / "extra")
    src = CheckpointTensors(tmp_path / "extra", config, vocab_size=10)
    for name in tensors:
        src.get(name)
    with pytest.raises(RuntimeError, match="left 1 stored tensors unwritten.*extra"):
        src.check_all_used()
    partial = CheckpointTensors(tmp_path / "extra", config, vocab_size=10)
    for name in tensors:
        if "layers.1.block_sparse_moe.experts.2." not in name:
            partial.get(name)
    with pytest.raises(RuntimeError, match=r"experts.linear_fc1.weight \(5 of 6 regions\)"):
        partial.check_all_used()
    # a saved chunk missing from the checkpoint (a rank's file lost): the region is refused, not filled with garbage
    save_dcp(state, tmp_path / "cut")
    md = pickle.loads((tmp_path / "cut" / ".metadata").read_bytes())
    key = "module.decoder.layers.self_attention.linear_qkv.weight"
    md.state_dict_metadata[key].chunks.clear()
    (tmp_path / "cut" / ".metadata").write_bytes(pickle.dumps(md))
    cut = CheckpointTensors(tmp_path / "cut", config, vocab_size=10)
    with pytest.raises(UpcycleError, match="holds 0 of the 128 elements of decoder.layers.self_attention.linear_qkv"):
        cut.get("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(UpcycleError, match="not a readable distributed checkpoint"):
        CheckpointTensors(tmp_path / "nothing", config, vocab_size=10)


def test_reference_windows_budget():
    from nemo_upcycle.engine.export_scale import REFERENCE_TOKENS, reference_windows

    ids = torch.arange(4 * 100).view(4, 100)
    assert torch.equal(reference_windows(ids), ids)  # 400 tokens: all
    long = torch.arange(3 * 5000).view(3, 5000)
    cut = reference_windows(long, multiple=12)
    assert cut.shape == (1, REFERENCE_TOKENS - REFERENCE_TOKENS % 12) and torch.equal(cut[0], long[0, :cut.shape[1]])
    assert reference_windows(torch.zeros(8, 512, dtype=torch.long)).shape == (2, 512)
    assert reference_windows(None) is None


def test_only_the_final_checkpoint_is_exported_at_the_end_of_training():
    """An older checkpoint than the live model (the last save before the final step) or none at all: no export."""
    from nemo_upcycle.engine.export_scale import _final_checkpoint

    none = SimpleNamespace(checkpoint_callback=None, global_step=6)
    assert _final_checkpoint(none) == (None, "no checkpoint was saved (trainer.checkpoint_every_n_steps=0)")
    old = SimpleNamespace(global_step=6, checkpoint_callback=SimpleNamespace(last_model_path="/r/step=3-last",
                                                                             _last_global_step_saved=4))
    ckpt, why = _final_checkpoint(old)
    assert ckpt is None and why.startswith("the last checkpoint is from step 4 but training ended at step 6")


# ---------------------------------------------------------------------------------------------- slow: 2-rank runs

LAYOUTS = {
    "ep2": ["parallel.expert_model_parallel_size=2"],
    "pp2_vp2": ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "model.vocab_size=100"],
    "ep2_shared_mixed": ["parallel.expert_model_parallel_size=2", "moe.moe_shared_expert_intermediate_size=44",
                         "moe.moe_shared_expert_gate=true", "moe.moe_layer_freq=2"],
}
COMMON = ["model.num_layers=4", "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2",
          "trainer.val_check_interval=2", "logging.report=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> run directory, each trained once on first use (torchrun, 2 ranks)."""
    root, done = tmp_path_factory.mktemp("runs"), {}
    torchrun = Path(sys.executable).with_name("torchrun")

    def get(name: str) -> Path:
        if name not in done:
            out = root / name
            r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"),
                                "--config-name=tiny_llama_upcycle", *COMMON, *LAYOUTS[name], f"hydra.run.dir={out}"],
                               capture_output=True, text=True, timeout=900, env=env(), cwd=root)
            if r.returncode and "need parallel.sequence_parallel=true" in r.stderr:  # main before the layouts fix
                pytest.skip("this checkout refuses TP2 + SP (engine/model.py's layout check does not see SP)")
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            done[name] = out
        return done[name]

    return get


def hf_tensors(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def final_checkpoint(run: Path) -> Path:
    (last,) = (run / "run" / "checkpoints").glob("*-last")
    return last.resolve()


def _same_export_three_ways(run: Path, layout: str, tmp_path: Path, capsys) -> tuple:
    """The end-of-training streamed export of ``run`` against the same checkpoint exported by one process holding the
    whole model and by the CLI's streamed export (every tensor equal), the live ranks' reference logits against the
    1-rank model's, and verify passing. Returns (streamed tensors, checkpoint, dense config, reference)."""
    from nemo_upcycle.apps.cli import main
    from nemo_upcycle.engine.export import (
        export_checkpoint,
        export_hf_mixtral,
        load_module,
        load_reference,
        reference_logits,
    )

    hf_dir, dense = run / "hf_mixtral", run / "dense_tiny"
    dense_cfg = json.loads((dense / "config.json").read_text())
    ckpt = final_checkpoint(run)
    c = json.loads((hf_dir / "config.json").read_text())["trained"]
    assert c["steps"] == 2 and c["checkpoint"] == str(ckpt) and c["reference_from"].startswith("the live ranks")
    assert c["exported_from"] == "megatron-core distributed checkpoint (streamed)"
    assert json.loads((run / "final_eval.json").read_text())["hf_mixtral"] == str(hf_dir)
    ids, live, _ = load_reference(hf_dir / "nemo_reference.safetensors")
    # the same checkpoint exported by one process holding the whole model
    module, config = load_module(ckpt)
    one = export_hf_mixtral(module, config, tmp_path / "one", hf_llama_config=dense_cfg, progress=False)
    with torch.no_grad():
        diff = (reference_logits(module, ids, dense_cfg["vocab_size"]) - live).abs().max().item()
    assert diff < LOGIT_ATOL, f"{layout}: live ranks vs one rank: max |dlogit| {diff:.2e}"
    cli = export_checkpoint(ckpt, tmp_path / "cli", hf_llama_config=dense_cfg, progress=False)
    streamed, a, b = hf_tensors(hf_dir), hf_tensors(one), hf_tensors(cli)
    assert streamed.keys() == a.keys() == b.keys()
    assert [k for k in streamed if not (torch.equal(streamed[k], a[k]) and torch.equal(streamed[k], b[k]))] == []
    assert not (cli / "nemo_reference.safetensors").exists()  # no model at hand: no reference
    assert main(["verify", str(dense), str(hf_dir)]) == 0
    assert "PASS" in capsys.readouterr().out
    return streamed, ckpt, dense_cfg, (ids, live, torch.float32)


def _tampered_export_differs(streamed: dict, ckpt: Path, dense_cfg: dict, reference: tuple, run: Path,
                             tmp_path: Path, capsys, key: str = "module.decoder.layers.mlp.experts.experts.linear_fc1."
                             "weight", offsets: tuple = (1, 2, 0, 0)) -> list[str]:
    """Negative control: one element of one stored expert chunk changed (default: layer 1, expert 2 of a stack stored
    over the layers); the HF tensors that then differ (verify must fail)."""
    from nemo_upcycle.apps.cli import main
    from nemo_upcycle.engine.export_stream import stream_export

    bad = tamper(ckpt, tmp_path / ckpt.name, key, offsets)
    out = stream_export(bad, tmp_path / "bad", hf_llama_config=dense_cfg, progress=False, reference=reference)
    tampered = hf_tensors(out)
    assert main(["verify", str(run / "dense_tiny"), str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
    return [k for k in streamed if not torch.equal(streamed[k], tampered[k])]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n != "ep2_shared_mixed"])
def test_streamed_export_at_the_end_of_training(megatron_world, runs, layout, tmp_path, capsys):
    run = runs(layout)
    streamed, ckpt, dense_cfg, ref = _same_export_three_ways(run, layout, tmp_path, capsys)
    assert len(streamed) == 3 + 4 * (7 + 3 * 4)  # untied Mixtral: 4 layers of 7 + 4 experts x 3
    assert _tampered_export_differs(streamed, ckpt, dense_cfg, ref, run, tmp_path, capsys) == \
        ["model.layers.1.block_sparse_moe.experts.2.w1.weight"]


@pytest.mark.slow
def test_streamed_qwen2_moe_export_with_shared_experts_and_dense_layers(megatron_world, runs, tmp_path, capsys):
    """EP2, a gated shared expert and MoE on layers 0 and 2 only: the run exports HF Qwen2-MoE (``auto``: Mixtral
    cannot hold it), streamed from the checkpoint exactly as one process exports it; transformers reproduces the live
    ranks' logits."""
    run = runs("ep2_shared_mixed")
    streamed, ckpt, dense_cfg, ref = _same_export_three_ways(run, "ep2_shared_mixed", tmp_path, capsys)
    cfg = json.loads((run / "hf_mixtral" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["mlp_only_layers"] == [1, 3]
    assert cfg["shared_expert_intermediate_size"] == 44
    assert "model.layers.0.mlp.shared_expert_gate.weight" in streamed and "model.layers.1.mlp.gate_proj.weight" in \
        streamed
    # a mixed stack is stored layer by layer (Megatron saves heterogeneous layers unstacked): layer 2's expert 2
    diff = _tampered_export_differs(streamed, ckpt, dense_cfg, ref, run, tmp_path, capsys,
                                    "module.decoder.layers.2.mlp.experts.experts.linear_fc1.weight", (2, 0, 0))
    assert diff == ["model.layers.2.mlp.experts.2.gate_proj.weight"], diff


def tamper(ckpt: Path, dst: Path, key: str, offsets: tuple) -> Path:
    """A copy of ``ckpt`` whose saved chunk of ``key`` at ``offsets`` has its first element changed: the new chunk is
    appended to its file and the checkpoint's metadata points at it (the old bytes stay, unread)."""
    shutil.copytree(ckpt, dst)
    meta = dst / "weights" / ".metadata"
    md = pickle.loads(meta.read_bytes())
    index = next(i for i in md.storage_data if i.fqn == key and tuple(i.offset) == offsets)
    info = md.storage_data[index]
    f = dst / "weights" / info.relative_path
    with open(f, "rb") as fh:
        fh.seek(info.offset)
        t = torch.load(io.BytesIO(fh.read(info.length)), weights_only=True)
    t.view(-1)[0] += 1.0
    buf = io.BytesIO()
    torch.save(t, buf)
    with open(f, "ab") as fh:
        pos = fh.tell()
        fh.write(buf.getvalue())
    md.storage_data[index] = dataclasses.replace(info, offset=pos, length=len(buf.getvalue()))
    meta.write_bytes(pickle.dumps(md))
    return dst
