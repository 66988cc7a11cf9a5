"""The step-0 check at every layout that trains here: ``engine/step0.py``, run by ``engine/lifecycle.py`` at the start
of online-upcycled tiny-recipe runs (``train.py --config-name=tiny_llama_upcycle``'s mode=train path, several runs per
torchrun launch: ``tests/dist_step0.py``).

What is compared: on the ranks that hold each MoE layer, the layer's own forward (router, expert-parallel exchange,
experts, combine) on seeded hidden states against the dense MLP read from the source, the router's logits and each
local expert (its expert-tensor shard) against what upcycling builds; fp32, tolerance ``STEP0_MLP_RTOL``.
Layouts (1, 2 and 4 ranks): one rank (where the whole-model logits check runs too), DP2, EP2, ETP2 (TP1), TP2+SP,
PP2, PP2 x VP2, PP2 x EP2, TP2+SP x EP2. Negative controls: one expert's down projection scaled by 1 + 1e-4 on one
rank is caught and named (layer, expert, rank) at one rank, EP2, ETP2, TP2+SP, PP2 x VP2 and PP2 x EP2; Gaussian
expert noise is reported as not function-preserving by construction while the experts still match what upcycling
builds. Every run uses ``model.vocab_size=100`` (an even vocabulary, and one dense model: the same per-layer reference
values across the 3-layer runs).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.engine import step0

SCRIPT = Path(__file__).with_name("dist_step0.py")
REPO = SCRIPT.parent.parent
PERTURB = 1e-4  # relative change of one expert's down projection: 10x the fp32 tolerance
VOCAB = "model.vocab_size=100"
FOUR = "model.num_layers=4"
TP2SP = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
PP2 = ("parallel.pipeline_model_parallel_size=2", FOUR)
VP2 = (*PP2, "parallel.virtual_pipeline_model_parallel_size=2")


# ---- the summary, the tolerance and the table (no NeMo) -----------------------------------------------------------
def record(layer, rank, diff=1e-9, ref=1e-2, experts=None, router=(0.0, 0.4)) -> dict:
    """One rank's record for one layer, as ``step0.check_layer`` makes it (experts: e -> diff, max |ref|, rows,
    idle)."""
    return {"layer": layer, "rank": rank, "tokens": 64, "local_tokens": 64, "dtype": "float32", "max_abs_diff": diff,
            "max_abs_dense": ref, "router_max_abs_diff": router[0], "router_max_abs": router[1],
            "experts": experts if experts is not None else {2 * rank: (0.0, 1.0, 30, False),
                                                            2 * rank + 1: (0.0, 1.0, 0, True)},
            "seconds": 0.01}


def test_summary_names_layer_expert_and_rank():
    opts = UpcycleOptions(4, 2)
    rtol = step0.STEP0_MLP_RTOL[torch.float32]
    clean = [record(0, 0), record(0, 1), record(1, 0), record(1, 1)]
    s = step0.summarize(clean, opts)
    assert s["passed"] and s["mismatches"] == [] and [r["layer"] for r in s["rows"]] == [0, 1]
    assert s["rows"][0]["ranks"] == [0, 1] and s["rows"][0]["experts"] == 4 and s["ranks"] == 2
    assert s["rows"][0]["idle_experts"] == [1, 3]
    assert s["equivalent_by_construction"] and s["rtol"] == rtol
    edge = [record(0, 0, experts={0: (rtol * 2.0, 2.0, 8, False)})]  # exactly at the tolerance: passes
    assert step0.summarize(edge, opts)["passed"]
    just_above = {2: (0.0, 1.0, 9, False), 3: (rtol * 1.01, 1.0, 9, False)}  # control: just above fails
    bad = clean[:3] + [record(1, 1, experts=just_above)]
    s = step0.summarize(bad, opts)
    assert not s["passed"] and s["rows"][0]["passed"] and not s["rows"][1]["experts_ok"]
    assert [(m["what"], m["layer"], m["expert"], m["rank"]) for m in s["mismatches"]] == [("expert", 1, 3, 1)]
    assert "layer 1 expert 3 on rank 1" in step0.format_summary(s)
    nan = step0.summarize([record(0, 0, diff=math.nan)], opts)  # a NaN output fails, named by layer and rank
    assert not nan["passed"] and nan["mismatches"][0]["what"] == "output" and nan["mismatches"][0]["rank"] == 0
    router = step0.summarize([record(0, 1, router=(1e-3, 0.4))], opts)
    assert not router["passed"] and router["mismatches"][0]["what"] == "router"


@pytest.mark.parametrize("kw, gemms", [({}, 1), ({"granularity": 2, "scaling": "none"}, 2), ({"granularity": 2}, 4),
                                       ({"noise_std": 0.01}, 4), ({"drop_ratio": 0.5}, 4)])
def test_expert_references_equal_one_expert_at_a_time(monkeypatch, kw, gemms):
    """Experts that are views of the dense MLP share one reference GEMM per distinct view; built ones go one by one.
    Either way each expert's reference is ``dense_mlp`` of the expert ``core.upcycle.expert_weights`` builds."""
    from nemo_upcycle.core.upcycle import expert_weights

    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(8, 12, generator=g))
    opts = UpcycleOptions(**{"num_moe_experts": 4, "moe_router_topk": 2, "scaling": "exact", **kw})
    inputs = [torch.randn(n, 8, generator=g) for n in (3, 0, 5, 2)]
    calls = []
    stock = step0.dense_mlp
    monkeypatch.setattr(step0, "dense_mlp", lambda x, *w: calls.append(x.shape[0]) or stock(x, *w))
    got = step0.expert_references(raw, opts, 1, [0, 1, 2, 3], inputs, lambda w: list(w))
    assert len(calls) == gemms
    for e, (x, y) in enumerate(zip(inputs, got)):
        w = expert_weights(*raw, opts, 1, e)
        assert torch.allclose(y, stock(x, *w), rtol=1e-6, atol=1e-6), e


