"""The Hydra side of issue 15: the ``upcycle.expert_split`` / ``calibration*`` / ``router_prompts`` keys,
the new ``conf/upcycle`` files, and their refusals (one line naming the key) next to their accepted neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nemo_upcycle.apps.precheck import check_calibration
from nemo_upcycle.config.compose import compose
from nemo_upcycle.config.translate import calibration_spec, corpus_paths, upcycle_options
from nemo_upcycle.errors import UpcycleError

TINY = "tiny_llama_upcycle"


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A tokenizer of the tiny model's vocabulary (the random tiny model has none of its own)."""
    from nemo_upcycle.data.resources import bpe_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    text = "some calibration text, and more of it " * 50
    bpe_tokenizer(text, compose(TINY).model.vocab_size).save_pretrained(str(tok))
    return tok


@pytest.mark.parametrize("group,split,router", [("importance_g2", "importance", "virtual_group"),
                                                ("clustering_g2", "clustering", "virtual_group"),
                                                ("kmeans_router", "contiguous", "kmeans")])
def test_conf_files(group, split, router, tiny_tokenizer):
    r = compose(TINY, [f"upcycle={group}", "data=shakespeare", "data.seq_length=64",
                       f"data.tokenizer={tiny_tokenizer}"])
    opts = upcycle_options(r)
    assert (opts.expert_split, opts.router_init_resolved) == (split, router)
    spec = calibration_spec(r)  # default: the training corpus, its first calibration_tokens tokens
    assert [str(f) for f in spec.files] == corpus_paths(r) and spec.max_tokens == 4096
    check_calibration(r)


def test_refusals_name_the_key(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("some calibration text " * 100)
    cases = [(["upcycle=importance_g2"], "data=mock has none"),  # mock data: no text to calibrate on
             (["upcycle.expert_split=importance"], "upcycle.expert_split"),  # G = 1
             (["upcycle=importance_g2", f"upcycle.calibration={text}", "upcycle.calibration_tokens=100"],
              "upcycle.calibration_tokens"),
             (["upcycle=hidden_router"], "router_prompts")]
    for overrides, match in cases:
        with pytest.raises(UpcycleError, match=match) as e:
            compose(TINY, overrides)
        assert "\n" not in str(e.value)
    compose(TINY, ["upcycle=importance_g2", f"upcycle.calibration={text}"])  # the accepted neighbour


def test_precheck_files(tmp_path, tiny_tokenizer):
    ok = tmp_path / "c.txt"
    ok.write_text("some calibration text " * 100)
    tok = tiny_tokenizer
    for bad, match in [(tmp_path / "none.txt", "does not exist"), (tmp_path / "e.txt", "is empty")]:
        if bad.name == "e.txt":
            bad.write_text("")
        r = compose(TINY, ["upcycle=importance_g2", f"upcycle.calibration={bad}", f"data.tokenizer={tok}"])
        with pytest.raises(UpcycleError, match=match):
            check_calibration(r)
    # the random tiny model has no tokenizer for the calibration text: refused up front, naming data.tokenizer
    with pytest.raises(UpcycleError, match=r"model.source=tiny .* without a tokenizer; set data.tokenizer") as e:
        check_calibration(compose(TINY, ["upcycle=importance_g2", f"upcycle.calibration={ok}"]))
    assert "\n" not in str(e.value)
    check_calibration(compose(TINY, ["upcycle=importance_g2", f"upcycle.calibration={ok}", f"data.tokenizer={tok}"]))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("code: def f(x): return x")
    r = compose(TINY, ["upcycle=hidden_router", f"upcycle.router_prompts={prompts}", f"data.tokenizer={tok}"])
    with pytest.raises(UpcycleError, match="holds 1 files.*4"):
        check_calibration(r)
    for i in "bcd":
        (prompts / f"{i}.txt").write_text(f"prompt {i}")
    check_calibration(r)


def test_expert_sources_keys(tmp_path):
    r = compose(TINY, [f"model.expert_sources=[{tmp_path}/a,{tmp_path}/b]", "model.non_expert=average"])
    opts = upcycle_options(r)
    assert opts.expert_sources == (f"{tmp_path}/a", f"{tmp_path}/b") and opts.non_expert == "average"
    from nemo_upcycle.core.options import step0_report

    assert step0_report(opts)[0] is False
    for overrides, match in [(["model.non_expert=average"], "model.non_expert"),
                             (["model.non_expert=mean"], "model.non_expert")]:
        with pytest.raises(UpcycleError, match=match):
            compose(TINY, overrides)


def test_compare_data_variants(tmp_path):
    """The data-aware compare variants: their upcycling, their calibration text (corpus, or Shakespeare on mock
    data), and the prompts compare writes for the hidden router (one per expert, text, distinct)."""
    from nemo_upcycle.apps import compare as cmp
    from nemo_upcycle.apps.compare_data import data_overrides

    want = {"importance_split": ("importance", "virtual_group", 2),
            "clustering_split": ("clustering", "virtual_group", 2), "router_kmeans": ("contiguous", "kmeans", 1),
            "router_hidden": ("contiguous", "hidden", 1)}
    for recipe in (TINY, "smollm2_135m_upcycle"):
        base = compose(recipe)
        E, k = base.moe.num_moe_experts, base.moe.moe_router_topk
        for name, (split, router, G) in want.items():
            v = cmp.BY_NAME[name]
            extra = data_overrides(v, base, tmp_path / recipe)
            r = compose(recipe, cmp.variant_overrides(v, E, k) + extra)
            opts = upcycle_options(r)
            assert (opts.expert_split, opts.router_init_resolved, opts.granularity) == (split, router, G), name
            assert opts.num_moe_experts == E * G and opts.moe_router_topk == k * G
            if v.calibrated:  # the corpus calibrates by default; mock data gets a Shakespeare text
                assert any(x.startswith("upcycle.calibration=") for x in extra) == (not corpus_paths(base))
            if base.model.source == "tiny":  # no tokenizer of its own: compare trains one of its vocabulary
                tok = AutoTokenizer.from_pretrained(r.data.tokenizer)
                ids = tok("To be, or not to be, that is the question")["input_ids"]
                assert 0 < len(ids) and max(ids) < r.model.vocab_size <= len(tok) + 40, (len(tok), max(ids))
            else:
                assert r.data.tokenizer == base.data.tokenizer
            if v.prompts:
                d = Path(extra[-1].split("=", 1)[1])
                files = sorted(d.iterdir())
                assert len(files) == E and len({f.read_text() for f in files}) == E
                check_calibration(r)
