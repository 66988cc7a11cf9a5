"""Experts from several dense sources (issue 15, part 3). Dense variants made here from one tiny base: MLP-only
perturbed copies (their attention is the base's) and a copy fine-tuned a few steps on other text (every weight
moved), all with the base's tokenizer (checked identical). Copy i of every MoE layer comes from source i mod n; with
attention from the base, routing only to source i's experts computes source i (transformers' Llama) exactly, routing
to the other source's does not; ``--non-expert average`` gives the sources' mean; sources of other shapes or
tokenizers are refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import add_tokenizer, llama_with_tokenizer, load_llama, make_llama, perturbed_mlp_copy, shakespeare_text
from nemo_upcycle.apps.cli import main

V = 300


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    base = llama_with_tokenizer(root / "base", V)
    out = {"base": base}
    for name, seed in (("mlp_a", 1), ("mlp_b", 2)):  # MLP-only perturbations: attention stays the base's
        out[name] = perturbed_mlp_copy(base, root / name, seed)
    m = load_llama(base).train()  # fine-tuned a few steps on other text: every weight moves
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(str(base))(shakespeare_text(2000, start=150_000))["input_ids"])
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for i in range(3):
        chunk = ids[i * 60:(i + 1) * 60][None]
        m(chunk, labels=chunk).loss.backward()
        opt.step()
        opt.zero_grad()
    m.save_pretrained(root / "tuned")
    out["tuned"] = root / "tuned"
    for name in ("mlp_a", "mlp_b", "tuned"):
        for f in base.glob("tokenizer*"):
            shutil.copy2(f, out[name] / f.name)
        shutil.copy2(base / "special_tokens_map.json", out[name]) if (base / "special_tokens_map.json").exists() \
            else None
        assert (out[name] / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    return out


def st(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if key in h.keys():
                return h.get_tensor(key)
    raise KeyError(key)


def test_copies_come_from_their_sources_and_verify_reports_each(family, tmp_path, capsys):
    out = tmp_path / "moe"
    srcs = f"{family['mlp_a']},{family['mlp_b']}"
    assert main([str(a) for a in ["convert", family["base"], out, "-E", 4, "-k", 2, "--expert-sources", srcs,
                                  "--no-progress"]]) == 0
    printed = capsys.readouterr().out
    assert "step-0 equivalent: no" in printed and "2 dense sources" in printed
    rec = json.loads((out / "config.json").read_text())["upcycling"]
    assert rec["expert_sources"] == srcs.split(",") and rec["non_expert"] == "base"
    for e, name in enumerate(["mlp_a", "mlp_b", "mlp_a", "mlp_b"]):  # copy i from source i mod 2
        dense = load_llama(family[name]).model.layers[1].mlp.gate_proj.weight
        assert torch.equal(st(out, f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"), dense)
    base_q = load_llama(family["base"]).model.layers[0].self_attn.q_proj.weight
    assert torch.equal(st(out, "model.layers.0.self_attn.q_proj.weight"), base_q)

    assert main([str(a) for a in ["verify", family["base"], out]]) == 0
    text = capsys.readouterr().out
    assert "source 0" in text and "source 1" in text and "not function-preserving" in text
    from nemo_upcycle.offline.verify import load_moe, logit_stats
    from nemo_upcycle.offline.verify_sources import per_source, restrict, source_experts

    ids = torch.randint(0, V, (2, 27), generator=torch.Generator().manual_seed(4))
    rows = per_source(out, ids, load_moe, load_llama, logit_stats)
    assert [r["index"] for r in rows] == [0, 1]
    assert all(r["max_abs"] < 1e-4 and r["top1"] == 1.0 for r in rows)  # attention shared: each source exactly
    moe = load_moe(out)  # negative control: routed to the other source's experts
    restrict(moe, source_experts(4, 1, 2, 1))
    with torch.no_grad():
        wrong = logit_stats(load_llama(family["mlp_a"])(ids).logits, moe(ids).logits)
    assert wrong[0] > 1e-2


def test_fine_tuned_source_and_average(family, tmp_path, capsys):
    """A source fine-tuned on other text (attention moved too): ``--non-expert average`` gives the mean of the sources'
    attention; routed to its experts the MoE is close to, but not exactly, each source."""
    out = tmp_path / "moe"
    srcs = [family["tuned"], family["mlp_a"]]
    assert main([str(a) for a in ["convert", family["base"], out, "-E", 4, "-k", 2, "-G", 2, "--expert-sources",
                                  ",".join(map(str, srcs)), "--non-expert", "average", "--no-progress"]]) == 0
    capsys.readouterr()
    qs = [load_llama(s).model.layers[2].self_attn.q_proj.weight for s in srcs]
    assert torch.allclose(st(out, "model.layers.2.self_attn.q_proj.weight"), (qs[0] + qs[1]) / 2, atol=1e-7)
    assert not torch.equal(qs[0], qs[1])
    from nemo_upcycle.offline.verify import load_moe, logit_stats
    from nemo_upcycle.offline.verify_sources import per_source

    ids = torch.randint(0, V, (2, 27), generator=torch.Generator().manual_seed(4))
    rows = per_source(out, ids, load_moe, load_llama, logit_stats)
    assert all(0 < r["max_abs"] for r in rows)


def test_sources_refused_up_front(family, tmp_path, capsys):
    other = make_llama(tmp_path / "wide", vocab_size=V, intermediate_size=48)  # another FFN size
    add_tokenizer(other, V, shakespeare_text(100_000))
    foreign = tmp_path / "foreign"  # same sizes, another tokenizer
    shutil.copytree(family["mlp_a"], foreign)
    add_tokenizer(foreign, V, shakespeare_text(60_000, start=200_000))
    out = tmp_path / "moe"
    for srcs, match in [(f"{family['mlp_a']},{other}", "intermediate_size"),
                        (f"{family['mlp_a']},{foreign}", "another tokenizer"),
                        (f"{family['mlp_a']},{tmp_path / 'nope'}", "does not exist")]:
        code = main([str(a) for a in ["convert", family["base"], out, "-E", 4, "-k", 2, "--expert-sources", srcs,
                                      "--no-progress"]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    code = main([str(a) for a in ["convert", family["base"], out, "-E", 4, "-k", 2, "--non-expert", "average"]])
    assert code == 2 and "non-expert" in capsys.readouterr().err
    assert main([str(a) for a in ["convert", family["base"], out, "-E", 4, "-k", 2, "--expert-sources",
                                  f"{family['mlp_a']},{family['base']}", "--no-progress"]]) == 0  # the neighbour
