"""The recipe catalog (conf/ = recipes/ = nemo-upcycle recipes), train.py's refusals and plan mode, the NGC jobs.

  * every YAML in conf/ (top-level recipes and group options) composes with Hydra and validates;
  * bad overrides (k > E, EP not dividing E, a misspelled key, a wrong type) and a GPU recipe trained on this
    CPU machine: ``python train.py`` exits 2 with one ``error:`` line naming the key, and no run directory;
  * plan mode: the total parameter count equals a closed form typed out here and transformers' Mixtral on the
    meta device, and the 8x8B plan fits the memory of the GPU it names;
  * recipes/<name>.py (slow: imports NeMo): ``run.Partial(llm.train)`` equal to the engine's Partial of the
    composed YAML, fields as in the YAML, overrides change it, the tiny one builds (NeMo's ``nemo llm train
    --factory NAME``: test_nemo_cli.py);
  * examples/: the Slurm script renders (dry run writes nothing) and equals the committed one; NeMo-Run's dry run
    prints the sbatch script of its SlurmExecutor.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from nemo_upcycle.config import compose as catalog
from nemo_upcycle.config.validate import check_layout
from nemo_upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "nemo_upcycle" / "conf"
PY = sys.executable
if str(REPO) not in sys.path:  # recipes/ and examples/ are top-level directories of the checkout
    sys.path.insert(0, str(REPO))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
TOP = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_FILES = sorted(p.relative_to(CONF) for p in CONF.glob("*/*.yaml"))


TRAIN_RUNS = {  # every `python train.py ARGS hydra.run.dir=<tmp>/x` this module checks
    "plan": ("--config-name=llama3_8x8b_upcycle", "mode=plan"),
    "k>E": ("--config-name=llama3_8x8b_upcycle", "mode=plan", "moe.moe_router_topk=9"),
    "EP3": ("--config-name=llama3_8x8b_upcycle", "mode=plan", "parallel.expert_model_parallel_size=3"),
    "misspelled": ("--config-name=llama3_8x8b_upcycle", "mode=plan", "moe.num_experts=8"),
    "wrong type": ("--config-name=llama3_8x8b_upcycle", "mode=plan", "moe.moe_router_topk=two"),
    "gpu train": ("--config-name=llama3_8x8b_upcycle", "mode=train"),
}


class TrainRuns:
    """Runs TRAIN_RUNS one after the other in a background thread (one subprocess beside pytest: the machine has 2
    cores), so they overlap with the in-process tests; ``get(key)`` waits for one."""

    def __init__(self, base: Path):
        self.results: dict = {}
        self.ready = {key: threading.Event() for key in TRAIN_RUNS}
        threading.Thread(target=self._work, args=(base,), daemon=True).start()

    def _work(self, base: Path) -> None:
        for i, (key, args) in enumerate(TRAIN_RUNS.items()):
            run_dir = base / f"run{i}" / "x"
            run_dir.parent.mkdir(parents=True)
            try:
                self.results[key] = (subprocess.run([PY, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                                                    cwd=run_dir.parent, env=ENV, capture_output=True, text=True,
                                                    timeout=600), run_dir)
            except Exception as e:  # noqa: BLE001 -- re-raised in the test that asks for it
                self.results[key] = (e, run_dir)
            self.ready[key].set()

    def get(self, key: str) -> tuple[subprocess.CompletedProcess, Path]:
        assert self.ready[key].wait(900), f"python train.py {' '.join(TRAIN_RUNS[key])} did not finish"
        r, run_dir = self.results[key]
        if isinstance(r, Exception):
            raise r
        return r, run_dir


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory) -> TrainRuns:
    return TrainRuns(tmp_path_factory.mktemp("train_py"))


@pytest.fixture(scope="module", autouse=True)
def _start_train_runs_early(request):
    if any("train_runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("train_runs")


def assert_refused(r: subprocess.CompletedProcess, run_dir: Path, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not run_dir.exists(), "a run directory was created"
    return lines[0]


# ---- conf/: every file composes and validates ------------------------------------------------------------------
def test_catalog_lists_the_top_level_yaml_files():
    assert catalog.recipe_names() == TOP
    assert {"llama3_8x8b_upcycle", "llama3_1_8x8b_upcycle", "llama3_2_8x1b_upcycle", "smollm2_135m_upcycle",
            "tiny_llama_upcycle"} <= set(TOP)
    recipes = REPO / "nemo_upcycle" / "engine" / "recipes"
    assert sorted(p.stem for p in recipes.glob("*.py") if p.stem != "__init__") == TOP
    assert sorted(CONF.rglob("*.yaml")) == sorted([CONF / f"{n}.yaml" for n in TOP] + [CONF / g for g in GROUP_FILES])
    with pytest.raises(UpcycleError, match="unknown recipe 'nope'"):
        catalog.compose("nope")


@pytest.mark.parametrize("name", TOP)
def test_top_level_recipe_composes_and_validates(name):
    r = catalog.compose(name)
    check_layout(r)  # the Megatron layout of its parallel group is valid as well
    assert r.model.num_layers > 0 and r.moe.moe_router_topk <= r.moe.num_moe_experts
    assert catalog.describe(name) and "\n" not in catalog.describe(name)


def test_catalog_refuses_what_train_py_refuses():
    """recipes/<name>.py and examples/ compose through the same validation as train.py: ranges, NaN, relations."""
    kwargs = catalog.overrides_from_kwargs({"optim__lr": float("nan"), "trainer__max_steps": 100})
    with pytest.raises(UpcycleError, match=r"^optim.lr=nan is not a finite number"):
        catalog.compose("llama3_8x8b_upcycle", kwargs)
    with pytest.raises(UpcycleError, match=r"data.seq_length=16384 is above the model's maximum positions "
                                           r"model.seq_length=8192"):
        catalog.compose("llama3_8x8b_upcycle", ["data.seq_length=16384"])
    with pytest.raises(UpcycleError, match=r"^trainer.max_steps=0 is out of range"):
        catalog.compose("llama3_8x8b_upcycle", catalog.overrides_from_kwargs({"trainer__max_steps": 0}))
    # negative control: the same keys with good values compose
    good = catalog.compose("llama3_8x8b_upcycle", catalog.overrides_from_kwargs({"optim__lr": 3e-4,
                                                                                "trainer__max_steps": 100}))
    assert (good.optim.lr, good.trainer.max_steps) == (3e-4, 100)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# what an option cannot say itself: the hidden router's prompt directory is the user's (checked when training starts)
NEEDS = {"upcycle/hidden_router.yaml": ["upcycle.router_prompts=/data/router_prompts"]}


@pytest.mark.parametrize("rel", GROUP_FILES, ids=[str(p) for p in GROUP_FILES])
def test_group_option_composes_and_validates(rel):
    """Each group option swapped into a recipe it fits (8x8B, else the tiny CPU one) composes and validates, and
    every value its YAML sets arrives in the validated config (the file is really read)."""
    group, option = rel.parent.name, rel.stem
    errors = []
    auto = rel.as_posix() == "model/auto.yaml"  # its sizes, family and name come from the source (config/auto_model.py)
    needs = NEEDS.get(rel.as_posix(), [])
    for base in ("llama3_8x8b_upcycle", "tiny_llama_upcycle"):
        try:
            r = catalog.compose(base, [f"{group}={option}", *(["model.source=smollm2"] if auto else []), *needs])
            break
        except UpcycleError as e:
            errors.append(f"{base}: {e}")
    else:
        pytest.fail(f"{rel} validates in no recipe: {errors}")
    node = dataclasses.asdict(getattr(r, group))
    own = {k: v for k, v in _flat(yaml.safe_load((CONF / rel).read_text())).items() if k != "defaults"}
    if auto:
        assert (r.model.family, r.model.name, r.model.num_layers) == ("llama3", "auto:llama3", 30)
        own = {}
    for key, value in own.items():
        if any(n.startswith(f"{group}.{key}=") for n in needs):
            continue  # set by the test (NEEDS)
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation (${oc.env:...}): resolved, not literal
        got = node[key]
        assert got == value or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                and got == pytest.approx(value)), (rel, key, value, got)


# ---- plan mode: parameter counts, memory --------------------------------------------------------------------------
def mixtral_parameters(m, moe, granularity: int = 1) -> int:
    """Closed form of an upcycled Llama (HF Mixtral layout): per layer q, k, v, o projections (no biases), E experts
    of gate/up/down at FFN/G, the router (hidden x E), two RMSNorms; plus embeddings, the output layer unless tied,
    and the final norm."""
    h, f = m.hidden_size, m.ffn_hidden_size // granularity
    d = m.kv_channels or h // m.num_attention_heads
    attn = h * m.num_attention_heads * d * 2 + h * m.num_query_groups * d * 2
    layer = attn + moe.num_moe_experts * 3 * h * f + h * moe.num_moe_experts + 2 * h
    embeddings = m.vocab_size * h * (1 if m.share_embeddings_and_output_weights else 2)
    return m.num_layers * layer + embeddings + h


def test_closed_form_on_known_sizes():
    # Mixtral 8x7B (vocab 32000, 32 layers, hidden 4096, FFN 14336, 8 experts, GQA 32:8) has 46,702,792,704
    # parameters (its model card: 46.7B); Llama 3 8B's dense count 8,030,261,248 is E=1 without a router.
    from types import SimpleNamespace as NS

    mix = NS(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8, kv_channels=128,
             vocab_size=32000, num_layers=32, share_embeddings_and_output_weights=False)
    assert mixtral_parameters(mix, NS(num_moe_experts=8)) == 46_702_792_704
    llama = NS(**{**vars(mix), "vocab_size": 128256})
    assert mixtral_parameters(llama, NS(num_moe_experts=1)) - 32 * 4096 == 8_030_261_248


@pytest.mark.parametrize("name", TOP)
def test_plan_counts_equal_closed_form_and_meta_model(name):
    from nemo_upcycle.apps.modes import meta_parameter_count
    from nemo_upcycle.config.translate import model_dims, parallel_layout, training_setup
    from nemo_upcycle.planning.plan import plan

    r = catalog.compose(name)
    pl = plan(model_dims(r), parallel_layout(r), training_setup(r), gpu=r.parallel.gpu)
    want = mixtral_parameters(r.model, r.moe, r.upcycle.granularity)
    assert pl.counts["total"] == want == meta_parameter_count(r)
    # negative control: one expert fewer is a different count by exactly one expert and one router column per layer
    fewer = dataclasses.replace(r.moe, num_moe_experts=r.moe.num_moe_experts - 1)
    h, f = r.model.hidden_size, r.model.ffn_hidden_size // r.upcycle.granularity
    assert want - mixtral_parameters(r.model, fewer, r.upcycle.granularity) == r.model.num_layers * (3 * h * f + h)


# ---- nemo-upcycle recipes --------------------------------------------------------------------------------------------
def test_cli_recipes_lists_every_recipe(capsys):
    from nemo_upcycle.apps.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln for ln in out if ln.split() and ln.split()[0] in TOP}
    assert sorted(rows) == TOP
    assert "train" in rows["llama3_8x8b_upcycle"] and "64 x H100 (8 nodes x 8)" in rows["llama3_8x8b_upcycle"]
    assert "Llama 3 8B -> 8x8B MoE, top-2" in rows["llama3_8x8b_upcycle"]
    assert "8 x H100 (1 node x 8)" in rows["llama3_2_8x1b_upcycle"]
    assert "CPU, 1 process" in rows["tiny_llama_upcycle"] and "train" in rows["tiny_llama_upcycle"]


# ---- examples/: the Slurm job script -----------------------------------------------------------------------------
def _tree(p: Path) -> list:
    return sorted((str(f.relative_to(p)), f.stat().st_mtime_ns) for f in p.rglob("*") if "__pycache__" not in f.parts)


@pytest.fixture()
def render_job():
    sys.path.insert(0, str(REPO / "examples"))
    import render_job

    return render_job


def test_slurm_dry_run_prints_the_committed_script_and_writes_nothing(render_job, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before_examples = _tree(REPO / "examples")
    assert render_job.main(["--recipe", "llama3_8x8b_upcycle", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert _tree(REPO / "examples") == before_examples and list(tmp_path.iterdir()) == []
    assert script == (REPO / "examples" / "ngc_slurm_8x8b.sh").read_text(), "re-render examples/ngc_slurm_8x8b.sh"
    assert "#SBATCH --nodes=8\n" in script and "#SBATCH --ntasks-per-node=8\n" in script
    assert "#SBATCH --gpus-per-node=8\n" in script
    assert "IMAGE=${IMAGE:-nvcr.io/nvidia/nemo:26.02}" in script and '--container-image="$IMAGE"' in script
    assert ("--container-mounts=" in script
            and "pip install --no-deps --no-build-isolation -e /workspace/nemo-upcycle" in script)
    assert "python train.py --config-name=llama3_8x8b_upcycle mode=train" in script
    assert not any("torchrun" in ln for ln in script.splitlines() if not ln.startswith("#"))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_render_writes_only_its_file_and_never_submits(render_job, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job.sh"
    assert render_job.main(["--recipe", "llama3_2_8x1b_upcycle", "--out", str(out), "--account", "acct",
                            "trainer.max_steps=100"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sh"]
    text = out.read_text()
    assert text == render_job.render("llama3_2_8x1b_upcycle", ["trainer.max_steps=100"], str(out), account="acct")
    assert ("#SBATCH --nodes=1\n" in text and "#SBATCH --ntasks-per-node=8\n" in text
            and "#SBATCH --account=acct" in text)
    assert "--config-name=llama3_2_8x1b_upcycle" in text and text.rstrip().endswith("trainer.max_steps=100")
    assert f"sbatch {out}" in printed and "nothing was submitted" in printed
    # negative controls: a bad override, a key the script sets and a CPU recipe stop before anything is written
    for args in (["--recipe", "llama3_8x8b_upcycle", "parallel.expert_model_parallel_size=3"],
                 ["--recipe", "llama3_8x8b_upcycle", "model.source=/elsewhere"],
                 ["--recipe", "tiny_llama_upcycle"]):
        assert render_job.main(["--out", str(tmp_path / "bad.sh"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sh"]


# ---- recipes/<name>.py: NeMo-Run Partials (import NeMo) ------------------------------------------------------------
@pytest.fixture(scope="module")
def nemo():
    import nemo_run as run
    from nemo.collections import llm

    from nemo_upcycle.engine import recipes

    return run, llm, recipes


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.parametrize("name", TOP)
def test_recipe_module_is_the_yaml(nemo, name, tmp_path, monkeypatch):
    run, llm, recipes = nemo
    for var in ("LLAMA3_8B_PATH", "LLAMA31_8B_PATH", "LLAMA32_1B_PATH"):
        monkeypatch.delenv(var, raising=False)
    import importlib

    from nemo_upcycle.engine.partial import train_partial as engine_recipe

    mod = importlib.import_module(f"nemo_upcycle.engine.recipes.{name}")
    assert mod.NAME == name and f"conf/{name}.yaml" in mod.__doc__
    p = mod.recipe(dir=str(tmp_path))
    assert isinstance(p, run.Partial) and p.__fn_or_cls__ is llm.train
    # one source of truth: exactly the Partial the engine builds from the composed YAML (what train.py runs)
    r = catalog.compose(name)
    from nemo_upcycle.engine import catalog as engine_catalog

    src, tok = engine_catalog._sources(r, tmp_path)
    assert p == engine_recipe(r, tmp_path, src, tok)
    # and the fields are the YAML's
    cfg, tr, st = p.model.config, p.trainer, p.trainer.strategy
    assert (cfg.num_moe_experts, cfg.moe_router_topk) == (r.moe.num_moe_experts, r.moe.moe_router_topk)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (r.model.num_layers, r.model.hidden_size,
                                                                      r.model.ffn_hidden_size)
    assert st.expert_model_parallel_size == r.parallel.expert_model_parallel_size
    assert st.pipeline_model_parallel_size == r.parallel.pipeline_model_parallel_size
    assert (tr.num_nodes, tr.devices, tr.accelerator) == (r.parallel.num_nodes, r.parallel.devices,
                                                          r.parallel.accelerator)
    assert tr.max_steps == r.trainer.max_steps and p.optim.config.lr == r.optim.lr
    assert p.log.log_dir == str(tmp_path)
    if r.parallel.accelerator == "gpu":
        assert p.model.upcycle_from == r.model.source  # the model.source string, unresolved
    else:
        assert p.model.upcycle_from.source == r.model.source  # resolved when built, on the machine that runs it


@pytest.mark.slow
def test_8x8b_recipe_fields_and_overrides(nemo, monkeypatch):
    run, llm, recipes = nemo
    monkeypatch.delenv("LLAMA3_8B_PATH", raising=False)
    from nemo_upcycle.engine.recipes.llama3_8x8b_upcycle import recipe

    p = recipe()
    st = p.trainer.strategy
    assert (p.model.config.num_moe_experts, p.model.config.moe_router_topk, st.expert_model_parallel_size) == (8, 2, 8)
    assert (st.tensor_model_parallel_size, st.pipeline_model_parallel_size,
            st.virtual_pipeline_model_parallel_size) == (1, 4, 8)
    assert (p.trainer.num_nodes, p.trainer.devices, p.trainer.max_steps) == (8, 8, 47684)
    assert p.model.config.moe_expert_capacity_factor == 1.25 and p.data.paths == []
    assert p.model.upcycle_from == "/models/Meta-Llama-3-8B" and p.log.log_dir == "outputs/llama3_8x8b_upcycle"
    # negative control: overrides reach the Partial, and only what they name changes
    q = recipe(dir="/results/a", name="exp1", trainer__max_steps=100,
               **{"moe.moe_router_topk": 1, "data.paths": ["/d/x"]})
    assert q != p
    assert (q.trainer.max_steps, q.model.config.moe_router_topk, q.data.paths) == (100, 1, ["/d/x"])
    assert q.log.log_dir == "/results/a" and q.log.name == "exp1" and q.optim.lr_scheduler.max_steps == 100
    assert q.trainer.strategy == p.trainer.strategy and q.model.config.num_moe_experts == 8
    # NeMo's recipe arguments re-check the layout; bad overrides name the key
    assert recipe(num_nodes=16).trainer.num_nodes == 16
    with pytest.raises(UpcycleError, match="moe.moe_router_topk=9"):
        recipe(moe__moe_router_topk=9)
    with pytest.raises(UpcycleError, match="num_experts"):
        recipe(moe__num_experts=8)
    with pytest.raises(UpcycleError):
        recipe(num_gpus_per_node=3)  # 24 GPUs cannot hold PP4 x EP8
    # registered as a NeMo-Run factory of llm.train, like NeMo's own recipes
    from nemo_run.config import get_type_namespace

    assert run.cli.resolve_factory(get_type_namespace(llm.train), "llama3_8x8b_upcycle").wrapped is recipe.wrapped


@pytest.mark.slow
def test_tiny_recipe_builds_and_resolves_its_source_on_build(nemo, tmp_path):
    import fiddle as fdl

    run, llm, recipes = nemo
    p = recipes.tiny_llama_upcycle.recipe(dir=str(tmp_path / "out"), trainer__max_steps=2)
    assert not (tmp_path / "out").exists(), "building the Partial config wrote files"
    built = fdl.build(p)
    src = Path(built.keywords["model"].upcycle_from)
    assert src == tmp_path / "out" / "dense_tiny" and (src / "config.json").is_file()
    assert built.func is llm.train and built.keywords["trainer"].max_steps == 2


@pytest.mark.stack
@pytest.mark.slow
def test_nemo_run_dry_run_prints_the_slurm_script(nemo, capsys, monkeypatch):
    import io

    from nemo_run import config as run_config

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # NeMo-Run's packaging runs shell commands through invoke

    sys.path.insert(0, str(REPO / "examples"))
    import nemo_run_8x8b

    home = run_config.get_nemorun_home()
    assert nemo_run_8x8b.main(["--dry-run", "--account", "acct"]) == 0
    out = capsys.readouterr().out
    assert run_config.get_nemorun_home() == home
    assert "#SBATCH --nodes=8\n" in out and "#SBATCH --ntasks-per-node=8\n" in out and "#SBATCH --account=acct" in out
    assert "--container-image nvcr.io/nvidia/nemo:26.02" in out
    assert "/lustre/models/Meta-Llama-3-8B:/models/dense:ro" in out and "export PYTHONPATH=/nemo_run/code" in out
    assert "python -m nemo_run.core.runners.fdl_runner" in out and "torchrun" not in out
    jobdir = out.split("--output=")[1].split("/jobs/")[0]
    assert not Path(jobdir).exists(), "the dry run left its job directory behind"


# ---- python train.py (subprocesses started at the beginning, in the background) -----------------------------------
# bad overrides: one line, exit 2, no run directory
BAD = {  # key named in the one error line
    "k>E": ("moe.moe_router_topk=9", "moe.num_moe_experts=8"),
    "EP3": ("parallel.expert_model_parallel_size=3", "moe.num_moe_experts=8"),
    "misspelled": ("moe.num_experts",),
    "wrong type": ("moe.moe_router_topk", "two"),
}


@pytest.mark.parametrize("key", list(BAD))
def test_bad_override_is_one_line_exit_2_no_run_dir(train_runs, key):
    assert_refused(*train_runs.get(key), *BAD[key])


def test_gpu_recipe_train_on_cpu_names_plan_mode(train_runs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused(*train_runs.get("gpu train"), "llama3_8x8b_upcycle", "64 GPUs", "mode=plan")


def test_plan_mode_8x8b_writes_counts_that_fit_its_gpus(train_runs):
    import json

    from nemo_upcycle.planning.flops import GPUS

    r, run_dir = train_runs.get("plan")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((run_dir / "plan.json").read_text())
    rc = catalog.compose("llama3_8x8b_upcycle")
    assert rec["counts"]["total"] == mixtral_parameters(rc.model, rc.moe) == 47_491_321_856
    assert "meta     MixtralForCausalLM built on the meta device: 47,491,321,856 parameters (equal)" in \
        (run_dir / "plan.txt").read_text()
    assert rec["gpu"] == rc.parallel.gpu == "H100" and rec["world_size"] == 64
    assert rec["gpu_memory_bytes"] == GPUS["H100"].memory_bytes == 81559 * 2**20  # nvidia-smi's H100 SXM 80GB
    assert rec["fits"] is True and rec["peak_bytes"] <= rec["gpu_memory_bytes"]
    assert rec["warnings"] == []
