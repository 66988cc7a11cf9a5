"""NeMo 2 training of a Megatron-core MoE on CPU with ``nemo_upcycle.engine.cpu``: one rank, two ranks, checkpoints.

The slow tests run ``tests/dist_train_tiny.py`` under torchrun (gloo) twice, each process doing several
``nl.Trainer(accelerator="cpu")`` + ``nl.MegatronStrategy`` + ``llm.GPTModel`` runs (2 layers, 4 experts,
top-2, local spec) and printing JSON; the tests compare those results:
- one rank: the loss goes down (control: the same run at lr 0 stays put); a save + full resume (weights and
  Adam state, ``RestoreConfig(load_optim_state=True)``) continues exactly as uninterrupted training;
- two ranks: EP=2 (alltoall and allgather dispatchers) and DP=2 give the per-step losses of one rank with the
  same global batch (control: other data gives other losses);
- checkpoints: saved at EP=1 and loaded at EP=2, saved at EP=2 and loaded at EP=1 (DP=2): identical weights,
  expert by expert (control: two experts swapped differ).

Not covered, by Megatron-core 0.15.3 itself and not by CPU: resuming the *optimizer state* across a change of
expert_model_parallel_size. At EP=1 the expert parameters share the dense optimizer, at EP>1 they get their
own, so megatron-core's ``ChainedOptimizer.load_state_dict`` raises "Expected 2 entries in state dict, but got
4". Across EP the runs restore the weights (NeMo's RestoreConfig default) and start Adam afresh.

Every loss and weight comparison agrees to 0.0 (bit-identical fp32).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nemo_upcycle.engine import cpu, cpu_sites
from nemo_upcycle.errors import UpcycleError

SCRIPT = Path(__file__).with_name("dist_train_tiny.py")
REPO = SCRIPT.parent.parent
LOSS_ATOL = 1e-5  # fp32; the brief's tolerance, not a measured error (observed 0.0)


# ---------------------------------------------------------------------------------------------- fast


FAKE_SITE = '''
import torch

def helper():
    return torch.zeros(2, device="cuda")

class Site:
    @staticmethod
    def alloc(call_helper=False):
        a = torch.zeros(2, device=torch.cuda.current_device())
        b = torch.ones(3).to("cuda", non_blocking=True)
        c = torch.tensor([1.0], pin_memory=True).cuda()
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.synchronize()
        return (a, b, c, helper()) if call_helper else (a, b, c)
'''


@pytest.fixture
def fake_site(monkeypatch):
    module = types.ModuleType("fake_cuda_site")
    exec(FAKE_SITE, module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the redirection that replaces a missing CUDA")
def test_scope_redirects_only_the_named_function(fake_site):
    with pytest.raises((AssertionError, RuntimeError)):  # control: stock behaviour without CUDA
        fake_site.Site.alloc()
    cpu._scope(fake_site.__name__, "Site.alloc")
    a, b, c = fake_site.Site.alloc()
    assert {t.device.type for t in (a, b, c)} == {"cpu"} and not c.is_pinned()
    # A function the scoped one calls is not redirected (fails as before), and nothing leaks after the call.
    with pytest.raises((AssertionError, RuntimeError)):
        fake_site.Site.alloc(call_helper=True)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert cpu._ACTIVE == [] and torch.overrides._get_current_function_mode_stack() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the redirection that replaces a missing CUDA")
def test_scope_with_listed_helper(fake_site):
    cpu._scope(fake_site.__name__, "Site.alloc", callees=(f"{fake_site.__name__}:helper",))
    assert fake_site.Site.alloc(call_helper=True)[3].device.type == "cpu"


@pytest.fixture
def fake_versions(monkeypatch):
    """Fake NeMo / megatron-core version modules; returns {dist: module} whose ``__version__`` a test sets."""
    fakes = {}
    for dist in cpu_sites.VERSION_MODULES:
        fakes[dist] = types.ModuleType(f"fake_{dist.replace('-', '_')}_info")
        monkeypatch.setitem(sys.modules, fakes[dist].__name__, fakes[dist])
    monkeypatch.setattr(cpu_sites, "VERSION_MODULES", {d: m.__name__ for d, m in fakes.items()})
    return fakes


@pytest.mark.stack
def test_version_check_knows_each_stack_and_refuses_others_in_one_line(fake_versions):
    for name, versions in cpu_sites.STACKS.items():  # each supported stack is recognized by its pair of versions
        for dist, version in versions.items():
            fake_versions[dist].__version__ = version
        assert cpu.check_versions() == name
    # refused: a newer NeMo, and the pairs crossed (NeMo 2.7.3 with 0.16.0: neither stack's sites were read for it)
    for nemo, mcore in [("2.8.0", "0.15.3"), ("2.7.3", "0.16.0"), ("2.7.0", "0.16.1")]:
        fake_versions["nemo-toolkit"].__version__, fake_versions["megatron-core"].__version__ = nemo, mcore
        with pytest.raises(UpcycleError) as err:
            cpu.check_versions()
        msg = str(err.value)
        assert "\n" not in msg and f"found nemo-toolkit=={nemo} + megatron-core=={mcore}" in msg, msg
        assert "default: nemo-toolkit==2.7.3 + megatron-core==0.15.3" in msg and "--stack ngc-26.02" in msg, msg


_CUDA_NAMES = {"cuda", "current_device", "Stream", "stream", "current_stream", "synchronize", "record_event",
               "pin_memory"}


def _asks_for_cuda(code) -> bool:
    """Whether a function's own body (or a function defined in it) names a CUDA request: an attribute or keyword in
    ``_CUDA_NAMES``, or a 'cuda' / 'torch.cuda.*' string."""
    consts = [c for c in code.co_consts[1:] if isinstance(c, str)]  # [0] may be the docstring
    kw = [w for c in code.co_consts if isinstance(c, tuple) for w in c if isinstance(w, str)]
    return (bool(_CUDA_NAMES & {*code.co_names, *kw})
            or any(c == "cuda" or c.startswith(("cuda:", "torch.cuda.")) for c in consts)
            or any(_asks_for_cuda(c) for c in code.co_consts if inspect.iscode(c)))


def _code(module: str, qualname: str):
    return inspect.unwrap(getattr(*cpu._resolve(module, qualname))).__code__


@pytest.mark.slow
@pytest.mark.stack
def test_every_site_of_the_installed_stack_exists_and_asks_for_cuda():
    """The site table of the installed stack (``cpu_sites.scoped_sites``) names functions that exist in it and whose
    bodies (with the listed helpers) hold a CUDA request: a site that moved away in an upgrade is seen here."""
    stack = cpu_sites.installed_stack()
    for module, qualname, callees in cpu_sites.scoped_sites(stack):
        codes = [_code(module, qualname), *(_code(*c.rsplit(":", 1)) for c in callees)]
        assert any(_asks_for_cuda(c) for c in codes), f"{stack}: {module}.{qualname} asks for no CUDA"
    assert not _asks_for_cuda(cpu._clip_grad_by_total_norm_fp32.__code__)  # control: a CPU function is not flagged
    # Where the stacks differ: RoPE moves inv_freq to CUDA in RotaryEmbedding.forward on megatron-core 0.15.3, in
    # get_emb (which the lru-cached forward calls) on 0.16.0; scoping forward alone would miss it there.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    forward = _code(cpu_sites._ROPE, "RotaryEmbedding.forward")
    if stack == "default":
        assert _asks_for_cuda(forward) and not hasattr(RotaryEmbedding, "get_emb")
    else:
        assert not _asks_for_cuda(forward) and _asks_for_cuda(_code(cpu_sites._ROPE, "RotaryEmbedding.get_emb"))


def test_enable_is_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "check_versions", lambda: pytest.fail("must not look at versions with CUDA"))
    assert cpu.enable_cpu_support() is False


# ---------------------------------------------------------------------------------------------- slow


def torchrun(nproc: int, plan: list[dict], work: Path, timeout: float = 900, script: Path = SCRIPT) -> dict:
    """Run the plan under torchrun (``script``: a harness taking --plan and --out); return rank 0's JSON results
    (the log tail in the message on failure)."""
    (work / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), "--plan", str(work / "plan.json"), "--out", str(work / "results.json")]
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
            rc = "timeout"
    tail = (work / "log.txt").read_text()[-4000:]
    assert rc == 0, f"torchrun x{nproc} failed ({rc}):\n{tail}"
    return json.loads((work / "results.json").read_text())


def run(name, steps=3, ep=1, dispatcher="alltoall", **kw) -> dict:
    return dict(name=name, steps=steps, ep=ep, dispatcher=dispatcher, **kw)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    work = tmp_path_factory.mktemp("one_rank")
    s = str(work / "S")  # checkpoint after 6 steps at EP=1
    after_s = dict(restore=s, data_offset=24)  # the 7th global batch on (4 samples a step)
    plan = [
        run("fresh", steps=6, save=s, dump=True),
        run("fresh_lr0", steps=6, lr=0.0),
        run("fresh9", steps=9),
        run("full_resume", restore_optim=True, **after_s),
        run("alltoall", dump=True, **after_s),
        run("allgather", dispatcher="allgather", **after_s),
        run("alltoall_other_data", data_seed=1, **after_s),
    ]
    return torchrun(1, plan, work), work


@pytest.fixture(scope="module")
def two_ranks(one_rank, tmp_path_factory):
    work = tmp_path_factory.mktemp("two_ranks")
    s, t = str(one_rank[1] / "S"), str(work / "T")  # T: saved at EP=2
    after_s, after_t = dict(restore=s, data_offset=24), dict(restore=t, data_offset=36)
    plan = [
        run("dp2_full_resume", restore_optim=True, **after_s),
        run("ep2_alltoall", ep=2, save=t, dump=True, **after_s),
        run("ep2_allgather", ep=2, dispatcher="allgather", **after_s),
        run("dp2_alltoall", **after_s),
        run("dp2_from_ep2", steps=2, dump=True, **after_t),
        run("ep2_from_ep2", steps=2, ep=2, **after_t),
        run("dp2_from_s_later", steps=2, restore=s, data_offset=36),
    ]
    return torchrun(2, plan, work), work


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def weights(work: Path, name: str) -> dict[str, torch.Tensor]:
    """One run's parameters under global names, merged over ranks (ranks must agree where they overlap)."""
    merged = {}
    for path in sorted(work.glob(f"{name}.rank*.pt")):
        for key, value in torch.load(path).items():
            assert key not in merged or torch.equal(merged[key], value), f"ranks disagree on {key}"
            merged[key] = value
    assert merged, f"no dump {name}"
    return merged