def test_not_function_preserving_says_why():
    exact, why = step0.construction_note(UpcycleOptions(4, 2, noise_std=0.01))
    assert not exact and "noise" in why
    exact, why = step0.construction_note(UpcycleOptions(4, 2, moe_expert_capacity_factor=1.0))
    assert not exact and "capacity factor 1" in why
    assert step0.construction_note(UpcycleOptions(4, 2))[0]  # control: plain copies are exact
    assert step0.rtol_for(torch.bfloat16) > step0.rtol_for(torch.float32)


def test_report_shows_the_per_layer_table(tmp_path):
    from nemo_upcycle.apps.report import write_report

    opts = UpcycleOptions(4, 2)
    layers = step0.summarize([record(0, 0), record(0, 1, experts={3: (1e-3, 1.0, 5, False)})], opts)
    rec = {"step": 0, "passed": False, "logits_skipped": "the model is split over ranks", "layers": layers}
    md = write_report(tmp_path, step0=rec, summary={}).read_text()
    assert "Per-layer check" in md and "| layer | ranks | tokens | max abs diff |" in md
    assert "| 0 | 0,1 | 64 |" in md and "| expert | 0 | 3 | 1 | 0.001 |" in md and "**FAIL**" in md
    clean = {"step": 0, "passed": True, "layers": step0.summarize([record(0, 0)], opts)}
    md = write_report(tmp_path, step0=clean, summary={}).read_text()
    assert "Mismatches" not in md and "| 0 | 0 | 64 |" in md  # control: nothing to name


# ---- real runs (slow) ---------------------------------------------------------------------------------------------
def torchrun(nproc: int, plan: list[dict], work: Path, timeout: float = 1200) -> Path:
    """Run the plan under torchrun (one process per rank, the runs one after the other); the log tail on failure."""
    (work / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
           "--plan", str(work / "plan.json"), "--work", str(work)]
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
            rc = "timeout"
    assert rc == 0, f"torchrun x{nproc} failed ({rc}):\n{(work / 'log.txt').read_text()[-4000:]}"
    return work


