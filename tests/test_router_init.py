"""Routers from data (issue 15, part 2): k-means on planted clusters, hidden-state rows against transformers' own hidden
states, step 0 kept for copies and virtual groups whatever the router, and the first step's expert load of a kmeans
router against a ``normal`` one on real text (SmolLM2-135M on Shakespeare: recorded, compared as means, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import llama_with_tokenizer, load_llama, load_mixtral, max_logit_diff, shakespeare_text
from nemo_upcycle.apps.cli import main
from nemo_upcycle.core import router_init as ri

V = 300


@pytest.fixture(scope="module")
def dense_tok(tmp_path_factory) -> Path:
    return llama_with_tokenizer(tmp_path_factory.mktemp("router") / "dense", V)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Four prompt sets of different kinds (mergekit's one per expert), in name order; each shorter than the tiny
    model's 64 positions."""
    d = tmp_path_factory.mktemp("prompts")
    texts = {"0_code.txt": "def add(x, y):\n    return x + y\nfor i in range(10):\n    print(i)\n",
             "1_math.txt": "1 + 2 = 3; 7 * 8 = 56; 144 / 12 = 12; 2 ** 10 = 1024.",
             "2_play.txt": shakespeare_text(90, start=120_000),
             "3_list.txt": "apples, pears, plums, figs, dates, limes, lemons, grapes"}
    for name, t in texts.items():
        (d / name).write_text(t)
    return d


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = ri.unit_rows(torch.randn(4, 32, generator=g))
    labels = torch.arange(400) % 4
    X = (centers[labels] * 5 + 0.5 * torch.randn(400, 32, generator=g)).float()
    C = ri.spherical_kmeans(X, 4, seed=1, layer=0)
    match = (C @ centers.T).max(1).values
    assert match.min() > 0.95  # every found centroid is one planted direction ...
    assert len(set((C @ centers.T).argmax(1).tolist())) == 4  # ... and each planted direction is found once
    rand = ri.unit_rows(torch.randn(4, 32, generator=g))
    assert (rand @ centers.T).max(1).values.min() < 0.9  # negative control: random rows are not


def test_clustered_router_points_at_the_activating_tokens():
    """Tokens that put more activation in expert j's units lie along d_j: row (i, j) leans towards d_j."""
    g = torch.Generator().manual_seed(1)
    T, D, G = 600, 24, 2
    d = ri.unit_rows(torch.randn(G, D, generator=g))
    share = torch.rand(T, generator=g)
    share = torch.stack([share, 1 - share], 1)
    X = (torch.randn(T, D, generator=g) * 0.3 + 2 * (share[:, :1] - 0.5) * (d[0] - d[1])).float()
    rows = ri.unit_rows(ri.clustered_router(X, share, E=4, G=G, router_std=0.02, seed=0, layer=0))
    for i in range(2):
        assert rows[2 * i] @ (d[0] - d[1]) > 0 > rows[2 * i + 1] @ (d[0] - d[1])


@torch.no_grad()
def test_hidden_router_rows_are_the_prompts_mean_hidden_states(dense_tok, prompts, tmp_path, capsys):
    """convert --router-init hidden: row e points along the mean (unit) hidden state transformers' Llama computes at
    the router's input (post-attention norm) on prompt file e; step 0 stays exact (copies)."""
    out = tmp_path / "moe"
    assert main([str(a) for a in ["convert", dense_tok, out, "-E", 4, "-k", 2, "--router-init", "hidden",
                                  "--router-prompts", prompts, "--no-progress"]]) == 0
    assert "step-0 equivalent: yes" in capsys.readouterr().out
    model, moe = load_llama(dense_tok), load_mixtral(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dense_tok))
    layer = 2
    means = []
    for f in sorted(prompts.iterdir()):
        seen = []
        h = model.model.layers[layer].post_attention_layernorm.register_forward_hook(
            lambda m, a, o: seen.append(o[0]))
        ids = tok(f.read_text(), add_special_tokens=False)["input_ids"]
        assert len(ids) <= 64  # one causal segment (the pass cuts prompts at the model's 64 positions)
        model(torch.tensor([ids]))
        h.remove()
        means.append(ri.unit_rows(seen[0]).mean(0))
    rows = ri.unit_rows(moe.model.layers[layer].block_sparse_moe.gate.weight.double())
    cos = rows @ ri.unit_rows(torch.stack(means)).T
    assert cos.diagonal().min() > 0.999
    assert (cos - torch.eye(4, dtype=cos.dtype) * 10).max() < cos.diagonal().min()  # not any prompt's: its own
    ids = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(2))
    assert max_logit_diff(model, moe, ids) < 1e-4