def weights_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max((a[k] - b[k]).abs().max().item() for k in a)


def swap_experts(w: dict, i: int, j: int) -> dict:
    swap = {f".expert{i}.": f".expert{j}.", f".expert{j}.": f".expert{i}."}
    out = {}
    for key, value in w.items():
        for old, new in swap.items():
            if old in key:
                key = key.replace(old, new)
                break
        out[key] = value
    return out


@pytest.mark.stack
@pytest.mark.slow
def test_one_rank_loss_goes_down(one_rank):
    results = one_rank[0]
    trained, frozen = results["fresh"]["losses"], results["fresh_lr0"]["losses"]
    assert len(trained) == 6 and all(torch.isfinite(torch.tensor(trained)))
    assert trained[0] == pytest.approx(frozen[0], abs=LOSS_ATOL)  # same start
    assert trained[-1] < trained[0] - 0.2, trained
    assert abs(frozen[-1] - frozen[0]) < 0.1, frozen  # control: without updates it only wobbles with the data


@pytest.mark.stack
@pytest.mark.slow
def test_save_and_full_resume_continue_training_exactly(one_rank, two_ranks):
    one, two = one_rank[0], two_ranks[0]
    uninterrupted = one["fresh9"]["losses"][6:]
    assert one["fresh9"]["losses"][:6] == pytest.approx(one["fresh"]["losses"], abs=LOSS_ATOL)
    d1 = max_diff(one["full_resume"]["losses"], uninterrupted)
    d2 = max_diff(two["dp2_full_resume"]["losses"], uninterrupted)  # resumed at DP=2
    assert d1 <= LOSS_ATOL and d2 <= LOSS_ATOL, (d1, d2)
    # Control: the same weights with a fresh Adam diverge from step 2, so the check sees optimizer state.
    assert max_diff(one["alltoall"]["losses"], uninterrupted) > 1e-3


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.parametrize("two_rank_run, one_rank_run", [
    ("ep2_alltoall", "alltoall"),
    ("ep2_allgather", "allgather"),
    ("dp2_alltoall", "alltoall"),
])
def test_two_ranks_match_one_rank(one_rank, two_ranks, two_rank_run, one_rank_run):
    one, two = one_rank[0], two_ranks[0]
    d = max_diff(two[two_rank_run]["losses"], one[one_rank_run]["losses"])
    assert d <= LOSS_ATOL, f"{two_rank_run} vs {one_rank_run}: max |loss diff| {d:.3g}"
    control = max_diff(one["alltoall_other_data"]["losses"], one[one_rank_run]["losses"])
    assert control > 1e-3, f"control (other data) should differ, max |diff| {control:.3g}"