def run(name: str, *overrides: str, bad: tuple = (), report: bool = False) -> dict:
    """A plan entry; ``bad=(layer, expert, rank)`` perturbs that expert on that rank."""
    out = {"name": name, "overrides": [VOCAB, *overrides, f"logging.report={str(report).lower()}"]}
    if bad:
        out["perturb"] = dict(zip(("layer", "expert", "rank"), bad), scale=PERTURB)
    return out


ZEROS = "upcycle.router_init=zeros"  # equal scores: top-2 takes the same two experts (2, 3) for every token
ONE = [run("one", report=True), run("one_bad", bad=(2, 1, 0)), run("one_4layers", FOUR),
       run("noise", "upcycle.noise_std=1e-3"), run("g2", "upcycle=granular_g2"), run("zeros", ZEROS)]
TWO = [run("dp2"), run("ep2", "parallel.expert_model_parallel_size=2"),
       run("ep2_bad", "parallel.expert_model_parallel_size=2", bad=(1, 3, 1), report=True),
       run("ep2_idle_bad", "parallel.expert_model_parallel_size=2", ZEROS, bad=(0, 1, 0)),
       run("etp2", "parallel.expert_tensor_parallel_size=2"),
       run("etp2_bad", "parallel.expert_tensor_parallel_size=2", bad=(0, 2, 1)),
       run("tp2sp", *TP2SP), run("tp2sp_bad", *TP2SP, bad=(2, 0, 1)),
       run("pp2", *PP2), run("pp2vp2", *VP2), run("pp2vp2_bad", *VP2, bad=(3, 0, 1))]
FOUR_RANKS = [run("pp2ep2", *PP2, "parallel.expert_model_parallel_size=2"),
              run("tp2sp_ep2", *TP2SP, "parallel.expert_model_parallel_size=2"),
              run("pp2ep2_bad", *PP2, "parallel.expert_model_parallel_size=2", bad=(3, 3, 3))]
