"""Expert splits (issue 15, part 1): the permutations themselves, the calibration pass against transformers' own Llama,
and step 0 through convert + transformers' Mixtral for every split (with negative controls: a non-partition, and a
router that is not a virtual group). Refusals of calibration input: one line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import calibration_file, llama_with_tokenizer, load_llama, load_mixtral, max_logit_diff, mlp_inputs
from nemo_upcycle.apps.cli import main
from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.split import (
    cluster_permutation,
    group_coactivation,
    importance_balance,
    importance_permutation,
    random_permutation,
)
from nemo_upcycle.errors import FieldError

V = 300  # the tiny models' vocabulary here: a BPE tokenizer of 300 ids trained on Shakespeare


@pytest.fixture(scope="module")
def dense_tok(tmp_path_factory) -> Path:
    return llama_with_tokenizer(tmp_path_factory.mktemp("split") / "dense", V)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return calibration_file(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 31), generator=torch.Generator().manual_seed(3))


def is_partition(perm: torch.Tensor, F: int) -> bool:
    return torch.equal(perm.sort().values, torch.arange(F))


def test_importance_deal_is_a_balanced_partition():
    F, G = 48, 4
    imp = torch.arange(F, 0, -1).double() ** 2  # monotone: the contiguous slices are as unbalanced as can be
    perm = importance_permutation(imp, G)
    assert is_partition(perm, F)
    assert all(torch.equal(s, s.sort().values) for s in perm.chunk(G))
    top = set(torch.topk(imp, G).indices.tolist())
    assert all(len(top & set(s.tolist())) == 1 for s in perm.chunk(G))  # one of the G most important units each
    assert importance_balance(imp, perm, G) < 1.1 < 3.0 < importance_balance(imp, torch.arange(F), G)


def test_clustering_recovers_planted_groups():
    F, G, T = 40, 4, 300
    g = torch.Generator().manual_seed(0)
    truth = torch.randperm(F, generator=g).reshape(G, F // G)  # planted groups, scattered over the unit indices
    latent = torch.randn(G, T, generator=g)
    feats = torch.empty(F, T)
    for c in range(G):
        feats[truth[c]] = latent[c] + 0.3 * torch.randn(F // G, T, generator=g)
    perm = cluster_permutation(feats, G, seed=1, layer=0)
    assert is_partition(perm, F)
    found = {frozenset(s.tolist()) for s in perm.chunk(G)}
    assert found == {frozenset(t.tolist()) for t in truth}
    contiguous = torch.arange(F)
    assert group_coactivation(feats, perm, G) > 0.5 > abs(group_coactivation(feats, contiguous, G))


def test_random_split_is_seeded_per_layer_and_copy():
    a = random_permutation(44, 4, 1234, layer=1, copy=0)
    assert is_partition(a, 44)
    assert torch.equal(a, random_permutation(44, 4, 1234, 1, 0))
    assert not torch.equal(a, random_permutation(44, 4, 1234, 1, 1))
    assert not torch.equal(a, random_permutation(44, 4, 1234, 2, 0))


def test_split_at_g1_refused_and_choices():
    with pytest.raises(FieldError, match="expert_split"):
        UpcycleOptions(4, 2, expert_split="importance").validate()
    UpcycleOptions(4, 2, granularity=2, expert_split="importance").validate()  # the accepted neighbour
    with pytest.raises(FieldError, match="expert_split"):
        UpcycleOptions(4, 2, granularity=2, expert_split="kmeans").validate()


@torch.no_grad()
def test_calibration_pass_matches_transformers(dense_tok):
    """The MLP inputs the layer-by-layer pass yields equal those ``LlamaForCausalLM`` computes (hooks on its
    post-attention norms), segment by segment; the next layer's input is the negative control."""
    from nemo_upcycle.data.dense_pass import layer_inputs
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(dense_tok)
    model = load_llama(dense_tok)
    segs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 9)]
    want = mlp_inputs(model, segs)
    got = {li.layer: li.x for li in layer_inputs(src, segs, [0, 2], progress=False)}
    assert sorted(got) == [0, 2]
    for i in (0, 2):
        ref = want[i]
        assert (got[i] - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (got[0] - want[1]).abs().max() > 0.1


SPLITS = [("contiguous", None), ("random", None), ("importance", None), ("clustering", None),
          ("importance", "kmeans")]


@pytest.mark.parametrize("split,router", SPLITS)
def test_every_split_keeps_step0(dense_tok, calib, ids, tmp_path, capsys, split, router):
    """convert with each split (G = 2, top-4 of 8): transformers' Mixtral computes the dense Llama's logits."""
    out = tmp_path / "moe"
    args = ["convert", dense_tok, out, "-E", 8, "-k", 4, "-G", 2, "--split", split, "--no-progress"]
    if split in ("importance", "clustering") or router:
        args += ["--calibration", calib, "--calibration-tokens", 1024]
    if router:
        args += ["--router-init", router]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "step-0 equivalent: yes" in printed
    assert max_logit_diff(load_llama(dense_tok), load_mixtral(out), ids) < 1e-4
    import json

    rec = json.loads((out / "config.json").read_text())["upcycling"]
    assert rec["expert_split"] == split
    if split in ("importance", "clustering"):
        cal = rec["calibration"]
        assert cal["tokens"] == 1024 and cal["seconds"] > 0 and cal["peak_rss_gib"] > 0
        assert set(cal["layers"]) == {"0", "1", "2"}
        assert "calibration: 1024 tokens" in printed
    if split == "importance":
        s = cal["summary"]
        assert s["importance_balance"] <= s["importance_balance_contiguous"]
    if split == "clustering":
        s = cal["summary"]
        assert s["coactivation"] > s["coactivation_contiguous"]
    if split != "contiguous":  # the experts really differ from the contiguous slices
        from safetensors import safe_open

        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            w1 = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight")
        dense = load_llama(dense_tok).model.layers[0].mlp.gate_proj.weight
        assert not torch.equal(w1, dense[:22])


def test_negative_not_a_partition(dense_tok, calib, ids, tmp_path, monkeypatch):
    """A 'split' that repeats units (not a permutation) breaks step 0: the check can fail."""
    from nemo_upcycle.core import split as split_mod
    from nemo_upcycle.offline.convert import convert

    bad = torch.cat([torch.arange(22), torch.arange(22)])
    monkeypatch.setattr(split_mod, "random_permutation", lambda F, G, *a: bad)
    opts = UpcycleOptions(8, 4, granularity=2, expert_split="random").validate()
    convert(dense_tok, tmp_path / "moe", opts, progress=False)
    assert max_logit_diff(load_llama(dense_tok), load_mixtral(tmp_path / "moe"), ids) > 1e-2


def test_clustered_router_is_not_exact_and_says_so(dense_tok, calib, ids, tmp_path, capsys):
    """kmeans + clustering gives each expert its own row (from the tokens that activate its units): not a virtual
    group, so step 0 is not exact -- and convert says so."""
    out = tmp_path / "moe"
    assert main([str(a) for a in ["convert", dense_tok, out, "-E", 8, "-k", 4, "-G", 2, "--split", "clustering",
                                  "--router-init", "kmeans", "--calibration", calib, "--no-progress"]]) == 0
    assert "step-0 equivalent: no" in capsys.readouterr().out
    assert max_logit_diff(load_llama(dense_tok), load_mixtral(out), ids) > 1e-2


def test_plan_units_match_expert_weights(dense_tok):
    """The plan's units are what the expert holds: gathering them from the dense MLP reproduces every expert."""
    from nemo_upcycle.core.plan import UpcyclePlan
    from nemo_upcycle.core.upcycle import LayerExperts
    from nemo_upcycle.formats.base import open_dense, read_dense_mlp

    src = open_dense(dense_tok)
    opts = UpcycleOptions(8, 4, granularity=4, expert_split="random").validate()
    plan = UpcyclePlan()
    ex = LayerExperts(lambda i: read_dense_mlp(src.get, i), opts, plan=plan)
    gate, up, down = read_dense_mlp(src.get, 1)
    parts = []
    for e in range(4):  # copy 0
        u = plan.units(opts, 1, e, 44)
        w = ex.get(1, e)
        assert torch.equal(w.gate, gate[u]) and torch.equal(w.up, up[u]) and torch.equal(w.down, down[:, u] * 4)
        parts.append(u)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(44))
    opts2 = dataclasses.replace(opts, expert_split="importance")
    with pytest.raises(RuntimeError, match="calibration plan"):
        plan.units(opts2, 1, 0, 44)


