"""Training metrics, MFU and the end-of-run report.

Fast: model FLOPs per token counted by hand, matmul by matmul, for a tiny MoE (k routed experts, causal
attention, TP-padded vocab) against throughput/plan; MFU arithmetic; the GPU peak table; the report from a
synthetic metrics.jsonl (full, partial, empty, a cut line) and its CLI.
Slow (Megatron-core on CPU, one gloo rank in this process): the router hooks' tokens per expert, entropy and
dropped fraction equal an independent computation from the router input and weight (bincount of topk of
softmax(x W^T), Categorical entropy, min(count, capacity)) with negative controls; aux / z loss read from
Megatron's tracker equal their formulas; Megatron's forward FLOPs measured by torch's FlopCounterMode equal
the formula's forward part. Slowest: real NeMo training runs (subprocesses) with the callback: one rank with
TensorBoard, the progress printer and the report; two ranks (DP 2, EP 2, torchrun) summing counts over ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_upcycle.apps.report import main as report_main
from nemo_upcycle.apps.report import read_metrics, write_report
from nemo_upcycle.config import translate
from nemo_upcycle.config.schema import DataSchema, ModelSchema, MoESchema, ParallelSchema, RunConfig
from nemo_upcycle.planning import flops as throughput
from nemo_upcycle.planning.layout import ModelDims

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- FLOPs and MFU
def hand_flops_per_token(L, h, F, a, g, d, V_pad, E, k, Fe, s, moe_layers):
    """Multiply-accumulates per token of every matmul in a forward pass, x2 (FMA) x3 (fwd, dgrad, wgrad)."""
    macs = 0
    for layer in range(L):
        macs += h * a * d + h * g * d + h * g * d  # q, k, v projections
        macs += a * d * (s / 2) + a * d * (s / 2)  # Q K^T and P V over on average s/2 causal keys, all heads
        macs += a * d * h  # output projection
        if layer in moe_layers:
            macs += k * (h * Fe + h * Fe + Fe * h)  # gate, up, down of the k routed experts (router not counted)
        else:
            macs += h * F + h * F + F * h
    macs += h * V_pad  # logits
    return 2 * 3 * macs


def tiny_run(**moe) -> RunConfig:
    return RunConfig(model=ModelSchema(name="tiny", num_layers=3, hidden_size=36, ffn_hidden_size=44,
                                       num_attention_heads=6, num_query_groups=2, vocab_size=99),
                     moe=MoESchema(num_moe_experts=4, moe_router_topk=2, **moe),
                     data=DataSchema(kind="mock", seq_length=32, global_batch_size=4), parallel=ParallelSchema())


def test_flops_per_token_by_hand():
    run = tiny_run()
    # hidden 36, 6 heads of 6, 2 query groups, FFN 44 = expert FFN (granularity 1), vocab 99 (preset: not padded)
    want = hand_flops_per_token(L=3, h=36, F=44, a=6, g=2, d=6, V_pad=99, E=4, k=2, Fe=44, s=32, moe_layers={0, 1, 2})
    assert translate.flops_for_run(run) == pytest.approx(want, rel=1e-12)
    run.moe.moe_layer_freq = 2  # layers 0 and 2 MoE, layer 1 dense
    want2 = hand_flops_per_token(L=3, h=36, F=44, a=6, g=2, d=6, V_pad=99, E=4, k=2, Fe=44, s=32, moe_layers={0, 2})
    assert translate.flops_for_run(run) == pytest.approx(want2, rel=1e-12)
    # negative control: counting all E experts (total instead of active parameters) is a different number
    all_experts = hand_flops_per_token(L=3, h=36, F=44, a=6, g=2, d=6, V_pad=99, E=4, k=4, Fe=44, s=32,
                                       moe_layers={0, 2})
    assert abs(all_experts - want2) > 1e4
    # plan mode pads a tokenizer-sized vocab: TP 2 -> a multiple of 256
    m = ModelDims(num_layers=3, hidden_size=36, ffn_hidden_size=44, num_attention_heads=6, vocab_size=99,
                  num_query_groups=2, num_moe_experts=4, moe_router_topk=2)
    assert throughput.flops_per_token(m, 32, tp=2) - throughput.flops_per_token(m, 32, tp=1) == 6 * 36 * 128


def test_mfu_arithmetic():
    fpt = translate.flops_for_run(tiny_run())
    tps, peak, devices = 12_345.0, 2.5e11, 2
    assert throughput.mfu(tps, fpt, peak * devices) == pytest.approx(tps * fpt / (peak * devices), rel=1e-12)
    assert throughput.tflops(tps, fpt) == pytest.approx(tps * fpt / 1e12)
    # the 8x8B plan's own MFU arithmetic: 46.8% of an H100 at its tokens/s/GPU
    from helpers import LAYOUT_8X8B_64_H100, LLAMA3_8X8B, TRAINING_8X8B
    from nemo_upcycle.planning.plan import plan

    p = plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B)
    assert throughput.mfu(p.tokens_per_s_per_gpu, p.flops_per_token, 989e12) == pytest.approx(0.468)


def test_peaks():
    assert throughput.gpu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert throughput.gpu_peak("NVIDIA H200")[0] == 989e12
    assert throughput.gpu_peak("NVIDIA A100-SXM4-40GB", 40 * 2**30) == (312e12, "A100 40GB bf16 dense")
    assert throughput.gpu_peak("NVIDIA H100 PCIe")[0] is None  # not in the table: no made-up peak
    assert throughput.gpu_peak("Tesla T4")[0] is None
    run = tiny_run()
    assert translate.peak_for_run(run) == (None, None)  # CPU: measured by the training process
    run.parallel.accelerator = "gpu"
    assert translate.peak_for_run(run)[0] == 67e12  # an fp32 recipe: FP32 CUDA cores (torch's default: no TF32)
    run.trainer.precision = "bf16-mixed"
    assert translate.peak_for_run(run) == (989e12, "H100 SXM 80GB bf16 dense")
    peak = throughput.measured_cpu_peak(n=256, repeats=2)
    assert 1e8 < peak < 1e14 and throughput.measured_cpu_peak(n=256, repeats=2) == peak  # cached per process


def test_peak_follows_the_precision_that_runs():
    """bf16-mixed / 16-mixed matmuls run in bf16 / fp16, 32 in fp32: the GPU table's peak of that precision, the CPU
    peak measured with a torch.mm of that dtype, named in the run record (control: the fp32 name and peak differ)."""
    assert [throughput.matmul_dtype(p) for p in ("bf16-mixed", "bf16", "16-mixed", "32", "32-true", 32)] == [
        "bf16", "bf16", "fp16", "fp32", "fp32", "fp32"]
    h100 = throughput.GPUS["H100"]
    assert throughput.table_peak(h100, "bf16-mixed") == (989e12, "H100 SXM 80GB bf16 dense")
    assert throughput.table_peak(h100, "16-mixed") == (989e12, "H100 SXM 80GB fp16 dense")
    assert throughput.table_peak(h100, "32") == (67e12, "H100 SXM 80GB fp32 (CUDA cores, no TF32)")
    assert throughput.table_peak(h100, "32-true", tf32=True) == (494.5e12, "H100 SXM 80GB tf32 dense")
    assert throughput.gpu_peak("NVIDIA A100-SXM4-80GB", 80 * 2**30, "32")[0] == 19.5e12
    if torch.cuda.is_available():
        pytest.skip("the CPU peaks below are measured on a CPU-only machine")
    threads = torch.get_num_threads()
    bf16, bf16_name = throughput.device_peak("bf16-mixed")
    fp32, fp32_name = throughput.device_peak("32-true")
    assert bf16_name == f"CPU bf16 torch.mm, {threads} threads (measured)"
    assert fp32_name == f"CPU fp32 torch.mm, {threads} threads (measured)"
    assert bf16 == throughput.measured_cpu_peak(dtype="bf16") and fp32 == throughput.measured_cpu_peak()  # cached
    assert bf16 != fp32 and 1e8 < min(bf16, fp32)  # two measurements, not one peak under two names


# ---------------------------------------------------------------------------------------------- report
def synthetic_records(steps=(2, 4, 6), layers=(0, 1, 2), E=4, with_moe=True, with_val=True) -> list[dict]:
    recs = [{"kind": "run", "step": 0, "tokens_per_step": 128, "flops_per_token": 2.0e6, "peak_flops": 3.0e10,
             "peak_name": "CPU fp32 torch.mm, 2 threads (measured)", "precision": "32-true", "devices": 1,
             "num_layers": 3,
             "num_experts": E, "topk": 2}]
    if with_val:
        recs.append({"kind": "val", "step": 0, "tokens": 0, "val_loss": 4.6, "val_ppl": math.exp(4.6)})
    for i, s in enumerate(steps):
        rec = {"kind": "train", "step": s, "tokens": 128 * s, "steps": 2, "loss": 4.6 - 0.1 * i, "lr": 1e-3,
               "grad_norm": 1.0, "seconds": 0.5, "step_seconds": 0.25, "tokens_per_s": 512.0,
               "tflops": 512.0 * 2e6 / 1e12, "mfu": 512.0 * 2e6 / 3e10}
        if with_moe:
            counts = [[64 + 8 * ((e + layer + i) % E) for e in range(E)] for layer in layers]
            rec.update(moe_layers=list(layers), tokens_per_expert=counts,
                       load_max_over_mean_layers=[max(c) / (sum(c) / E) for c in counts],
                       load_max_over_mean=1.2, load_cv_layers=[0.1] * len(layers), load_cv=0.1,
                       router_entropy_layers=[1.3] * len(layers), router_entropy=1.3,
                       dropped_fraction_layers=[0.0] * len(layers), dropped_fraction=0.0,
                       aux_loss=1.01, aux_loss_layers=[1.01] * len(layers), z_loss=2.0,
                       z_loss_layers=[2.0] * len(layers))
        recs.append(rec)
        if with_val and s == steps[-1]:
            recs.append({"kind": "val", "step": s, "tokens": 128 * s, "val_loss": 4.2, "val_ppl": math.exp(4.2)})
    return recs


def write_jsonl(path: Path, recs: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.read_bytes()[:8] == PNG, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01, (path, img.shape)
    assert path.stat().st_size > 5_000


def test_report_full(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", synthetic_records())
    step0 = {"max_abs_logit_diff": 3.1e-6, "top1_agreement": 1.0, "dense_val_loss": 4.6, "moe_val_loss": 4.6,
             "passed": True}
    out = write_report(tmp_path, metrics_path=tmp_path / "metrics.jsonl", step0=step0, summary={"recipe": "tiny"})
    md = out.read_text()
    for png in ("loss.png", "expert_load.png", "router.png", "throughput.png"):
        assert_png(tmp_path / png)
        assert f"]({png})" in md
    assert "**PASS**" in md and "3.100e-06" in md
    assert "| before training | 0 | 0 | 4.6 |" in md and "| after | 6 |" in md
    assert "CPU fp32 torch.mm, 2 threads (measured)" in md and "| 3.41% |" in md  # 512 * 2e6 / 3e10
    assert "Precision: **32-true** (fp32); MFU over the peak of that precision: CPU fp32 torch.mm, 2 threads" in md
    assert "| layer | tokens per expert (% of routed)" in md and "| recipe | tiny |" in md
    assert not list(tmp_path.glob(".*tmp"))  # temp files renamed away


def test_report_partial_records_and_cli(tmp_path, capsys):
    # no MoE fields, no val, old-style records without "kind", a line cut short by a killed run
    recs = [{"step": 1, "loss": 4.5, "tokens_per_s": 300.0, "seconds": 0.4},
            {"step": 2, "loss": 4.4, "tokens_per_s": 310.0, "seconds": 0.4}]
    write_jsonl(tmp_path / "metrics.jsonl", recs, tail='{"kind": "train", "step": 3, "lo')
    (tmp_path / "verify.json").write_text(json.dumps({"max_abs_logit_diff": 0.5, "passed": False}))
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert "**FAIL**" in md and "No validation records." in md and "No MoE fields" in md
    assert "Skipped 1 unreadable" in md and "Precision: not recorded; MFU over the peak of that precision: none." in md
    assert_png(tmp_path / "loss.png")
    assert not (tmp_path / "expert_load.png").exists() and not (tmp_path / "router.png").exists()
    # nothing at all: still a report
    empty = tmp_path / "empty"
    empty.mkdir()
    md = write_report(empty, step0=None, summary={}).read_text()
    assert "No training records." in md and "No plots" in md
    # a val-only file, and MoE records without aux losses
    write_jsonl(empty / "metrics.jsonl", [r for r in synthetic_records() if r["kind"] != "train"])
    assert "| before training |" in write_report(empty).read_text()
    moe = [{k: v for k, v in r.items() if not k.startswith(("aux", "z_"))} for r in synthetic_records(with_val=False)]
    write_jsonl(empty / "metrics.jsonl", moe)
    write_report(empty)
    assert_png(empty / "expert_load.png")
    assert report_main([str(tmp_path / "missing")]) == 2


def test_read_metrics_dedups_resumed_steps(tmp_path):
    recs = synthetic_records(steps=(2, 4), with_moe=False)
    recs += [dict(recs[-2], loss=9.0)]  # step 4 again after a resume
    m = read_metrics(write_jsonl(tmp_path / "m.jsonl", recs))
    assert [r["step"] for r in m["train"]] == [2, 4] and m["train"][-1]["loss"] == 9.0
    assert [r["step"] for r in m["val"]] == [0, 4]


# ---------------------------------------------------------------------------------------------- Megatron (slow)
HF_TINY = dict(hidden_size=36, intermediate_size=44, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
               vocab_size=99, max_position_embeddings=64)


def tiny_moe(**moe):
    """A random-init Megatron MoE from the project's config (local spec on CPU); routers widened so routing is
    far from uniform."""
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides

    torch.manual_seed(0)
    moe = {"num_moe_experts": 4, "moe_router_topk": 2, "moe_token_dispatcher_type": "allgather", **moe}
    cfg = UpcycledLlamaConfig.from_dense(HF_TINY, params_dtype=torch.float32, **{**cpu_config_overrides(), **moe})
    module = cfg.configure_model(None)
    with torch.no_grad():
        for layer in module.decoder.layers:
            layer.mlp.router.weight.normal_(0.0, 0.5)
    return cfg, module


def forward(module, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    pos = torch.arange(T).unsqueeze(0).expand(B, T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)[None, None]
    return module(input_ids=ids, position_ids=pos, attention_mask=mask)


def capture_router_inputs(module) -> dict:
    """The MoE layers' inputs (what the router sees), by 0-based layer, one entry per forward."""
    seen: dict = {}
    for i, layer in enumerate(module.decoder.layers):
        layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, []).append(args[0].detach()))
    return seen


