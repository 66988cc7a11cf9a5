"""One home per rule and constant: each rule is written once, below the edges, and each edge names its fields in its
own words (the CLI by flags, the Hydra recipes by keys). Behaviour first, then scans of the source with ``ast``;
every check has a negative control that shows it can fail. No NeMo import.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from nemo_upcycle.errors import FieldError, UpcycleError

PKG = Path(__file__).resolve().parent.parent / "nemo_upcycle"
TINY = "tiny_llama_upcycle"  # 4 experts, top-2, heads 6, query groups 2


# ---- one core error, two edges --------------------------------------------------------------------------------
def test_one_core_error_each_edge_names_it_its_own_way(capsys, tmp_path, tiny_llama):
    from nemo_upcycle.apps.cli import main
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.core import UpcycleOptions

    with pytest.raises(FieldError) as core:
        UpcycleOptions(4, 5).validate()
    assert core.value.fields == ("moe_router_topk", "num_moe_experts")
    assert str(core.value) == ("moe_router_topk=5 must be between 1 and num_moe_experts=4; lower moe_router_topk or "
                               "raise num_moe_experts.")  # the core names its own fields, no edge's
    assert main(["convert", str(tiny_llama), str(tmp_path / "moe"), "-E", "4", "-k", "5", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --topk 5 must be between 1 and --num-experts 4; lower --topk or "
                                               "raise --num-experts.")
    with pytest.raises(FieldError) as hydra:
        compose(TINY, ["moe.moe_router_topk=5"])
    assert str(hydra.value) == ("moe.moe_router_topk=5 must be between 1 and moe.num_moe_experts=4; lower "
                                "moe.moe_router_topk or raise moe.num_moe_experts.")
    assert hydra.value.template == core.value.template and hydra.value.values == core.value.values  # one rule
    compose(TINY, ["moe.moe_router_topk=4"])  # negative control: k = E is accepted
    plain = UpcycleError("the source is not a dense Llama; pass one.")  # control: no fields, the same everywhere
    assert plain.render({"source": "--src"}, " ") == str(plain)


def test_field_error_slots():
    e = FieldError("{a=} and {b} ({b+}, {c+}); {a}", a=3, b="x", c=None)
    assert str(e) == "a=3 and b (b, c); a"
    assert e.render({"a": "--aa", "b": "--bb"}, " ") == "--aa 3 and --bb (--bb (b), c); --aa"
    named = e.named({"a": "g.a"})
    assert str(named) == "g.a=3 and b (b, c); g.a" and named.template == e.template and str(e) == "a=3 and b (b, c); a"
    # a recipe error that reaches the CLI (nemo-upcycle compare) keeps the recipe's keys; a fresh one takes the flags
    assert named.render({"a": "--aa"}, " ") == str(named) and e.render({"a": "--aa"}, " ").startswith("--aa 3")
    with pytest.raises(KeyError):  # negative control: a {field=} slot needs the field's value
        FieldError("{missing=} is wrong")


# ---- every field a rule names has a name at each edge -----------------------------------------------------------
SLOT = re.compile(r"\{(\w+)[=+]?\}")


def template_fields(source: str) -> set[str]:
    """Every ``{field}`` slot in the string literals of a module (f-string literal parts included, docstrings not)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {m.group(1) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs for m in SLOT.finditer(n.value)}


def test_every_field_a_rule_names_has_a_flag_and_a_key():
    from nemo_upcycle.apps.cli import OPTION_FLAGS, build_parser
    from nemo_upcycle.config.validate import KEYS
    from nemo_upcycle.core import options

    core = template_fields((PKG / "core" / "options.py").read_text())
    core |= {*options.INT_FIELDS, *options.FLOAT_FIELDS, *options.CHOICES}  # slots built from these names
    layout = template_fields((PKG / "planning" / "layout.py").read_text())
    assert {"moe_router_topk", "granularity", "drop_ratio"} <= core and {"expert_model_parallel_size"} <= layout
    assert core - set(OPTION_FLAGS) == set()
    assert core - set(KEYS) == set()
    assert layout - set(KEYS) == {"moe_ffn_hidden_size"}  # derived: model.ffn_hidden_size / upcycle.granularity
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    flags = {s for a in convert._actions for s in a.option_strings}
    assert set(OPTION_FLAGS.values()) <= flags  # every flag the CLI renders exists
    # negative control: a template naming a field no edge knows is found
    assert template_fields('raise FieldError(f"{{made_up=}} is {x}.", made_up=1)') - set(KEYS) == {"made_up"}


# ---- the layout rules: one home, three callers --------------------------------------------------------------------
def test_layout_rule_has_one_home_for_validation_plan_and_engine():
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.config.translate import model_dims, parallel_layout
    from nemo_upcycle.planning.layout import check_layout, model_problems

    with pytest.raises(FieldError) as hydra:
        compose(TINY, ["parallel.expert_model_parallel_size=3"])
    assert "parallel.expert_model_parallel_size=3 does not divide moe.num_moe_experts=4" in str(hydra.value)
    run = compose(TINY)
    par = parallel_layout(run)
    par.expert_model_parallel_size = 3
    [problem] = [p for p in model_problems(model_dims(run), par) if p.level == "error"]
    assert problem.template in hydra.value.template  # the planning rule itself, rendered by recipe key
    with pytest.raises(FieldError) as plain:
        check_layout(model_dims(run), par)
    assert "expert_model_parallel_size=3 does not divide num_moe_experts=4" in str(plain.value)  # Megatron names
    compose(TINY, ["parallel=cpu_2_ep2"])  # negative control: EP 2 divides 4


