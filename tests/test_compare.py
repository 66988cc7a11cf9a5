"""``nemo-upcycle compare`` (nemo_upcycle/compare.py): dense continuation against every upcycling method.

Fast: the budget arithmetic against hand-computed model FLOPs (tiny and SmolLM2 recipes), every variant's overrides
composing into the intended config, the table from a synthetic result, failure reasons, bad input, a stale output
directory, a variant refused before training (outputs still written); compare deletes only what it made: --out FILE,
a foreign OUT or OUT/<variant>, a run directory a live training process holds and an OUT another compare holds
are refused with nothing touched (control: a stale start of ours is removed and trained again).
Slow (one comparison shared by the module): all nine variants of the tiny recipe for two steps, one of them made to
fail in its subprocess (a corpus file that does not exist): both outputs, a row per variant, the failure as a row,
the same first batch for every variant (the dense model's and the exact upcycles' first training losses agree), and
a second run of the same command that trains nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_upcycle.apps import compare as cmp
from nemo_upcycle.apps.cli import main as cli_main
from nemo_upcycle.config.compose import compose
from nemo_upcycle.config.translate import flops_for_run
from nemo_upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
TINY = "tiny_llama_upcycle"


# ---- budget arithmetic against a hand computation --------------------------------------------------------------
def _megatron_flops(h, d, a, g, L, ffn, V, seq, expert_ffn_total):
    """6 x (MLP + attention + logits) per token, written out here (not plan.py): MLP = h * 3 * (FFN units run per
    token) per layer (SwiGLU: gate, up, down), attention = qkv + causal scores / values + output projection."""
    mlp = h * 3 * expert_ffn_total * L
    attn = L * (h * d * (a + 2 * g) + a * d * seq + a * d * h)
    return 6 * (mlp + attn + h * V)


def test_equal_flops_steps_by_hand_tiny():
    # tiny: hidden 36, head dim 6, 6 heads, 2 KV groups, 3 layers, FFN 44, vocab 99, seq 32 (mock), 4 x 32 tokens/step
    dense = _megatron_flops(36, 6, 6, 2, 3, 44, 99, 32, 44)  # 6 * 31,644 = 189,864
    moe = _megatron_flops(36, 6, 6, 2, 3, 44, 99, 32, 2 * 44)  # top-2 whole copies: 6 * 45,900 = 275,400
    assert (dense, moe) == (189_864, 275_400)
    assert flops_for_run(compose(TINY, ["moe=dense"])) == dense
    assert flops_for_run(compose(TINY, cmp.variant_overrides(cmp.BY_NAME["copy"], 4, 2))) == moe
    # 2 MoE steps = 2 * 128 * 275,400 = 70,502,400 FLOPs; dense needs 70,502,400 / (128 * 189,864) = 2.90 -> 3 steps
    assert cmp.equal_flops_steps(2, moe, dense) == 3
    assert 3 * 128 * dense / (2 * 128 * moe) == pytest.approx(1.0341, abs=1e-4)
    assert cmp.equal_flops_steps(6, moe, dense) == 9  # 8.70 -> 9
    assert cmp.equal_flops_steps(1, moe, moe) == 1


def test_equal_flops_steps_by_hand_smollm2():
    # SmolLM2-135M: hidden 576, head dim 64, 9 heads, 3 KV groups, 30 layers, FFN 1536, vocab 49152, seq 128
    dense = _megatron_flops(576, 64, 9, 3, 30, 1536, 49152, 128, 1536)
    moe = _megatron_flops(576, 64, 9, 3, 30, 1536, 49152, 128, 2 * 1536)
    assert (dense, moe) == (820_150_272, 1_297_907_712)
    assert flops_for_run(compose("smollm2_135m_upcycle", ["moe=dense"])) == dense
    assert flops_for_run(compose("smollm2_135m_upcycle", ["upcycle=copy"])) == moe
    assert cmp.equal_flops_steps(6, moe, dense) == 9  # 6 * 1.5825 = 9.50 -> 9 (nearest whole step)
    assert cmp.equal_flops_steps(4, moe, dense) == 6  # 6.33 -> 6


def test_budget_steps():
    assert cmp.budget_steps(128, tokens=300) == 3  # rounded up to whole steps
    assert cmp.budget_steps(128, tokens=256) == 2
    assert cmp.budget_steps(128, steps=5) == 5
    assert cmp.budget_steps(128, default=6) == 6
    for kw in ({"tokens": 1, "steps": 1}, {"tokens": 0}, {"steps": 0}):
        with pytest.raises(UpcycleError):
            cmp.budget_steps(128, **kw)


@pytest.mark.parametrize("recipe", [TINY, "smollm2_135m_upcycle"])
def test_every_variant_composes_into_its_config(recipe):
    base = compose(recipe)
    E, k = base.moe.num_moe_experts, base.moe.moe_router_topk
    ref = flops_for_run(compose(recipe, cmp.variant_overrides(cmp.BY_NAME["copy"], E, k)))
    for v in cmp.VARIANTS:
        from nemo_upcycle.apps.compare_data import calibration_overrides

        data = calibration_overrides(base) if v.calibrated else []  # a mock-data recipe: Shakespeare calibration text
        data += ["upcycle.router_prompts=PROMPTS"] if v.prompts else []  # written by compare_data when it runs
        r = compose(recipe, cmp.variant_overrides(v, E, k) + data)
        assert (r.seed, r.data.seed, r.upcycle.seed) == (base.seed, base.data.seed, base.upcycle.seed)
        if v.dense:
            assert r.moe.num_moe_experts is None
            continue
        assert flops_for_run(r) == ref, v.name  # every MoE spends the copy MoE's FLOPs per token
        if v.shared:
            assert (r.moe.num_moe_experts, r.moe.moe_router_topk, r.upcycle.granularity) == (2 * E, 2 * k - 2, 2)
            assert r.moe.moe_shared_expert_intermediate_size == r.model.ffn_hidden_size and r.moe.moe_shared_expert_gate
        elif v.granular:
            assert (r.moe.num_moe_experts, r.moe.moe_router_topk, r.upcycle.granularity) == (2 * E, 2 * k, 2)
            assert r.upcycle.router_init == "virtual_group"
            assert r.upcycle.scaling == (v.name.split("_")[1] if v.name.startswith("granular") else "exact")
        else:
            assert (r.moe.num_moe_experts, r.moe.moe_router_topk, r.upcycle.granularity) == (E, k, 1)
    assert compose(recipe, list(cmp.BY_NAME["copy_pre_softmax"].overrides)).moe.moe_router_pre_softmax
    assert compose(recipe, list(cmp.BY_NAME["drop_upcycle"].overrides)).upcycle.drop_ratio == 0.5
    assert compose(recipe, list(cmp.BY_NAME["router_zeros"].overrides)).upcycle.router_init == "zeros"
    assert compose(recipe, list(cmp.BY_NAME["copy"].overrides)).upcycle.router_init == "normal"


# ---- the table from a synthetic result ---------------------------------------------------------------------------
def _row(name, **kw):
    v = cmp.BY_NAME[name]
    row = {"name": name, "what": v.what, "overrides": list(v.overrides), "dense": v.dense, "equal_flops": v.equal_flops,
           "status": "done", "steps": 2, "tokens": 256}
    row.update(kw)
    return row


def test_table_equal_tokens_and_equal_flops_columns():
    budget = {"steps": 2, "tokens_per_step": 128, "tokens": 256, "flops_per_token": 275_400.0, "flops": 256 * 275_400.0}
    rows = [_row("dense", final_loss=4.0, step0_loss=4.5, train_flops=256 * 189_864.0, tokens_per_s=80.0),
            _row("copy", final_loss=3.9, step0_loss=4.5, step0_passed=True, train_flops=256 * 275_400.0,
                 load_cv=0.21, load_max_over_mean=1.56),
            _row("dense_flops", steps=3, tokens=384, final_loss=3.8, train_flops=384 * 189_864.0),
            _row("granular_none", final_loss=4.2, step0_passed=False, step0_max_abs_logit_diff=2.5,
                 train_flops=256 * 275_400.0),
            _row("drop_upcycle", status="failed", reason="corpus file /x does not exist")]
    rows = [cmp.finish_row(r, budget["flops"]) for r in rows]
    d, c, df, g, fail = rows
    assert d["loss_equal_tokens"] == 4.0 and d["loss_equal_flops"] is None  # 0.69x the budget: no equal-FLOPs reading
    assert d["flops_ratio"] == pytest.approx(189_864 / 275_400)
    assert c["loss_equal_tokens"] == c["loss_equal_flops"] == 3.9 and c["final_ppl"] == pytest.approx(math.exp(3.9))
    assert df["loss_equal_tokens"] is None and df["loss_equal_flops"] == 3.8
    assert df["flops_ratio"] == pytest.approx(384 * 189_864 / (256 * 275_400))
    assert fail["loss_equal_tokens"] is None and fail["final_ppl"] is None
    md = cmp.markdown({"recipe": TINY, "budget": budget, "seeds": {"seed": 1, "data": 2, "upcycle": 3},
                       "variants": rows})
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(rows) and len({ln.count("|") for ln in table}) == 1  # header, rule, one row each
    line = {r["name"]: next(ln for ln in table if f"`{r['name']}`" in ln) for r in rows}
    assert "| 4.0000 | 54.60 | – | – |" in line["dense"] and "0.69x the MoE's FLOPs; no experts" in line["dense"]
    assert "| 3.9000 | 49.40 | 3.9000 | 49.40 |" in line["copy"] and "step 0 = dense" in line["copy"]
    assert "| – | – | 3.8000 | 44.70 |" in line["dense_flops"]
    assert "3 steps = 1.03x the MoE's FLOPs" in line["dense_flops"]
    assert "step 0 != dense (max dlogit 2.5)" in line["granular_none"]
    assert "**failed**: corpus file /x does not exist" in line["drop_upcycle"]
    assert "2 steps x 128 tokens = 256 tokens per variant" in md and "7.050e+07" in md


def test_failure_reason():
    log = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n"
    assert cmp.failure_reason(log, 1) == "RuntimeError: boom"
    assert cmp.failure_reason("noise\nerror: bad key moe.x\n", 2) == "bad key moe.x"
    assert cmp.failure_reason("", -9) == "killed by signal 9"
    assert cmp.failure_reason("just text", 3) == "exit code 3"


# ---- bad input, stale directories, a variant refused before training ----------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--variants", "dense,nope"], "unknown variant(s) nope"),
    (["--set", "copy=1"], "is not VARIANT:KEY=VALUE"),
    (["--variants", "dense", "--set", "copy:moe.moe_router_topk=1"], "names variant 'copy', which is not compared"),
    (["--stray"], "unrecognized argument(s) --stray"),
    (["moe.no_such_key=1"], "no_such_key"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, tmp_path, capsys):
    code = cli_main(["compare", f"--config-name={TINY}", "--steps", "1", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and match in err, err
    assert not (tmp_path / "o" / "comparison.md").exists()


def test_cli_tokens_and_steps_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "--tokens", "10", "--steps", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_stale_variant_directory_is_refused_before_training(tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / cmp.MARKER).write_text(json.dumps({"args": ["mode=train", "trainer.max_steps=7"], "status": "done"}))
    with pytest.raises(UpcycleError, match=r"other settings \(there: trainer.max_steps=7; here: .*trainer.max_steps=1"):
        cmp.compare(TINY, variants="copy", steps=1, out=tmp_path)
    assert not (tmp_path / "logs" / "copy.log").exists() and not (tmp_path / "comparison.md").exists()


def test_variant_refused_at_composition_is_a_row_and_outputs_are_written(tmp_path):
    res = cmp.compare(TINY, variants="granular_exact", steps=1, out=tmp_path,
                      sets=["granular_exact:upcycle.granularity=5"])
    (row,) = res["variants"]
    assert row["status"] == "failed" and "upcycle.granularity" in row["reason"], row
    md = (tmp_path / "comparison.md").read_text()
    assert "`granular_exact`" in md and "**failed**" in md
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "comparison.json").read_text())["variants"][0]["status"] == "failed"
    assert not (tmp_path / "logs" / "granular_exact.log").exists()  # no training process was started


# ---- compare deletes only what it made; foreign folders and live training are refused ------------------------------
BAD_CORPUS = ["dense:data.kind=files", "dense:data.paths=[/nonexistent/corpus.txt]"]  # train.py refuses it at once


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): None if p.is_dir() else p.read_bytes() for p in d.rglob("*")}


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "results.csv").write_text("a user's numbers")
    return path


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("a user's notes")
    code = cli_main(["compare", f"--config-name={TINY}", "--steps", "1", "--out", str(f)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"error: --out {f} is a file"), err
    assert f.read_text() == "a user's notes"


def test_foreign_out_and_foreign_variant_dir_are_refused_before_anything_is_written(tmp_path):
    from nemo_upcycle.system.files import write_mark

    out = _user_dir(tmp_path / "o")
    before = _tree(out)
    with pytest.raises(UpcycleError, match=r"--out .*/o holds files nemo-upcycle compare did not write"):
        cmp.compare(TINY, variants="dense", steps=1, out=out)
    assert _tree(out) == before
    # OUT is ours, OUT/dense is not: refused, the user's files survive byte for byte
    (out / "results.csv").unlink()
    write_mark(out, "compare")
    _user_dir(out / "dense")
    before = _tree(out)
    with pytest.raises(UpcycleError, match=r"/o/dense holds files nemo-upcycle compare did not write .* never removed"):
        cmp.compare(TINY, variants="dense", steps=1, out=out)
    assert _tree(out) == before


def _hold(lock_path: Path) -> subprocess.Popen:
    """Another process holding a lock file, as a running train.py (or compare) holds its directory."""
    p = subprocess.Popen([sys.executable, "-c", "import time; from nemo_upcycle.system.files import FileLock; "
                          f"assert FileLock({str(lock_path)!r}).acquire(); print('held', flush=True); time.sleep(300)"],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_training_dir_is_never_removed_and_a_stale_one_of_ours_is(tmp_path):
    from nemo_upcycle.apps.run_dir import LOCK
    from nemo_upcycle.system.files import MARK, read_mark, write_mark

    out = tmp_path / "o"
    run_dir = out / "dense"
    run_dir.mkdir(parents=True)
    write_mark(out, "compare")
    write_mark(run_dir, "compare-run", variant="dense")
    (run_dir / "stale.txt").write_text("from a start that was killed before its first checkpoint")
    holder = _hold(run_dir / LOCK)  # a train.py left running (e.g. by a compare killed before this fix)
    try:
        before = _tree(run_dir)
        with pytest.raises(UpcycleError, match=rf"dense is in use by a running training process \(pid {holder.pid} "):
            cmp.compare(TINY, variants="dense", steps=1, out=out, sets=BAD_CORPUS)
        assert _tree(run_dir) == before and not (out / "logs" / "dense.log").exists()
        out_holder = _hold(out / LOCK)  # another compare writing the same OUT
        try:
            with pytest.raises(UpcycleError, match=rf"--out .* is in use by another nemo-upcycle compare \(pid "
                                                   rf"{out_holder.pid} "):
                cmp.compare(TINY, variants="dense", steps=1, out=out, sets=BAD_CORPUS)
        finally:
            out_holder.kill()
            out_holder.wait()
    finally:
        holder.kill()
        holder.wait()
    # negative control: once the holder is gone, the stale start (ours, no checkpoint) is removed and trained again
    res = cmp.compare(TINY, variants="dense", steps=1, out=out, sets=BAD_CORPUS)
    (row,) = res["variants"]
    assert row["status"] == "failed" and row["reason"].startswith("corpus file /nonexistent/corpus.txt"), row
    assert not (run_dir / "stale.txt").exists() and read_mark(run_dir)["kind"] == "compare-run"
    assert (run_dir / MARK).is_file() and not (run_dir / LOCK).exists() and not (out / LOCK).exists()


# ---- end to end --------------------------------------------------------------------------------------------------
FAIL_SETS = ["--set", "drop_upcycle:data.kind=files", "--set", "drop_upcycle:data.paths=[/nonexistent/corpus.txt]"]


def _compare(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "nemo_upcycle.apps.cli", "compare", f"--config-name={TINY}", "--steps", "2",
           "--out", str(out), *FAIL_SETS, "optim.warmup_steps=1"]  # an override for every variant
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    first, seconds = _compare(out)
    again, again_seconds = _compare(out)
    return {"out": out, "first": first, "seconds": seconds, "again": again, "again_seconds": again_seconds,
            "json": json.loads((out / "comparison.json").read_text())}


def _train_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in recs if r.get("kind") == "train"]


@pytest.mark.slow
def test_compare_writes_a_row_for_every_variant_and_the_plot(comparison):
    p, out = comparison["first"], comparison["out"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "comparison.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert [ln.split("`")[1] for ln in rows] == [v.name for v in cmp.VARIANTS]
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and len(png) > 20_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height >= 400  # two panels side by side
    assert not list(out.glob("*.tmp*"))  # written through temporary names, renamed
    for r in comparison["json"]["variants"]:
        assert "optim.warmup_steps=1" in json.loads((out / r["name"] / cmp.MARKER).read_text())["args"], r["name"]


@pytest.mark.slow
def test_failed_variant_is_a_row_not_a_crash(comparison):
    res, out = comparison["json"], comparison["out"]
    status = {r["name"]: r["status"] for r in res["variants"]}
    assert status.pop("drop_upcycle") == "failed" and set(status.values()) == {"done"}, status
    fail = next(r for r in res["variants"] if r["name"] == "drop_upcycle")
    assert fail["reason"].startswith("corpus file /nonexistent/corpus.txt does not exist"), fail
    line = next(ln for ln in (out / "comparison.md").read_text().splitlines() if ln.startswith("| `drop_upcycle`"))
    assert "**failed**: corpus file /nonexistent/corpus.txt does not exist" in line
    assert "drop_upcycle: FAILED" in comparison["first"].stdout


@pytest.mark.slow
def test_same_data_and_equal_flops_budget(comparison):
    res, out = comparison["json"], comparison["out"]
    rows = {r["name"]: r for r in res["variants"]}
    assert res["budget"]["dense_flops_steps"] == 3 and rows["dense_flops"]["tokens"] == 384
    assert len(_train_losses(out / "dense_flops")) == 3 and len(_train_losses(out / "copy")) == 2
    # the first batch is the same for every variant: the dense runs and the exact upcycles (the dense function at
    # step 0) report the same first training loss; softmax-then-top-k without renormalization does not
    first = {n: _train_losses(out / n)[0] for n in rows if rows[n]["status"] == "done"}
    for n in ("dense_flops", "copy", "granular_exact", "router_zeros"):
        assert first[n] == pytest.approx(first["dense"], abs=1e-6), (n, first)
    for n in ("copy_pre_softmax", "granular_none"):  # a random tiny model: its MLPs move the loss only a little
        assert abs(first[n] - first["dense"]) > 1e-5, (n, first)
    # step-0 losses on the fixed windows: exact variants equal the dense model's
    for n in ("copy", "granular_exact", "router_zeros", "dense_flops"):
        assert rows[n]["step0_loss"] == pytest.approx(rows["dense"]["step0_loss"], abs=1e-5), n
    for n, r in rows.items():
        if r["status"] != "done":
            continue
        assert r["final_loss"] is not None and r["val_curve"], n
        if r["dense"]:
            assert r["load_cv"] is None
        else:
            assert r["loss_equal_flops"] == r["loss_equal_tokens"] == r["final_loss"] and r["load_cv"] is not None
    assert rows["dense"]["loss_equal_flops"] is None and rows["dense_flops"]["loss_equal_flops"] is not None


@pytest.mark.slow
def test_second_run_skips_finished_variants(comparison):
    p = comparison["again"]
    assert p.returncode == 0, p.stderr[-3000:]
    skipped = [ln for ln in p.stdout.splitlines() if "finished earlier, skipped" in ln]
    assert len(skipped) == len(cmp.VARIANTS) - 1 and "drop_upcycle: FAILED" in p.stdout  # the failed one is retried
    assert comparison["again_seconds"] < 120, comparison["again_seconds"]