def test_hidden_router_per_copy_keeps_step0_at_g2(dense_tok, prompts, tmp_path, capsys):
    """G = 2, E = 4: one prompt file per copy (2), each row repeated for the copy's two experts (a virtual group)."""
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted(prompts.iterdir())[:2]:
        (two / f.name).write_text(f.read_text())
    out = tmp_path / "moe"
    args = ["convert", dense_tok, out, "-E", 4, "-k", 2, "-G", 2, "--router-init", "hidden", "--router-prompts"]
    assert main([str(a) for a in [*args, prompts, "--no-progress"]]) == 2  # 4 files for 2 copies: refused
    assert "holds 4 files" in capsys.readouterr().err and not out.exists()
    assert main([str(a) for a in [*args, two, "--no-progress"]]) == 0
    assert "step-0 equivalent: yes" in capsys.readouterr().out
    gate = load_mixtral(out).model.layers[0].block_sparse_moe.gate.weight
    assert torch.equal(gate[0], gate[1]) and torch.equal(gate[2], gate[3]) and not torch.equal(gate[0], gate[2])
    ids = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(2))
    assert max_logit_diff(load_llama(dense_tok), load_mixtral(out), ids) < 1e-4


@pytest.mark.slow  # SmolLM2 from its GGUF (the tokenizer alone takes ~20 s to build)
def test_kmeans_first_step_load_is_more_even_than_normal(tmp_path):
    """SmolLM2-135M (a real model) on Shakespeare: the kmeans router's first-step expert load (max / mean over E = 8,
    top-2) is more even, averaged over three layers, than a normal router's of the same seed on the same tokens
    (hidden states share a large common direction, which a random router's rows project onto unevenly)."""
    from nemo_upcycle.core.options import UpcycleOptions
    from nemo_upcycle.data.calibration import CalibrationSpec, calibrate
    from nemo_upcycle.data.resources import smollm2_gguf
    from nemo_upcycle.formats.base import open_dense

    text = tmp_path / "cal.txt"
    text.write_text(shakespeare_text(20_000, start=300_000))
    opts = UpcycleOptions(8, 2, router_init="kmeans", moe_layers=[1, 7, 15]).validate()
    plan = calibrate(open_dense(smollm2_gguf()), opts, CalibrationSpec(files=[text], max_tokens=512), progress=False)
    layers = plan.record["layers"]
    assert sorted(layers, key=int) == ["1", "7", "15"] and plan.record["tokens"] == 512
    for rec in layers.values():
        assert abs(sum(rec["load"]) - 1) < 1e-3 and len(rec["load"]) == 8
    s = plan.record["summary"]
    print(json.dumps({k: (v["load_imbalance"], v["load_imbalance_normal"]) for k, v in layers.items()}))
    assert s["load_imbalance"] < s["load_imbalance_normal"]


def test_report_shows_the_first_step_load():
    from nemo_upcycle.apps.report_parts import _step0_layers

    cal = {"tokens": 512, "seconds": 1.5, "peak_rss_gib": 0.5,
           "summary": {"load_imbalance": 1.4, "load_imbalance_normal": 2.6}}
    text = "\n".join(_step0_layers({"rows": [], "passed": True, "calibration": cal}))
    assert "calibration: 512 tokens" in text and "max/mean 1.40 (normal router 2.60)" in text
    assert "Upcycling from data" not in "\n".join(_step0_layers({"rows": [], "passed": True}))