def _strings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    return "\n".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def rule_texts(pkg: Path) -> dict[str, list[str]]:
    """Where the message of a rule is written (any naming of its fields: a slot, a recipe key, a bare name)."""
    texts = {"E % EP": r"does not divide \{?(moe\.)?num_moe_experts",
             "heads % TP": r"tensor_model_parallel_size\W{0,4}does not divide \{?(model\.)?num_attention_heads",
             "1 <= k <= E": r"must be between 1 and", "G | FFN": r"does not divide the dense FFN"}
    return {rule: sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if re.search(text, _strings(p)))
            for rule, text in texts.items()}


def test_no_rule_text_outside_its_home(tmp_path):
    assert rule_texts(PKG) == {"E % EP": ["planning/layout.py"], "heads % TP": ["planning/layout.py"],
                               "1 <= k <= E": ["core/options.py"], "G | FFN": ["core/options.py"]}
    # negative control: a second copy, as config/validate.py and engine/model.py held before, is found
    (tmp_path / "copy.py").write_text('raise UpcycleError(f"parallel.expert_model_parallel_size={e} does not divide "\n'
                                      '                   f"moe.num_moe_experts={E}; choose a divisor.")')
    assert rule_texts(tmp_path)["E % EP"] == ["copy.py"]


# ---- constants and helpers with one home -------------------------------------------------------------------------
def test_one_step0_tolerance():
    from nemo_upcycle.apps.cli import build_parser
    from nemo_upcycle.offline.verify import STEP0_ATOL, VerifyResult

    verify = build_parser()._subparsers._group_actions[0].choices["verify"]
    assert verify.get_default("atol") == STEP0_ATOL == inspect.signature(VerifyResult.passed).parameters["atol"].default
    r = VerifyResult(max_abs=STEP0_ATOL, mean_abs=0.0, top1=1.0, tokens=1, note="")
    assert r.passed() and not VerifyResult(STEP0_ATOL * 1.01, 0.0, 1.0, 1, "").passed()  # control: just above fails
    assert literal_tolerances(PKG) == []
    snippet = 'def f(x, atol=1e-3): return x.passed(1e-3)\np.add_argument("--atol", type=float, default=1e-3)'
    assert sorted(literal_tolerances(PKG, snippet)) == ["<snippet>:1", "<snippet>:1", "<snippet>:2"]


def literal_tolerances(pkg: Path, snippet: str = "") -> list[str]:
    """Places that spell a tolerance as a number: a default of an ``*atol*`` parameter or option, an argument of
    ``.passed``."""
    sources = {"<snippet>": snippet} if snippet else {str(p.relative_to(pkg)): p.read_text() for p in pkg.rglob("*.py")}
    out = []
    for name, src in sources.items():
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = n.args.args[len(n.args.args) - len(n.args.defaults):] + n.args.kwonlyargs
                defaults = n.args.defaults + n.args.kw_defaults
                out += [f"{name}:{n.lineno}" for a, d in zip(args, defaults)
                        if "atol" in a.arg and isinstance(d, ast.Constant)]
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "passed":
                out += [f"{name}:{n.lineno}" for a in n.args if isinstance(a, ast.Constant) and a.value != 1.0]
            if isinstance(n, ast.Call) and any(isinstance(a, ast.Constant) and "atol" in str(a.value) for a in n.args):
                out += [f"{name}:{n.lineno}" for k in n.keywords if k.arg == "default"
                        and isinstance(k.value, ast.Constant)]  # argparse: add_argument("--atol", default=...)
    return out


def rank0_copies(pkg: Path, snippet: str = "") -> list[str]:
    """Places outside system/launcher.py that decide "rank 0" themselves: the ``RANK`` variable, ``get_rank() == 0``."""
    sources = {"<snippet>": snippet} if snippet else {
        str(p.relative_to(pkg)): p.read_text() for p in pkg.rglob("*.py") if p != pkg / "system" / "launcher.py"}
    out = []
    for name, src in sources.items():
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.Constant) and n.value in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
                out.append(f"{name}:{n.lineno}")
            if isinstance(n, ast.Compare) and any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                                                  and c.func.attr == "get_rank" for c in [n.left, *n.comparators]):
                out.append(f"{name}:{n.lineno}")
    return out


def test_one_rank0_helper():
    assert rank0_copies(PKG) == []
    assert rank0_copies(PKG, 'import os\nr = os.environ.get("RANK") or dist.get_rank() == 0') == ["<snippet>:2"] * 2


