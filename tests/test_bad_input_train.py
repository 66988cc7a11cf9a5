"""Bad training input (``python train.py``): refused in one line naming the key or the file, exit code 2, before NeMo is
imported and before a run directory exists, printed once under torchrun; nothing left behind.

  * Hydra values: NaN / inf in every float key, every numeric key against its range (``conf_validate.RANGES``, one
    entry per numeric field), the relations (min_lr <= lr, data.seq_length <= model.seq_length, ...);
  * the dense source (a path: opened headers-only by the precheck): missing, corrupt, sizes other than the recipe's,
    data.seq_length above its max_position_embeddings;
  * the corpus: missing, a directory, empty, not text (the fraction of undecodable bytes named; the precheck reads a
    prefix, data_prep the whole file), too small for one training and one validation batch;
  * memory: a CPU run whose estimated peak exceeds the machine (tests/test_plan.py: the estimate against measured
    peaks, and the refusal);
  * launchers: torchrun's world other than the recipe's, one error line from two processes;
  * what a refusal leaves: nothing in the parent of hydra.run.dir (precheck refusals, and a refusal the build finds:
    the run directory this invocation made is removed again), no run_identity.json, no tokenizer staging directory,
    no Fiddle dump under the error line.
Every refusal has its accepted neighbour beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import make_llama, refused_then_neighbour
from nemo_upcycle.apps.precheck import check_data, check_launcher, check_source, launcher_overrides
from nemo_upcycle.config import schema as conf_schema
from nemo_upcycle.config import validate as conf_validate
from nemo_upcycle.config.compose import compose
from nemo_upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = "tiny_llama_upcycle"


# ---- Hydra values (in process: conf_validate.validate) ---------------------------------------------------------------
def numeric_keys() -> dict[str, type]:
    """Every numeric field of RunConfig by its declared type (int / float, Optional or not)."""
    out = {}
    for f in dataclasses.fields(conf_schema.RunConfig):
        schema = conf_schema.GROUPS.get(f.name)
        fields = [(f"{f.name}.{g.name}", g.type) for g in dataclasses.fields(schema)] if schema else [(f.name, f.type)]
        for key, hint in fields:
            t = eval(hint, vars(conf_schema), vars(typing)) if isinstance(hint, str) else hint  # noqa: S307
            args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
            if args[0] in (int, float):
                out[key] = args[0]
    return out


def test_every_numeric_key_has_a_range():
    keys = numeric_keys()
    assert len(keys) > 40 and set(conf_validate.RANGES) == set(keys)
    assert {k for k, t in keys.items() if t is float} >= {"optim.lr", "model.rotary_base", "upcycle.router_std"}
    # negative control: a key without a range is found (a KeyError in check_numbers, caught by this set comparison)
    assert set(conf_validate.RANGES) - {"optim.clip_grad"} != set(keys)


def _with(run, key: str, value):
    group, _, name = key.rpartition(".")
    if not group:
        return dataclasses.replace(run, **{name: value})
    return dataclasses.replace(run, **{group: dataclasses.replace(getattr(run, group), **{name: value})})


def _outside_inside(spec: str) -> tuple[list, object]:
    """Values just outside the interval, and its edge inside (or its middle / a little above an open low end)."""
    lo, hi, lo_in, hi_in = conf_validate._interval(spec)
    bad = [lo - 1 if lo_in else lo] + ([] if hi == math.inf else [hi + 1 if hi_in else hi])
    return bad, (lo if lo_in else (lo + hi) / 2 if hi < math.inf else lo + 1e-6)


@pytest.mark.parametrize("key", sorted(conf_validate.RANGES))
def test_every_numeric_key_is_refused_outside_its_range(key):
    run = compose(TINY)
    typ = numeric_keys()[key]
    bad, good = _outside_inside(conf_validate.RANGES[key])
    for v in bad:
        v = typ(v) if typ is int else float(v)
        with pytest.raises(UpcycleError, match=rf"^{key}={v} is out of range; {key} must be "):
            conf_validate.check_numbers(_with(run, key, v))
    conf_validate.check_numbers(_with(run, key, typ(good)))  # negative control: the edge inside is accepted


@pytest.mark.parametrize("key", sorted(k for k, t in numeric_keys().items() if t is float))
def test_nan_and_inf_in_every_float_key_are_refused_by_name(key):
    run = compose(TINY)
    for v in (math.nan, math.inf, -math.inf):
        with pytest.raises(UpcycleError, match=rf"^{key}={v} is not a finite number"):
            conf_validate.check_numbers(_with(run, key, v))


BAD_OVERRIDES = {  # Hydra override -> (words of the one error line, the accepted neighbour)
    "optim.lr=nan": ("optim.lr=nan is not a finite number", "optim.lr=0.5"),
    "moe.moe_aux_loss_coeff=inf": ("moe.moe_aux_loss_coeff=inf is not a finite number", "moe.moe_aux_loss_coeff=0"),
    "trainer.max_steps=0": ("trainer.max_steps=0 is out of range; trainer.max_steps must be >= 1",
                            "trainer.max_steps=1"),
    "optim.lr=0": ("optim.lr=0.0 is out of range; optim.lr must be > 0", "optim.lr=1e-2"),
    "optim.min_lr=-1e-5": ("optim.min_lr=-1e-05 is out of range", "optim.min_lr=0"),
    "optim.min_lr=0.5": ("optim.min_lr=0.5 is above optim.lr=0.01", "optim.min_lr=0.01"),
    "trainer.val_check_interval=0": ("trainer.val_check_interval=0 is out of range", "trainer.val_check_interval=1"),
    "data.micro_batch_size=0": ("data.micro_batch_size=0 is out of range", "data.micro_batch_size=1"),
    "data.global_batch_size=-4": ("data.global_batch_size=-4 is out of range", "data.global_batch_size=2"),
    "data.seq_length=0": ("data.seq_length=0 is out of range", "data.seq_length=1"),
    "trainer.limit_val_batches=-1": ("trainer.limit_val_batches=-1 is out of range", "trainer.limit_val_batches=0"),
    "trainer.eval_windows=-1": ("trainer.eval_windows=-1 is out of range", "trainer.eval_windows=0"),
    "trainer.checkpoint_every_n_steps=-1": ("checkpoint_every_n_steps=-1 is out of range",
                                            "trainer.checkpoint_every_n_steps=0"),
    "optim.warmup_steps=-1": ("optim.warmup_steps=-1 is out of range", "optim.warmup_steps=0"),
    "optim.clip_grad=-1": ("optim.clip_grad=-1.0 is out of range", "optim.clip_grad=0"),
    "data.validation_fraction=1": ("data.validation_fraction=1.0 is out of range; data.validation_fraction must be > 0 "
                                   "and < 1", "data.validation_fraction=0.5"),
    "model.hidden_size=0": ("model.hidden_size=0 is out of range", "model.hidden_size=36"),
    "optim.adam_beta2=1": ("optim.adam_beta2=1.0 is out of range; optim.adam_beta2 must be >= 0 and < 1",
                           "optim.adam_beta2=0.999"),
    "data.seq_length=65": ("data.seq_length=65 is above the model's maximum positions model.seq_length=64",
                           "data.seq_length=64"),
    "model.num_query_groups=4": ("model.num_query_groups=4 does not divide model.num_attention_heads=6",
                                 "model.num_query_groups=3"),
    "moe.moe_token_dispatcher_type=ring": ("moe.moe_token_dispatcher_type='ring' is not one of",
                                           "moe.moe_token_dispatcher_type=allgather"),
    "moe.moe_shared_expert_gate=true": ("moe.moe_shared_expert_gate needs shared experts",
                                        "moe=e8_top2_shared"),
    "moe.moe_shared_expert_intermediate_size=30": (
        "moe.moe_shared_expert_intermediate_size=30 (the shared expert's size) is not a multiple of the routed expert "
        "size 44",
        "moe.moe_shared_expert_intermediate_size=88"),
    "moe.moe_shared_expert_intermediate_size=0": ("moe.moe_shared_expert_intermediate_size=0 is out of range",
                                                  "moe.moe_shared_expert_intermediate_size=null"),
}


@pytest.mark.parametrize("override", list(BAD_OVERRIDES))
def test_bad_hydra_value_is_one_line_naming_the_key(override):
    words, good = BAD_OVERRIDES[override]
    refused_then_neighbour(TINY, [override], words, [good])  # negative control: the neighbour validates


# ---- the dense source, the corpus (in process: precheck) ------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(48)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tok50"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(str(path))
    return path


def text_run(paths, *more):
    return compose(TINY, ["data=text_files", "data.seq_length=32", f"data.paths=[{','.join(map(str, paths))}]", *more])


@pytest.fixture()
def tok_arg(tokenizer) -> str:
    return f"data.tokenizer={tokenizer}"


def test_source_path_is_opened_and_compared_with_the_recipe(tiny_llama, tmp_path):
    assert check_source(compose(TINY, [f"model.source={tiny_llama}"]))["hidden_size"] == 36  # the accepted one
    assert check_source(compose(TINY)) is None  # "tiny": made by the run, not opened here
    with pytest.raises(UpcycleError, match="nope does not exist"):
        check_source(compose(TINY, [f"model.source={tmp_path / 'nope'}"]))
    bigger = make_llama(tmp_path / "wide", hidden_size=48)
    with pytest.raises(UpcycleError, match=r"has hidden_size=48 but the recipe says model.hidden_size=36; .* "
                                           r"set model.hidden_size=48"):
        check_source(compose(TINY, [f"model.source={bigger}"]))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UpcycleError, match="symbolic link that leads nowhere"):
        check_source(compose(TINY, [f"model.source={loop}"]))


def test_seq_length_above_the_sources_positions_is_refused(tiny_llama):
    longer = ["model.seq_length=128", f"model.source={tiny_llama}"]  # the recipe claims 128, the source has 64
    with pytest.raises(UpcycleError, match=r"data.seq_length=65 is above the dense source's maximum positions .*"
                                           r"max_position_embeddings=64.*lower data.seq_length to at most 64"):
        check_source(compose(TINY, [*longer, "data.seq_length=65"]))
    check_source(compose(TINY, [*longer, "data.seq_length=64"]))  # negative control


def test_corpus_that_is_a_directory_empty_or_missing_is_named(tmp_path, tokenizer):
    (tmp_path / "texts").mkdir()
    (tmp_path / "empty.txt").write_text("")
    for path, words in ((tmp_path / "texts", "texts is a directory, not a file; pass the files in it"),
                        (tmp_path / "empty.txt", "empty.txt is empty"),
                        (tmp_path / "nope.txt", "nope.txt does not exist")):
        with pytest.raises(UpcycleError, match=words):
            check_data(text_run([path]))
    with pytest.raises(UpcycleError, match="data.paths"):
        check_data(compose(TINY, ["data=text_files", "data.seq_length=32"]))
    good = tmp_path / "good.txt"
    good.write_text("w1 w2 w3 " * 3000)
    check_data(text_run([good], f"data.tokenizer={tokenizer}"))  # negative control


def test_corpus_too_small_for_a_validation_batch_is_refused_before_tokenizing(tmp_path, tok_arg):
    f = tmp_path / "c.txt"
    f.write_text("w1 " * 1500)  # 4,500 bytes: at most 4,502 tokens, 5% = 226 = 7 windows of 32 < a batch of 8
    with pytest.raises(UpcycleError, match=r"at most 4502 tokens .* data.global_batch_size=8"):
        check_data(text_run([f]))
    check_data(text_run([f], "data.global_batch_size=6", tok_arg))  # negative control: 6 windows fit in 7


def test_text_data_needs_a_tokenizer(tmp_path, tokenizer, tiny_llama):
    f = tmp_path / "c.txt"
    f.write_text("w1 w2 w3 " * 3000)
    with pytest.raises(UpcycleError, match="model.source=tiny is a random model made by the run, without a tokenizer"):
        check_data(text_run([f]))
    with pytest.raises(UpcycleError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\).*data.tokenizer"):
        check_data(text_run([f], f"model.source={tiny_llama}"))
    with_tok = Path(shutil.copytree(tiny_llama, tmp_path / "dense"))
    shutil.copy(tokenizer / "tokenizer.json", with_tok / "tokenizer.json")
    check_data(text_run([f], f"model.source={with_tok}"))  # negative controls: the source's own, or data.tokenizer
    check_data(text_run([f], f"data.tokenizer={tokenizer}"))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("w1 w2 w3 " * 3000)
    with pytest.raises(UpcycleError, match="has 50 tokens but the model's vocabulary is 40"):
        check_data(text_run([f], f"data.tokenizer={tokenizer}", "model.vocab_size=40"))
    check_data(text_run([f], f"data.tokenizer={tokenizer}"))  # negative control: 50 ids fit in 99


# ---- not text ----------------------------------------------------------------------------------------------------
def test_not_text_bytes_counts_undecodable_and_nul_bytes():
    from nemo_upcycle.data.text import not_text_bytes

    assert not_text_bytes("Æther, ünïcode — ok\n".encode()) == 0
    assert not_text_bytes(b"ab\x00c\xff\xfe") == 3
    assert not_text_bytes("é".encode()[:1], final=False) == 0  # a prefix cut inside a character
    assert not_text_bytes("é".encode()[:1]) == 1


def test_binary_or_latin1_corpus_is_refused_with_the_fraction(tmp_path):
    from nemo_upcycle.data.text import check_corpus_file

    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 400)  # 128 of 256 byte values are not UTF-8 alone, + NUL
    with pytest.raises(UpcycleError, match=r"weights.txt is not text: 50.4% of its 102400 bytes are not UTF-8"):
        check_corpus_file(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("Ma vie " * 20 + "\xe9t\xe9 ").encode("latin-1") * 100)  # 2 of 144 bytes: 1.4%
    with pytest.raises(UpcycleError, match=r"1.4% of its 14400 bytes"):
        check_corpus_file(latin1)
    latin1.write_bytes(("Ma vie " * 40 + "\xe9t\xe9 ").encode("latin-1") * 100)  # 0.7%: accepted
    assert check_corpus_file(latin1) == latin1.stat().st_size + 2


def test_binary_after_the_prefix_is_refused_by_data_prep(tmp_path):
    """The precheck reads a prefix; the full tokenization meets the rest and refuses it (txt and jsonl)."""
    from nemo_upcycle.data.prepare import read_documents
    from nemo_upcycle.data.text import check_corpus_file

    f = tmp_path / "tail.txt"
    f.write_bytes(b"w1 w2 " * 1000 + bytes(range(128, 256)) * 100)
    assert check_corpus_file(f, prefix_bytes=6000) == f.stat().st_size + 2  # the prefix is text
    with pytest.raises(UpcycleError, match=r"tail.txt is not text: 68.1% of its 18800 bytes"):
        list(read_documents(f))
    j = tmp_path / "tail.jsonl"
    data = b"".join(b'{"text": "w%d \xff\xfe"}\n' % i for i in range(100))  # raw bytes inside valid JSON lines
    j.write_bytes(data)
    with pytest.raises(UpcycleError, match=rf"tail.jsonl is not text: {200 / len(data):.1%} of its {len(data)} bytes"):
        list(read_documents(j))
    j.write_bytes(b'{"text": "w1"}\n' + b"\xff" * 200 + b"\n")  # a line of binary: named as such, not as bad JSON
    with pytest.raises(UpcycleError, match=r"tail.jsonl is not text: 99.5% of line 2's 201 bytes"):
        list(read_documents(j))
    j.write_bytes(b"".join(json.dumps({"text": f"w{i} \xe9"}).encode() + b"\n" for i in range(100)))  # escaped: text
    assert len(list(read_documents(j))) == 100  # negative control


# ---- launchers (in process) -------------------------------------------------------------------------------------
def test_launcher_world_other_than_the_recipes_names_the_fix(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "RANK"):
        monkeypatch.delenv(var, raising=False)
    check_launcher(compose(TINY))  # no launcher
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UpcycleError, match=r"^torchrun started 2 processes but the recipe's world is parallel."
                                           r"num_nodes x parallel.devices = 1 x 1 = 1; add parallel.devices=2 "
                                           r"\(or start 1 process\)"):
        check_launcher(compose(TINY, ["parallel.expert_model_parallel_size=2"]))
    check_launcher(compose(TINY, ["parallel=cpu_2_ep2"]))  # negative control: 2 = 1 x 2
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of two
    with pytest.raises(UpcycleError, match=r"add parallel.num_nodes=2 parallel.devices=2"):
        check_launcher(compose(TINY))
    # what train.py does instead of refusing: the launcher's world as overrides (none when they agree)
    assert launcher_overrides(compose(TINY)) == ["parallel.num_nodes=2", "parallel.devices=2"]
    assert launcher_overrides(compose(TINY, ["parallel.num_nodes=2", "parallel.devices=2"])) == []
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")  # srun: 2 nodes, 4 tasks
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert launcher_overrides(compose(TINY)) == ["parallel.num_nodes=2", "parallel.devices=2"]


# ---- python train.py / torchrun (subprocesses; NeMo made unimportable: the precheck must not need it) --------------
@pytest.fixture(scope="module")
def no_nemo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no_nemo")
    (d / "nemo").mkdir()
    (d / "nemo" / "__init__.py").write_text("raise ImportError('NeMo imported before the precheck refused')\n")
    return d


def _env(*paths) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(map(str, (*paths, REPO)))}


def train_py(base: Path, *args, env=None, launcher=()) -> tuple[subprocess.CompletedProcess, Path]:
    """``train.py --config-name=tiny ARGS hydra.run.dir=base/a/run`` in a fresh ``base`` (two levels to be made)."""
    base.mkdir(parents=True, exist_ok=True)
    run_dir = base / "a" / "run"
    cmd = [*launcher, str(REPO / "train.py"), f"--config-name={TINY}", *map(str, args), f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd if launcher else [PY, *cmd], cwd=base, env=env or _env(), capture_output=True, text=True,
                          timeout=600), run_dir


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def assert_refused_leaving_nothing(r: subprocess.CompletedProcess, base: Path, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    assert list(base.iterdir()) == [], "the refusal left something in the parent of hydra.run.dir"
    return lines[0]


@pytest.fixture(scope="module")
def sources(tiny_llama, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sources")
    broken = Path(shutil.copytree(tiny_llama, d / "truncated"))
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    (d / "texts").mkdir()
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4000)
    return {"truncated": broken, "texts": d / "texts", "binary": d / "binary.txt", "dense": tiny_llama}


PRECHECK_CASES = {  # train.py arguments -> words of the one error line: one per kind of check (the rest in process)
    "max_steps": (["trainer.max_steps=0"], "trainer.max_steps=0 is out of range"),
    "nan lr": (["optim.lr=nan"], "optim.lr=nan is not a finite number"),
    "source truncated": (["model.source={truncated}"], "truncated or corrupt"),
    "corpus directory": (["data=text_files", "data.seq_length=32", "data.paths=[{texts}]"],
                         "is a directory, not a file; pass the files in it"),
    "corpus binary": (["data=text_files", "data.seq_length=32", "data.paths=[{binary}]"],
                      "binary.txt is not text: 50.4% of its 1024000 bytes are not UTF-8"),
    "memory": (["model.seq_length=100000", "data.seq_length=100000"], "needs about 2725"),
}


@pytest.fixture(scope="module")
def precheck_runs(sources, no_nemo, tmp_path_factory) -> dict:
    """Every PRECHECK_CASES run (two at a time: the machine has 2 cores), with NeMo unimportable."""
    base = tmp_path_factory.mktemp("precheck")

    def one(item):
        key, (args, _) = item
        return key, (*train_py(base / key.replace(" ", "_"), *[a.format(**sources) for a in args],
                               env=_env(no_nemo)), base / key.replace(" ", "_"))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, PRECHECK_CASES.items()))


@pytest.mark.parametrize("case", list(PRECHECK_CASES))
def test_train_py_refuses_before_nemo_and_leaves_nothing(precheck_runs, case):
    r, _, base = precheck_runs[case]
    assert_refused_leaving_nothing(r, base, PRECHECK_CASES[case][1])


def test_train_py_accepted_neighbours_pass_the_precheck(sources, no_nemo, tmp_path, tok_arg):
    """Negative control of the subprocess cases: the same recipe with good values passes train.py's precheck (mode=plan
    stops there) and the checks it skips for plan pass in process on the good source and corpus."""
    from nemo_upcycle.apps.modes import preflight

    r, run_dir = train_py(tmp_path, "mode=plan", "trainer.max_steps=1", f"model.source={sources['dense']}")
    assert r.returncode == 0 and (run_dir / "plan.json").is_file(), r.stderr[-3000:]
    good = tmp_path / "good.txt"
    good.write_text("w1 w2 w3 " * 3000)
    preflight(compose(TINY, [f"model.source={sources['dense']}", "data=text_files", "data.seq_length=32",
                             f"data.paths=[{good}]", tok_arg]), TINY)
    # and the poisoned NeMo of those runs is real: a run that gets past the precheck fails on it
    r, _ = train_py(tmp_path / "past", env=_env(no_nemo))
    assert r.returncode != 0 and "NeMo imported before the precheck refused" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_world_is_taken_and_errors_are_one_line_from_rank_0(no_nemo, tmp_path):
    """The launcher defines the world: 2 torchrun processes on a 1 x 1 recipe become parallel.devices=2 (one note,
    from rank 0); what is then refused is refused once, by the layout rule it breaks (not a claimed 'world 1')."""
    torchrun = [str(Path(PY).parent / "torchrun"), "--nproc_per_node", "2"]
    for i, (args, words) in enumerate(((["parallel.expert_model_parallel_size=3"], "expert_model_parallel_size=3"),
                                       (["optim.lr=nan"], "optim.lr=nan"))):
        base = tmp_path / str(i)
        r, _ = train_py(base, *args, env=_env(no_nemo), launcher=torchrun)
        # torchrun exits 1 and reports the first rank that exited (2); it may stop the other one with SIGTERM
        assert r.returncode == 1 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
        assert len(error_lines(r)) == 1 and words in error_lines(r)[0], r.stderr[-3000:]
        assert "world 1" not in r.stderr and list(base.iterdir()) == []
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "as parallel.devices=2; the recipe said" in notes[0], r.stderr[-3000:]
    # negative control: mode=plan describes a cluster and runs under any launcher
    r, run_dir = train_py(tmp_path / "plan", "mode=plan", env=_env(no_nemo), launcher=torchrun)
    assert r.returncode == 0 and (run_dir / "plan.json").is_file(), r.stderr[-3000:]


# ---- what the build refuses (NeMo imported): the run directory this invocation made is removed ----------------------
@pytest.mark.slow
def test_refusal_found_by_the_build_leaves_nothing_and_no_fiddle_dump(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w1 w2 " * 1000)  # passes the precheck's bound (6,002 bytes); 2,000 tokens: 3 validation windows
    args = ["data=text_files", "data.seq_length=32", f"data.paths=[{corpus}]", f"data.tokenizer={tokenizer}"]
    env = {**_env(), "NEMO_UPCYCLE_DATA_CACHE": str(tmp_path / "cache")}
    r, _ = train_py(tmp_path / "fresh", *args, env=env)
    assert r.returncode == 2 and len(error_lines(r)) == 1, r.stderr[-3000:]  # NeMo's import warnings come before it
    assert "the validation split has 3 windows" in error_lines(r)[0]
    assert r.stderr.strip().splitlines()[-1] == error_lines(r)[0] and len(error_lines(r)[0]) < 300
    assert "Fiddle context" not in r.stderr
    assert list((tmp_path / "fresh").iterdir()) == [], "the refused run left its run directory"
    # a run directory that existed before is the user's: kept, but no run_identity.json nor staging left in it
    kept = tmp_path / "kept" / "a" / "run"
    kept.mkdir(parents=True)
    r, _ = train_py(tmp_path / "kept", *args, env=env)
    assert r.returncode == 2 and len(error_lines(r)) == 1, r.stderr[-3000:]
    left = sorted(p.name for p in kept.iterdir())
    assert "run_identity.json" not in left and not any(".tmp" in n for n in left) and ".nemo-upcycle" not in left, left


# ---- the pieces of "nothing left" (in process) ----------------------------------------------------------------------
def test_tokenizer_is_written_through_a_staging_directory(tmp_path, monkeypatch):
    import nemo_upcycle.data.sources as hs
    from nemo_upcycle.data.sources import tokenizer_dir

    class Broken:
        def save_tokenizer(self, out):
            (Path(out) / "tokenizer.json").write_text("{}")
            raise UpcycleError("the GGUF has no tokenizer")

    class Good:
        def save_tokenizer(self, out):
            (Path(out) / "tokenizer.json").write_text("{}")

    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF")
    monkeypatch.setattr(hs, "open_dense", lambda p: Broken())
    with pytest.raises(UpcycleError, match="no tokenizer"):
        tokenizer_dir(src, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # no tokenizer/, no tokenizer.tmp, no staging directory
    monkeypatch.setattr(hs, "open_dense", lambda p: Good())
    assert tokenizer_dir(src, tmp_path / "run") == str(tmp_path / "run" / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer"]
    # and no mark in it: the HF export copies every file of the tokenizer directory
    assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == ["tokenizer.json"]


def test_tiny_dense_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from nemo_upcycle.data.sources import make_tiny_llama

    real = LlamaForCausalLM.save_pretrained

    def killed(self, out, **kw):
        (Path(out) / "config.json").write_text("{}")  # what save_pretrained writes first
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        make_tiny_llama(compose(TINY).model, tmp_path / "dense_tiny")
    assert list(tmp_path.iterdir()) == []  # no half model that a restart would take for a whole one
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", real)
    out = make_tiny_llama(compose(TINY).model, tmp_path / "dense_tiny")  # negative control
    assert (out / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir()] == ["dense_tiny"]


def test_fiddle_dump_is_stripped_from_a_refusal_raised_inside_the_build():
    import fiddle as fdl

    from nemo_upcycle.engine.build import without_fiddle_context

    def corpus(paths, seq_length):
        raise UpcycleError("the corpus has 31 tokens; add text.")

    with pytest.raises(UpcycleError) as e:
        fdl.build(fdl.Config(corpus, paths=["/d/a.txt"] * 50, seq_length=256))
    assert "Fiddle context" in str(e.value)  # what train.py printed before
    plain = without_fiddle_context(e.value)
    assert isinstance(plain, UpcycleError) and str(plain) == "the corpus has 31 tokens; add text."


# ---- layouts Megatron forbids, or only a GPU runs: refused before anything is built --------------------------------
def test_layouts_megatron_or_the_cpu_cannot_run_are_refused_up_front(monkeypatch):
    from nemo_upcycle.apps.modes import check_gpu
    from nemo_upcycle.config.validate import check_layout

    world2 = ["parallel.devices=2", "model.vocab_size=100"]
    with pytest.raises(UpcycleError, match=r"need parallel.sequence_parallel=true"):
        check_layout(compose(TINY, [*world2, "parallel.tensor_model_parallel_size=2"]))
    with pytest.raises(UpcycleError, match=r"need parallel.sequence_parallel=true"):  # the megatron-core NameError
        check_layout(compose(TINY, ["parallel.devices=4", "model.vocab_size=100",
                                    "parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2"]))
    check_layout(compose(TINY, [*world2, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]))
    cp = compose(TINY, [*world2, "parallel.context_parallel_size=2"])
    check_layout(cp)  # a valid Megatron layout (plan mode describes it) ...
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UpcycleError, match=r"context_parallel_size=2 needs Transformer Engine's attention"):
        check_gpu(cp, TINY)  # ... that this machine cannot train
    check_gpu(compose(TINY, world2), TINY)  # negative control: CP 1 trains here