@pytest.mark.stack
@pytest.mark.slow
def test_dispatchers_agree(one_rank):
    one = one_rank[0]
    assert max_diff(one["allgather"]["losses"], one["alltoall"]["losses"]) <= LOSS_ATOL
    assert max_diff(one["allgather"]["losses"], one["alltoall_other_data"]["losses"]) > 1e-3  # control


@pytest.mark.stack
@pytest.mark.slow
def test_checkpoint_saved_at_ep1_loads_at_ep2(one_rank, two_ranks):
    saved, loaded = weights(one_rank[1], "fresh.end"), weights(two_ranks[1], "ep2_alltoall.start")
    per_rank = [torch.load(p) for p in sorted(two_ranks[1].glob("ep2_alltoall.start.rank*.pt"))]
    held = [{int(m.group(1)) for k in w if (m := re.search(r"\.expert(\d+)\.", k))} for w in per_rank]
    assert held == [{0, 1}, {2, 3}], held  # EP=2: each rank holds two of the four experts
    assert weights_diff(loaded, saved) == 0.0
    assert weights_diff(swap_experts(loaded, 0, 2), saved) > 1e-3  # control: a misplaced expert is seen


@pytest.mark.stack
@pytest.mark.slow
def test_checkpoint_saved_at_ep2_loads_at_ep1(two_ranks):
    results, work = two_ranks
    saved, loaded = weights(work, "ep2_alltoall.end"), weights(work, "dp2_from_ep2.start")
    assert weights_diff(loaded, saved) == 0.0
    assert weights_diff(swap_experts(loaded, 1, 3), saved) > 1e-3  # control
    assert weights_diff(saved, weights(work, "ep2_alltoall.start")) > 1e-3  # control: training moved them
    d = max_diff(results["dp2_from_ep2"]["losses"], results["ep2_from_ep2"]["losses"])
    assert d <= LOSS_ATOL, d
    # control: the same batches from the EP=1 checkpoint S (other weights) give other losses
    assert max_diff(results["dp2_from_ep2"]["losses"], results["dp2_from_s_later"]["losses"]) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine (grouped GEMM)")
def test_te_grouped_gemm_spec_on_gpu():
    """On a GPU the CPU layer stays off and the TE spec with grouped GEMM runs a forward pass."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed (extra: gpu)")
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert cpu.enable_cpu_support() is False
    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        model_parallel_cuda_manual_seed(0)
        config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                   num_moe_experts=4, moe_router_topk=2, moe_grouped_gemm=True,
                                   moe_token_dispatcher_type="alltoall", add_bias_linear=False, bf16=True,
                                   params_dtype=torch.bfloat16)
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=4, moe_grouped_gemm=True)
        model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32).cuda()
        tokens = torch.randint(0, 128, (2, 32), device="cuda")
        position_ids = torch.arange(32, device="cuda").expand(2, 32)
        logits = model(tokens, position_ids, attention_mask=None)
        assert logits.shape == (2, 32, 128) and torch.isfinite(logits.float()).all()
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            torch.distributed.destroy_process_group()