def replace_calls(pkg: Path, snippet: str = "") -> list[str]:
    """``os.replace`` calls outside system/files.py (its atomic writes are the one home of write-then-rename)."""
    sources = {"<snippet>": snippet} if snippet else {
        str(p.relative_to(pkg)): p.read_text() for p in pkg.rglob("*.py") if p != pkg / "system" / "files.py"}
    return [f"{name}:{n.lineno}" for name, src in sources.items() for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "replace"
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"]


def test_one_atomic_write_helper():
    assert replace_calls(PKG) == []
    assert replace_calls(PKG, "import os\nos.replace(tmp, path)") == ["<snippet>:2"]


def mfu_copies(pkg: Path, snippet: str = "") -> list[str]:
    """Arithmetic on a peak outside planning/flops.py: a division by it (MFU) or ``mfu * peak`` (tokens/s)."""
    sources = {"<snippet>": snippet} if snippet else {
        str(p.relative_to(pkg)): p.read_text() for p in pkg.rglob("*.py") if p != pkg / "planning" / "flops.py"}
    out = []
    for name, src in sources.items():
        for n in ast.walk(ast.parse(src)):
            if not isinstance(n, ast.BinOp):
                continue
            sides = [n.left, n.right]
            if isinstance(n.op, ast.Div) and "peak" in ast.unparse(n.right).lower():
                out.append(f"{name}:{n.lineno}")
            elif isinstance(n.op, ast.Mult) and any(
                    isinstance(a, (ast.Name, ast.Attribute)) and "mfu" in ast.unparse(a).lower()
                    and "peak" in ast.unparse(b).lower() for a, b in (sides, sides[::-1])):
                out.append(f"{name}:{n.lineno}")
    return out


def test_one_mfu_formula():
    from nemo_upcycle.planning import flops

    assert mfu_copies(PKG) == []
    assert mfu_copies(PKG, "a = t * f / (self.peak_flops * n)\nb = mfu * gpu.peak_bf16_flops / f") == [
        "<snippet>:1", "<snippet>:2"]
    assert flops.mfu(flops.tokens_per_s(0.4, 3e9, 1e15), 3e9, 1e15) == pytest.approx(0.4)
    assert [f"{p.relative_to(PKG)}" for p in PKG.rglob("*.py") if "def flops_per_token" in p.read_text()] == [
        "planning/flops.py"]


def test_options_built_once_per_edge():
    calls = {}
    for p in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "UpcycleOptions" \
                    and n.keywords:
                calls.setdefault(str(p.relative_to(PKG)), []).append(n.lineno)
    # the CLI (from its flags), the recipes (from their keys), a NeMo model config (from its fields), an HF Qwen2-MoE
    # config on disk (from its sizes: granularity, shared experts, dense layers)
    assert sorted(calls) == ["apps/cli.py", "config/translate.py", "engine/config.py", "formats/moe_dir.py"], calls
    assert all(len(lines) == 1 for lines in calls.values()), calls


# ---- only composition errors are user errors ----------------------------------------------------------------------
def test_compose_turns_only_hydra_errors_into_user_errors(monkeypatch):
    import hydra
    from hydra.errors import ConfigCompositionException

    from nemo_upcycle.config.compose import compose

    def bug(*a, **k):
        raise RuntimeError("a bug in the composition code")

    monkeypatch.setattr(hydra, "compose", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        compose(TINY)

    def bad(*a, **k):
        raise ConfigCompositionException("Could not override 'moe.nope'")

    monkeypatch.setattr(hydra, "compose", bad)
    with pytest.raises(UpcycleError, match="Could not override 'moe.nope'"):  # control: bad input is one line
        compose(TINY)


def test_train_precheck_turns_only_hydra_errors_into_user_errors(monkeypatch, capsys, tmp_path):
    import nemo_upcycle.apps.train as train
    from nemo_upcycle.apps.train import precheck

    def bug(*a, **k):
        raise KeyError("a bug in preflight")

    monkeypatch.setattr(train, "preflight", bug)
    with pytest.raises(KeyError, match="a bug in preflight"):
        precheck(["--config-name", TINY, "mode=plan", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:  # control: a bad override is one line, exit 2
        precheck(["--config-name", TINY, "moe.nope=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "moe.nope" in err[0], err


def test_unreadable_reference_is_a_user_error_and_a_bug_is_not(tmp_path, monkeypatch):
    import safetensors
    import torch
    from safetensors.torch import save_file

    from nemo_upcycle.offline.verify import load_reference

    path = tmp_path / "nemo_reference.safetensors"
    save_file({"input_ids": torch.zeros(1, 4, dtype=torch.long), "logits": torch.zeros(1, 4, 5)}, str(path))
    assert load_reference(path)[0].shape == (1, 4)  # control: a whole reference reads
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UpcycleError, match="is not a readable NeMo reference"):
        load_reference(path)
    with pytest.raises(UpcycleError, match="is not a readable NeMo reference"):
        load_reference(tmp_path / "missing.safetensors")

    def bug(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(safetensors, "safe_open", bug)
    with pytest.raises(TypeError, match="a bug"):  # not bad input: keeps its traceback
        load_reference(path)
