"""Every parallel layout of the recipes trains on CPU ranks exactly as one rank does, through the real engine.

``tests/dist_layouts.py`` runs the tiny recipe as ``train.py mode=train`` builds it (``engine.partial.train_partial``:
``UpcycledLlamaModel`` with online upcycling from a random tiny dense HF Llama, the local spec, NeMo's trainer) with
Drop-Upcycling, so that every expert differs and a misplaced one is seen. Four torchrun launches, each running its
layouts one after the other: 1 rank (the references: 4 and 32 layers), 2 ranks (DP2, EP2, ETP2 with TP1, TP2+SP,
TP2+SP with ETP1, PP2, PP2 x VP2 and the controls), 4 ranks (TP2+SP x EP2, PP2 x EP2 and a control), 8 ranks
(PP4 x VP8 x EP2 with 32 layers: the 8x8B recipe's layout shape at toy size). For each layout:
- the losses of 4 steps equal one rank's within 1e-5 relative (fp32; measured: bit-identical for every layout but
  PP4 x VP8 x EP2, 2.1e-7: reduction order);
- online upcycling filled every rank's shards: each rank's parameters before step 1, under global names (PP / VP layer
  offsets, EP expert indices), joined over TP / ETP by the key table's splits (qkv, proj, fc1 halves, fc2, vocab),
  replicas checked equal, are bit-identical to the 1-rank model's (the vocabulary padding rows aside: zero).
Negative controls: a rank filled with another rank's TP shard (qkv) or EP expert is caught by both comparisons;
ETP2 with megatron-core 0.15.3's own expert marking (``stock_expert_grads``) drifts, and its step-1 expert gradient on
each rank is the sum of all ranks' shards' gradients (the root cause, ``spec.reduce_expert_grads_over_expert_groups``).
Vocabulary 99 at TP2 (padded to 256, one rank 128): the padding rows stay zero after training and the export of the
TP2-trained model (99 rows) gives the 1-rank model's logits.
The uneven all-gather / reduce-scatter of TP+SP x EP on gloo (``engine.cpu``) is also checked alone on 2 processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_layouts import uneven_collectives
from nemo_upcycle.formats.keymap import KEYMAP
from test_engine_cpu import torchrun

SCRIPT = Path(__file__).with_name("dist_layouts.py")
STEPS = 4
LOSS_RTOL = 1e-5  # the bound asked for (fp32); measured 0 or 2.1e-7; the controls differ by >= 1.4e-3
VOCAB = 99  # the tiny recipe's vocabulary: odd on purpose
COMMON = ["upcycle=drop_upcycle"]  # every expert different (plain copies would hide a misplaced expert)
L4 = ["model.num_layers=4"]
L32 = ["model.num_layers=32", "data.micro_batch_size=1", "data.global_batch_size=8"]  # 4 micro-batches per DP rank
TP2SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
EP2, PP2 = ["parallel.expert_model_parallel_size=2"], ["parallel.pipeline_model_parallel_size=2"]
LAYOUTS = {  # name: (ranks, reference, overrides)
    "dp2": (2, "ref4", L4),
    "ep2": (2, "ref4", L4 + EP2),
    "etp2": (2, "ref4", L4 + ["parallel.expert_tensor_parallel_size=2"]),
    "tp2sp": (2, "ref4", L4 + TP2SP),
    "tp2sp_etp1": (2, "ref4", L4 + TP2SP + ["parallel.expert_tensor_parallel_size=1"]),
    "pp2": (2, "ref4", L4 + PP2),
    "pp2vp2": (2, "ref4", L4 + PP2 + ["parallel.virtual_pipeline_model_parallel_size=2"]),
    "tp2sp_ep2": (4, "ref4", L4 + TP2SP + EP2),
    "pp2_ep2": (4, "ref4", L4 + PP2 + EP2),
    "pp4vp8_ep2": (8, "ref32", L32 + EP2 + ["parallel.pipeline_model_parallel_size=4",
                                             "parallel.virtual_pipeline_model_parallel_size=8"]),
}
WRONG_QKV = {"rank": 1, "param": "decoder.layers.1.self_attention.linear_qkv.weight"}  # TP rank 1 gets rank 0's
WRONG_EXPERT = {"rank": 1, "param": "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"}  # expert 0 for 2
CONTROLS = {  # name: (ranks, layout it perturbs, run keys, the global name that must differ)
    "tp2sp_wrong_qkv": (2, "tp2sp", {"wrong_shard": WRONG_QKV}, WRONG_QKV["param"]),
    "etp2_stock": (2, "etp2", {"stock_expert_grads": True, "grads": True}, None),
    "pp2_ep2_wrong_expert": (4, "pp2_ep2", {"wrong_shard": WRONG_EXPERT},  # rank 1: EP rank 1 on stage 0
                             "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"),
}


# ---------------------------------------------------------------------------------------------- fast


def test_uneven_gather_and_reduce_scatter_on_gloo(tmp_path):
    from helpers import free_port

    torch.multiprocessing.spawn(uneven_collectives, args=(free_port(), str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{i}") for i in range(2))
    assert "invalid tensor size" in r0["stock_error"]  # control: gloo refuses the stock call
    want = torch.cat([torch.full((3, 2), 1.0), torch.full((5, 2), 2.0)])
    assert torch.equal(torch.tensor(r0["gathered"]), want) and torch.equal(torch.tensor(r1["gathered"]), want)
    total = torch.arange(16, dtype=torch.float32).reshape(8, 2) * 3  # rank 0's x1 + rank 1's x2
    assert torch.equal(torch.tensor(r0["scattered"]), total[:3]) and torch.equal(torch.tensor(r1["scattered"]),
                                                                                  total[3:])


# ---------------------------------------------------------------------------------------------- helpers


def plan(ranks: int) -> list[dict]:
    runs = [dict(name=n, steps=STEPS, dump=["start"], overrides=COMMON + o)
            for n, (r, _, o) in LAYOUTS.items() if r == ranks]
    for run in runs:
        run.update({"etp2": dict(grads=True), "tp2sp": dict(dump=["start", "end"])}.get(run["name"], {}))
    for name, (r, base, keys, _) in CONTROLS.items():
        if r == ranks:
            runs.append(dict(name=name, steps=STEPS, dump=["start"], overrides=COMMON + LAYOUTS[base][2], **keys))
    return runs


def assemble(work: Path, run: str, when: str = "start") -> dict[str, torch.Tensor]:
    """One run's parameters (or gradients), whole: the ranks' TP / ETP shards joined by the key table's split (``dim``;
    a glu fc1 per half), each global name covered by all its shards, replicas bit-identical."""
    shards: dict[str, tuple[dict, int]] = {}
    files = sorted(work.glob(f"{run}.{when}.rank*.pt"))
    assert files, f"no dump {run}.{when}"
    for f in files:
        d = torch.load(f)
        for name, t in d["tensors"].items():
            row = KEYMAP.megatron(name).row
            rank, size = (0, 1) if row.dim is None else d["etp"] if row.group == "etp" else d["tp"]
            have = shards.setdefault(name, ({}, size))[0]
            assert rank not in have or torch.equal(have[rank], t), f"{run}: replicas of {name} differ"
            have[rank] = t
    out = {}
    for name, (have, size) in shards.items():
        assert sorted(have) == list(range(size)), f"{run}: {name} has shards {sorted(have)} of {size}"
        parts, row = [have[r] for r in range(size)], KEYMAP.megatron(name).row
        if size > 1 and row.transform == "glu":
            halves = [p.chunk(2) for p in parts]
            out[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out[name] = parts[0] if size == 1 else torch.cat(parts, row.dim)
    return out


def differing(got: dict, ref: dict, tol: float = 0.0) -> list[str]:
    """Names whose tensors differ (max |diff| > tol x max |ref|); vocabulary rows past VOCAB must be zero in both."""
    assert got.keys() == ref.keys(), sorted(got.keys() ^ ref.keys())
    out = []
    for name in sorted(ref):
        a, b = got[name], ref[name]
        if KEYMAP.megatron(name).row.transform == "vocab":
            assert a[VOCAB:].abs().sum() == 0 and b[VOCAB:].abs().sum() == 0, f"{name}: padding rows not zero"
            a, b = a[:VOCAB], b[:VOCAB]
        if a.shape != b.shape or (a - b).abs().max() > tol * b.abs().max():
            out.append(name)
    return out


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) >= STEPS, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- slow: launches


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts1")
    runs = [dict(name="ref4", steps=STEPS, dump=["start", "end"], grads=True, overrides=COMMON + L4),
            dict(name="ref32", steps=STEPS, dump=["start"], overrides=COMMON + L32)]
    return torchrun(1, runs, work, timeout=1500, script=SCRIPT), work


@pytest.fixture(scope="module")
def launched(one_rank, tmp_path_factory):
    """The 2-, 4- and 8-rank launches, each when a test first needs it."""
    done = {1: one_rank}

    def get(ranks: int):
        if ranks not in done:
            work = tmp_path_factory.mktemp(f"layouts{ranks}")
            done[ranks] = torchrun(ranks, plan(ranks), work, timeout=1500, script=SCRIPT), work
        return done[ranks]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_as_one_rank(launched, layout):
    ranks, ref, _ = LAYOUTS[layout]
    (results, work), (refs, ref_work) = launched(ranks), launched(1)
    d = rel_diff(results[layout]["losses"], refs[ref]["losses"])
    assert d <= LOSS_RTOL, f"{layout}: losses {results[layout]['losses']} vs one rank {refs[ref]['losses']}"
    wrong = differing(assemble(work, layout), assemble(ref_work, ref))
    assert not wrong, f"{layout}: online upcycling filled {wrong[:3]} differently from one rank"


@pytest.mark.slow
@pytest.mark.parametrize("control", ["tp2sp_wrong_qkv", "pp2_ep2_wrong_expert"])
def test_a_wrong_shard_is_caught(launched, control):
    ranks, _, _, name = CONTROLS[control]
    (results, work), (refs, ref_work) = launched(ranks), launched(1)
    assert rel_diff(results[control]["losses"], refs["ref4"]["losses"]) > 100 * LOSS_RTOL
    assert differing(assemble(work, control), assemble(ref_work, "ref4")) == [name]


@pytest.mark.slow
def test_etp_expert_gradients_are_reduced_over_the_expert_groups(launched):
    (results, work), (refs, ref_work) = launched(2), launched(1)
    ref = assemble(ref_work, "ref4", "grads")
    assert not differing(assemble(work, "etp2", "grads"), ref, tol=1e-5)
    # control: megatron-core 0.15.3's marking sums each expert's ETP shards' gradients over the dense DP group
    stock = assemble(work, "etp2_stock", "grads")
    name = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"  # row-parallel: halves of dim 1
    left, right = ref[name].chunk(2, dim=1)
    assert torch.allclose(stock[name], torch.cat([left + right] * 2, dim=1), rtol=1e-4, atol=1e-9)
    assert rel_diff(results["etp2_stock"]["losses"], refs["ref4"]["losses"]) > 100 * LOSS_RTOL


@pytest.mark.slow
def test_odd_vocabulary_at_tp2_trains_and_exports_the_unpadded_model(launched, megatron_world, tmp_path):
    """Vocab 99 at TP2 (padded to 256, logits past 99 masked): after training the padding rows are still zero, and
    the HF export of the TP2-trained model (99 rows) gives the logits of the 1-rank model (padded to 128)."""
    from nemo_upcycle.engine.export import export_hf_mixtral
    from nemo_upcycle.engine.model import megatron_forward_logits
    from nemo_upcycle.offline.verify import load_moe

    (_, work), (_, ref_work) = launched(2), launched(1)
    tp2, one = assemble(work, "tp2sp", "end"), assemble(ref_work, "ref4", "end")
    assert tp2["output_layer.weight"].shape[0] == 256 and one["output_layer.weight"].shape[0] == 128
    # the padding rows are still zero (checked by differing); the rest is one rank's up to Adam's amplification of
    # ~1e-7 gradient differences on elements with tiny second moments (measured 9e-5 of a tensor's largest entry)
    assert not differing(tp2, one, tol=1e-3)
    dense = json.loads((ref_work / "dense_L4" / "config.json").read_text())
    modules = {}
    for name, weights, tp in (("tp2", tp2, 2), ("one", one, 1)):
        cfg, module = padded_module(tp)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(weights[n])
        modules[name] = (cfg, module.eval())
    out = export_hf_mixtral(modules["tp2"][1], modules["tp2"][0], tmp_path / "hf", hf_llama_config=dense,
                            progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = load_moe(out).eval()(ids).logits
        tp2_logits, one_logits = (megatron_forward_logits(modules[n][1], ids) for n in ("tp2", "one"))
    assert torch.isinf(tp2_logits[..., VOCAB:]).all()  # the padding is masked, never predicted
    assert (hf - tp2_logits[..., :VOCAB]).abs().max() < 1e-5  # the export is the trained model (measured 1.5e-7)
    assert (hf - one_logits[..., :VOCAB]).abs().max() < 1e-4  # ... and the 1-rank model's (measured 1.3e-6)
    # control: Megatron's unmasked cross entropy would count the padding's zero logits (29 at one rank, 157 at TP2)
    labels = torch.roll(ids, -1, 1).flatten()
    real = one_logits[..., :VOCAB].flatten(0, 1)
    masked = torch.nn.functional.cross_entropy(real, labels)
    with_zeros = torch.nn.functional.cross_entropy(torch.cat([real, real.new_zeros(len(real), 29)], -1), labels)
    assert with_zeros - masked > 1e-2, (with_zeros, masked)


def padded_module(tp: int):
    """The tiny recipe's MoE config as the recipe builds it for ``tp`` (vocab padded for it), built on this rank."""
    import fiddle as fdl

    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.engine.partial import model_config

    r = compose("tiny_llama_upcycle", COMMON + L4 + (TP2SP + ["parallel.devices=2"] if tp == 2 else []))
    cfg = fdl.build(model_config(r))
    return cfg, cfg.configure_model(None)