def reference_routing(x: torch.Tensor, W: torch.Tensor, k: int):
    """(tokens per expert, mean entropy, logits) from the router input and weight, without Megatron."""
    logits = x.reshape(-1, x.shape[-1]) @ W.T  # (T, E)
    top = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices  # (T, k)
    counts = torch.bincount(top.flatten(), minlength=W.shape[0])
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
    return counts, entropy.item(), logits


def _ids(seed: int, shape=(2, 23)) -> torch.Tensor:
    return torch.randint(0, 99, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_router_hooks_equal_independent_computation(megatron_world):
    from nemo_upcycle.engine.metrics import RouterStats

    cfg, module = tiny_moe()
    stats = RouterStats(cfg.num_layers, 4, 2)
    assert stats.attach([module, module]) == 3  # every router once
    inputs = capture_router_inputs(module)
    module.train()
    for seed in (1, 2):  # two micro-batches: the window sums them
        forward(module, _ids(seed))
    module.eval()  # negative control 1: validation-style forwards are not counted
    with torch.no_grad():
        forward(module, _ids(3))
    module.train()
    with torch.no_grad():  # nor training-mode forwards without grad (full recompute's first pass)
        forward(module, _ids(4))
    got = stats.collect()
    assert got["moe_layers"] == [0, 1, 2]
    for i in range(3):
        W = module.decoder.layers[i].mlp.router.weight.detach()
        refs = [reference_routing(x, W, 2) for x in inputs[i][:2]]
        counts = sum(r[0] for r in refs)
        entropy = sum(r[1] for r in refs) / 2  # equal token counts per micro-batch
        assert got["tokens_per_expert"][i] == counts.tolist(), (i, got["tokens_per_expert"][i], counts)
        assert abs(got["router_entropy_layers"][i] - entropy) < 1e-6, (got["router_entropy_layers"][i], entropy)
        c = counts.double()
        assert got["load_max_over_mean_layers"][i] == pytest.approx((c.max() / c.mean()).item())
        assert got["load_cv_layers"][i] == pytest.approx((c.std(unbiased=False) / c.mean()).item())
        assert got["dropped_fraction_layers"][i] == 0.0 and sum(got["tokens_per_expert"][i]) == 2 * 46 * 2
        # negative control 2: the reference with the next layer's router weight disagrees
        W_other = module.decoder.layers[(i + 1) % 3].mlp.router.weight.detach()
        other = sum(reference_routing(x, W_other, 2)[0] for x in inputs[i][:2])
        assert other.tolist() != got["tokens_per_expert"][i]
    assert 0.0 < got["router_entropy"] < math.log(4) - 0.05  # widened routers: far from uniform
    assert stats.collect() is None  # collect resets the window
    stats.detach()
    forward(module, _ids(5))
    assert stats.collect() is None


@pytest.mark.slow
def test_dropped_fraction_with_capacity_factor(megatron_world):
    from nemo_upcycle.engine.metrics import RouterStats

    cf, k, E = 0.5, 2, 4
    cfg, module = tiny_moe(moe_expert_capacity_factor=cf, moe_token_drop_policy="probs",
                           moe_token_dispatcher_type="alltoall")
    stats = RouterStats(cfg.num_layers, E, k)
    stats.attach([module])
    inputs = capture_router_inputs(module)
    module.train()
    forward(module, _ids(7))
    got = stats.collect()
    for i in range(3):
        counts, _, _ = reference_routing(inputs[i][0], module.decoder.layers[i].mlp.router.weight.detach(), k)
        T = inputs[i][0].shape[0] * inputs[i][0].shape[1]
        capacity = math.ceil(T * k / E * cf)
        kept = torch.clamp(counts, max=capacity)  # "probs" policy keeps the top-capacity routed tokens
        assert got["tokens_per_expert"][i] == kept.tolist()
        assert got["dropped_fraction_layers"][i] == pytest.approx(1 - kept.sum().item() / (T * k))
    assert got["dropped_fraction"] > 0.4  # cf 0.5: capacity for about half of the routed slots


@pytest.mark.slow
def test_aux_and_z_loss_read_from_megatron_tracker(megatron_world):
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from nemo_upcycle.engine.metrics import read_aux_losses, tracker_names

    clear_aux_losses_tracker()  # the tests above trained with the default aux loss (global tracker)
    cfg, module = tiny_moe(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    assert tracker_names(cfg) == ["load_balancing_loss", "z_loss"]
    inputs = capture_router_inputs(module)
    module.train()
    for seed in (11, 12):
        forward(module, _ids(seed))
    aux_ref, z_ref = [], []
    for i in range(3):
        a, z = [], []
        for x in inputs[i]:
            _, _, logits = reference_routing(x, module.decoder.layers[i].mlp.router.weight.detach(), 2)
            T, E = logits.shape
            p = torch.softmax(logits, -1)  # Switch aux loss: E * sum_e f_e P_e, f_e = count_e / (T k), P_e = mean p
            f = torch.bincount(torch.topk(p, 2, -1).indices.flatten(), minlength=E) / (T * 2)
            a.append((E * (f * p.mean(0)).sum()).item())
            z.append(torch.logsumexp(logits, -1).square().mean().item())  # ST-MoE z loss
        aux_ref.append(sum(a) / 2)
        z_ref.append(sum(z) / 2)
    got = read_aux_losses(forwards=2, moe_layers=[0, 1, 2], names=tracker_names(cfg), num_layers=3)
    assert got["aux_loss_layers"] == pytest.approx(aux_ref, rel=1e-5), (got["aux_loss_layers"], aux_ref)
    assert got["z_loss_layers"] == pytest.approx(z_ref, rel=1e-5), (got["z_loss_layers"], z_ref)
    assert got["aux_loss"] == pytest.approx(sum(aux_ref) / 3, rel=1e-5)
    assert got["z_loss"] > 1.0 and got["aux_loss"] > 1.0  # widened routers: imbalanced (1 = balanced)
    tracker = get_moe_layer_wise_logging_tracker()
    assert all(float(v["values"].abs().sum()) == 0 for v in tracker.values())  # cleared after reading
    # negative control: without dividing by the two micro-batches the values are twice the formula
    forward(module, _ids(11))
    forward(module, _ids(12))
    wrong = read_aux_losses(forwards=1, moe_layers=[0, 1, 2])
    assert wrong["z_loss_layers"] != pytest.approx(z_ref, rel=1e-2)
    assert read_aux_losses(forwards=1, moe_layers=[0, 1, 2])["z_loss_layers"] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_formula_forward_part_equals_measured_flops(megatron_world):
    """torch's FlopCounterMode on Megatron's forward (full s x s attention, router, k experts per token): the
    formula / 3 plus the terms Megatron leaves out or halves equals what the model really multiplies. The vocab
    is the preset one: NeMo does not pad it (a padded one would be 2 h (128 - 99) = 2088 FLOPs/token more). Experts
    as Megatron's SequentialMLP: the CPU's BatchedMLP also multiplies the zero rows that pad each expert's tokens to
    the busiest expert's count (work the model's FLOPs do not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, module = tiny_moe(expert_backend="sequential")
    module.eval()
    B, s = 2, 32
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(module, _ids(21, (B, s)))
    measured = counter.get_total_flops() / (B * s)
    L, h, a, g, d, E = 3, 36, 6, 2, 6, 4
    m = ModelDims(num_layers=L, hidden_size=h, ffn_hidden_size=44, num_attention_heads=a, num_query_groups=g,
                  vocab_size=99, num_moe_experts=E, moe_router_topk=2)
    formula_fwd = throughput.flops_per_token(m, s) / 3
    unfused_attention_extra = 2 * L * a * d * s  # local attention multiplies the masked half too (2 matmuls)
    router = 2 * L * h * E
    assert measured == formula_fwd + unfused_attention_extra + router, (measured, formula_fwd)


# ---------------------------------------------------------------------------------------------- NeMo run (slow)
def train_tiny(out_dir: str, steps: int = 4, log_every: int = 2, ep: int = 1) -> None:
    """A NeMo 2 training run on CPU with MetricsLogger (run in a subprocess by the tests below, under torchrun
    for several ranks): the project's Megatron MoE config, global batch 4 in micro-batches of 2, validation
    every 2 steps, TensorBoard, then the report."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from torch.utils.data import DataLoader, Dataset

    from nemo_upcycle.apps.report import write_report
    from nemo_upcycle.engine import cpu
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.metrics import MetricsLogger

    SEQ, MBS, GBS = 32, 2, 4
    cpu.enable_cpu_support()
    out = Path(out_dir)
    causal = torch.ones(1, SEQ, SEQ, dtype=torch.bool).triu(1)

    class Tokens(Dataset):
        def __init__(self, n, seed):
            self.n, self.seed = n, seed

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            start, stride = torch.randint(0, 99, (1,), generator=g), torch.randint(1, 4, (1,), generator=g)
            t = (start + stride * torch.arange(SEQ + 1)) % 99  # learnable: an arithmetic progression mod vocab
            return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ), position_ids=torch.arange(SEQ),
                        attention_mask=causal)

    class Data(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.data_sampler = nl.MegatronDataSampler(seq_len=SEQ, micro_batch_size=MBS, global_batch_size=GBS)

        def train_dataloader(self):
            return DataLoader(Tokens(GBS * steps, 0), num_workers=0)

        def val_dataloader(self):
            return DataLoader(Tokens(GBS * 4, 1), num_workers=0)

    cfg = UpcycledLlamaConfig.from_dense(HF_TINY, params_dtype=torch.float32, seq_length=SEQ, num_moe_experts=4,
                                         moe_router_topk=2, moe_token_dispatcher_type="allgather",
                                         moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, **cpu.cpu_config_overrides())
    model = llm.GPTModel(cfg, optim=nl.MegatronOptimizerModule(OptimizerConfig(
        optimizer="adam", lr=3e-3, clip_grad=1.0, bf16=False, use_distributed_optimizer=False)))
    m = ModelDims(num_layers=3, hidden_size=36, ffn_hidden_size=44, num_attention_heads=6, num_query_groups=2,
                  vocab_size=99, num_moe_experts=4, moe_router_topk=2)
    metrics = MetricsLogger(str(out / "metrics.jsonl"), tokens_per_step=GBS * SEQ,
                            flops_per_token=throughput.flops_per_token(m, SEQ), log_every_n_steps=log_every)
    strategy = nl.MegatronStrategy(expert_model_parallel_size=ep, **cpu.cpu_strategy_kwargs())
    trainer = nl.Trainer(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 1)), strategy=strategy,
                         max_steps=steps, val_check_interval=2, limit_val_batches=2 * (GBS // MBS), log_every_n_steps=1,
                         num_sanity_val_steps=0, enable_checkpointing=False, callbacks=[metrics],
                         logger=TensorBoardLogger(str(out / "tb"), name="", version=""),
                         plugins=nl.MegatronMixedPrecision(precision="32"))
    trainer.fit(model, Data())
    if trainer.is_global_zero:
        write_report(out, step0={"max_abs_logit_diff": 0.0, "passed": True}, summary={"steps": steps})