PLANS = {1: ONE, 2: TWO, 4: FOUR_RANKS}
ALL = {r["name"]: r for plan in PLANS.values() for r in plan}
# where each layer lives (global ranks), by run
HOLDERS = {"one": {0: [0], 1: [0], 2: [0]}, "dp2": {0: [0, 1], 1: [0, 1], 2: [0, 1]},
           "pp2": {0: [0], 1: [0], 2: [1], 3: [1]}, "pp2vp2": {0: [0], 1: [1], 2: [0], 3: [1]},
           "pp2ep2": {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every run directory, by name: one launch per world size (1, 2, 4 processes)."""
    out = {}
    for nproc, plan in PLANS.items():
        work = torchrun(nproc, plan, tmp_path_factory.mktemp(f"step0_x{nproc}"))
        out.update({r["name"]: work / r["name"] for r in plan})
    return out


def step0_of(runs, name: str) -> dict:
    return json.loads((runs[name] / "step0.json").read_text())


def clean_runs() -> list[str]:
    return [name for name, r in ALL.items() if "perturb" not in r and name != "noise"]


@pytest.mark.slow
def test_every_layout_passes_on_the_ranks_that_hold_each_layer(runs):
    for name in clean_runs():
        s = step0_of(runs, name)
        layers = s["layers"]
        n = 4 if FOUR in ALL[name]["overrides"] else 3
        assert s["passed"] and layers["passed"] and layers["mismatches"] == [], (name, layers["mismatches"])
        assert [r["layer"] for r in layers["rows"]] == list(range(n)), name  # every MoE layer, once
        assert all(r["experts"] == 4 for r in layers["rows"]), name  # every expert checked somewhere
        assert all(r["max_abs_diff"] <= 1e-6 * r["max_abs_dense"] for r in layers["rows"]), name  # 10x margin
        if name in HOLDERS:
            assert {r["layer"]: r["ranks"] for r in layers["rows"]} == HOLDERS[name], name
        if name in {r["name"] for r in ONE}:  # one rank: the whole-model logits check as well
            assert s["logits_passed"] and s["max_abs_logit_diff"] < 1e-5 and s["top1_agreement"] == 1.0, name
        else:
            assert "split over ranks" in s["logits_skipped"] and "max_abs_logit_diff" not in s, name


@pytest.mark.slow
def test_same_hidden_states_and_reference_at_every_layout(runs):
    """A layer's dense reference (max |MLP output| over its check tokens) is the same wherever and however split it
    is computed: the layouts check the same thing."""
    for group in (["one", "dp2", "ep2", "etp2", "tp2sp"], ["one_4layers", "pp2", "pp2vp2", "pp2ep2"]):
        ref = {r["layer"]: r["max_abs_dense"] for r in step0_of(runs, group[0])["layers"]["rows"]}
        for name in group[1:]:
            got = {r["layer"]: r["max_abs_dense"] for r in step0_of(runs, name)["layers"]["rows"]}
            assert got.keys() == ref.keys() and all(abs(got[k] - ref[k]) <= 1e-6 * ref[k] for k in ref), (name, got)


@pytest.mark.slow
def test_perturbed_expert_is_caught_and_named(runs):
    for r in [r for r in ALL.values() if "perturb" in r]:
        p = r["perturb"]
        done = json.loads((runs[r["name"]] / "perturbed.json").read_text())
        assert done["done_on"] == p["rank"], r["name"]  # the plan names a rank that holds the expert
        s = step0_of(runs, r["name"])
        layers = s["layers"]
        assert not s["passed"] and not layers["passed"], r["name"]
        experts = [(m["layer"], m["expert"], m["rank"]) for m in layers["mismatches"] if m["what"] == "expert"]
        assert experts == [(p["layer"], p["expert"], p["rank"])], (r["name"], layers["mismatches"])
        assert {m["layer"] for m in layers["mismatches"]} == {p["layer"]}, r["name"]  # other layers pass
        assert all(r_["passed"] == (r_["layer"] != p["layer"]) for r_ in layers["rows"]), r["name"]


@pytest.mark.slow
def test_experts_no_token_reached_are_checked_too(runs):
    """A zero router sends every token to the same two experts; the other two are run on their own and checked."""
    for row in step0_of(runs, "zeros")["layers"]["rows"]:
        assert len(row["idle_experts"]) == 2 and row["experts"] == 4 and row["passed"], row
    layers = step0_of(runs, "ep2_idle_bad")["layers"]  # expert 1 (rank 0) perturbed; torch.topk's ties leave 0, 1 idle
    assert layers["rows"][0]["idle_experts"] == [0, 1]
    assert [(m["what"], m["layer"], m["expert"], m["rank"]) for m in layers["mismatches"]] == [("expert", 0, 1, 0)]
    assert layers["rows"][0]["output_ok"]  # the layer's output cannot show it: only the expert check names it


@pytest.mark.slow
def test_noise_is_not_function_preserving_and_says_why(runs):
    layers = step0_of(runs, "noise")["layers"]
    assert not layers["equivalent_by_construction"] and "noise" in layers["reason"]
    assert all(r["experts_ok"] and r["router_ok"] and not r["output_ok"] for r in layers["rows"])
    g2 = step0_of(runs, "g2")["layers"]  # control: granular experts with a virtual-group router are exact
    assert g2["equivalent_by_construction"] and g2["passed"]


@pytest.mark.slow
def test_report_has_the_table_and_the_check_costs_little(runs):
    md = (runs["one"] / "report.md").read_text()
    assert "Per-layer check" in md and md.count("| PASS |") == 3
    bad = (runs["ep2_bad"] / "report.md").read_text()
    assert "| expert | 1 | 3 | 1 |" in bad and "| FAIL |" in bad
    for name in clean_runs():
        layers = step0_of(runs, name)["layers"]
        recs = [json.loads(x) for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        step1 = next(r["step_seconds"] for r in recs if r.get("kind") == "train" and r["step"] == 1)
        print(f"{name}: step-0 layer check {layers['wall_seconds']:.3f} s, training step 1 {step1:.3f} s")
        assert layers["wall_seconds"] < step1, name