# ---- refusals: one line, exit 2, nothing written ----------------------------------------------------------------
def _bad(tmp_path, kind: str) -> Path:
    f = tmp_path / "cal.txt"
    if kind == "missing":
        return tmp_path / "nope.txt"
    if kind == "empty":
        f.write_text("")
    elif kind == "binary":
        f.write_bytes(bytes(range(256)) * 40)
    elif kind == "short":
        f.write_text("To be, or not to be: that is the question.")
    elif kind == "directory":
        f.mkdir()
    return f


@pytest.mark.parametrize("kind,match", [("missing", "does not exist"), ("empty", "is empty"),
                                        ("binary", "is not text"), ("short", "below the minimum of 256"),
                                        ("directory", "is a directory")])
def test_bad_calibration_text(dense_tok, calib, tmp_path, capsys, kind, match):
    out = tmp_path / "moe"
    code = main([str(a) for a in ["convert", dense_tok, out, "-E", 4, "-k", 2, "-G", 2, "--split", "importance",
                                  "--calibration", _bad(tmp_path, kind), "--no-progress"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".*moe*"))


def test_refusals_and_their_neighbours(dense_tok, calib, tmp_path, capsys):
    out = tmp_path / "moe"
    cases = [
        (["-E", 4, "-k", 2, "--split", "importance", "--calibration", calib], "granularity"),  # G = 1
        (["-E", 4, "-k", 2, "-G", 2, "--split", "importance"], "needs calibration text"),
        (["-E", 4, "-k", 2, "--router-init", "kmeans"], "needs calibration text"),
        (["-E", 4, "-k", 2, "--calibration", calib], "is read only by"),
        (["-E", 4, "-k", 2, "-G", 2, "--split", "importance", "--calibration", calib, "--calibration-tokens", 100],
         "below the minimum"),
        (["-E", 300, "-k", 2, "--router-init", "kmeans", "--calibration", calib, "--calibration-tokens", 256],
         "one calibration token per cluster"),
    ]
    for extra, match in cases:
        code = main([str(a) for a in ["convert", dense_tok, out, *extra, "--no-progress"]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists()
    # the accepted neighbours
    assert main([str(a) for a in ["convert", dense_tok, out, "-E", 4, "-k", 2, "-G", 2, "--split", "importance",
                                  "--calibration", calib, "--calibration-tokens", 256, "--no-progress"]]) == 0
    assert main([str(a) for a in ["convert", dense_tok, tmp_path / "m2", "-E", 8, "-k", 2, "--router-init", "kmeans",
                                  "--calibration", calib, "--calibration-tokens", 256, "--no-progress"]]) == 0