def run_train_tiny(out: Path, nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    """``train_tiny`` in a fresh process (under torchrun for nproc > 1); fails with the log tail."""
    script = out / "train_tiny_main.py"  # a file, not -c: dist-checkpoint / torchrun workers re-import __main__
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nfrom test_metrics import train_tiny\n"
                      f"if __name__ == '__main__':\n    train_tiny({str(out)!r}, **{kw!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    r = subprocess.run([sys.executable, *launcher, str(script)], cwd=out, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_nemo_training_writes_metrics_tensorboard_progress_and_report(tmp_path):
    r = run_train_tiny(tmp_path)
    m = read_metrics(tmp_path / "metrics.jsonl")
    run, train, val = m["run"][-1], m["train"], m["val"]
    assert [t["step"] for t in train] == [2, 4] and [v["step"] for v in val] == [2, 4], (train, val)
    assert run["peak_name"].startswith("CPU fp32") and run["peak_flops"] > 1e8 and run["devices"] == 1
    assert run["precision"] == "32-true"
    for t in train:
        assert t["steps"] == 2 and t["tokens"] == t["step"] * 128 and math.isfinite(t["loss"]) and t["lr"] > 0
        assert t["grad_norm"] > 0
        assert t["tokens_per_s"] == pytest.approx(2 * 128 / t["seconds"])
        assert t["tflops"] == pytest.approx(t["tokens_per_s"] * run["flops_per_token"] / 1e12)
        assert t["mfu"] == pytest.approx(t["tokens_per_s"] * run["flops_per_token"] / run["peak_flops"])
        assert t["moe_layers"] == [0, 1, 2]
        # dropless: every training token of the window reached exactly k experts, in every layer
        assert [sum(c) for c in t["tokens_per_expert"]] == [2 * 128 * 2] * 3
        assert t["dropped_fraction"] == 0.0 and 0 < t["router_entropy"] <= math.log(4)
        assert len(t["aux_loss_layers"]) == 3 and t["aux_loss"] >= 0.99 and t["z_loss"] > 0
    for v in val:
        assert v["val_ppl"] == pytest.approx(math.exp(v["val_loss"]))
    assert "tokens_per_s:" in r.stdout and "mfu_pct:" in r.stdout  # NeMo's progress printer, stdout not a TTY
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"throughput/mfu", "throughput/tokens_per_s", "moe/aux_loss", "moe/z_loss", "moe/router_entropy",
            "moe/load_cv/layer_0", "val/ppl"} <= tags, tags
    assert [e.step for e in ea.Scalars("moe/aux_loss")] == [2, 4]
    md = (tmp_path / "report.md").read_text()
    assert "**PASS**" in md and "| first | 2 |" in md and "| last | 4 |" in md
    for png in ("loss.png", "expert_load.png", "router.png", "throughput.png"):
        assert_png(tmp_path / png)


@pytest.mark.slow
def test_two_ranks_ep2_count_the_global_batch(tmp_path):
    """DP 2 x EP 2 under torchrun (gloo): the counts are summed over ranks (every token of the global batch,
    k times), the aux / z losses averaged, and rank 0 alone writes."""
    run_train_tiny(tmp_path, nproc=2, steps=2, log_every=2, ep=2)
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert len(m["run"]) == 1 and m["run"][0]["devices"] == 2 and [t["step"] for t in m["train"]] == [2]
    t = m["train"][0]
    assert [sum(c) for c in t["tokens_per_expert"]] == [2 * 128 * 2] * 3  # 2 steps x 128 tokens x k, both ranks
    run = m["run"][0]
    assert t["mfu"] == pytest.approx(t["tokens_per_s"] * run["flops_per_token"] / (2 * run["peak_flops"]))
    assert 0.99 < t["aux_loss"] < 1.5 and t["z_loss"] > 0
