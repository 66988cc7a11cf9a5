"""``python train.py --config-name=tiny_llama_upcycle`` end to end (NeMo + Megatron-core on the CPU), as a user runs it.

Two runs of the same recipe (12 steps, checkpoint and validation every 3): A uninterrupted; B killed with SIGKILL
once step 4 is logged, then started again with the same command. Checked:
  * the loss goes down: the training loss of the last steps is below the first's, and the MoE's loss on the fixed
    validation windows after training is below its step-0 loss (which equals the dense model's: step0.json);
  * metrics.jsonl holds the promised fields on every training record, validation records, and TensorBoard events;
  * B resumed from its step-3 checkpoint and reproduces A's losses exactly (same data order, same optimizer state),
    and its metrics.jsonl lists every step once;
  * the HF Mixtral export: transformers loads it and computes the trained NeMo model's logits (recorded at the end
    of training) within 1e-5; ``nemo-upcycle verify`` accepts it, and rejects it once a weight is changed;
  * report.md and its PNG plots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # three NeMo processes

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
ARGS = ["--config-name=tiny_llama_upcycle", "trainer.max_steps=12", "trainer.checkpoint_every_n_steps=3",
        "trainer.val_check_interval=3"]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "train.py", *ARGS, f"hydra.run.dir={run_dir}"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def _run(run_dir: Path, log: Path) -> None:
    with open(log, "a") as f:
        p = subprocess.run(_cmd(run_dir), cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=1500)
    assert p.returncode == 0, log.read_text()[-3000:]


def _run_and_kill_after_step(run_dir: Path, log: Path, step: int) -> int:
    with open(log, "a") as f:
        p = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        deadline = time.time() + 1500
        while time.time() < deadline and p.poll() is None:
            if any(r["step"] >= step for r in _records(run_dir, "train")):
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        p.wait()
    return max((r["step"] for r in _records(run_dir, "train")), default=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    a, b = base / "a", base / "b"
    _run(a, base / "a.log")
    killed_at = _run_and_kill_after_step(b, base / "b.log", 4)
    ckpts_after_kill = sorted(p.name for p in (b / "run" / "checkpoints").iterdir())
    _run(b, base / "b.log")
    return {"a": a, "b": b, "killed_at": killed_at, "ckpts_after_kill": ckpts_after_kill, "log": base / "b.log"}


def test_loss_goes_down(runs):
    a = runs["a"]
    losses = [r["loss"] for r in _records(a, "train")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    step0 = json.loads((a / "step0.json").read_text())
    final = json.loads((a / "final_eval.json").read_text())
    assert step0["passed"] and step0["max_abs_logit_diff"] < 1e-5
    assert abs(step0["moe_loss"] - step0["dense_loss"]) < 1e-5  # step 0: the MoE is the dense model
    assert final["moe_loss"] < step0["moe_loss"] - 0.1
    # negative control: the check compares real numbers (a wrong reference would have failed it)
    assert step0["top1_agreement"] == 1.0 and step0["tokens"] == 2 * 32


def test_metrics_have_the_promised_fields(runs):
    a = runs["a"]
    train = _records(a, "train")
    per_step = _records(a, "run")[0]["tokens_per_step"]
    assert per_step == 4 * 32  # global batch x seq_length of the tiny recipe
    want = {"step", "loss", "tokens_per_s", "aux_loss", "tokens_per_expert", "load_cv", "load_max_over_mean",
            "router_entropy", "dropped_fraction", "tflops", "mfu", "lr", "grad_norm"}
    for rec in train:
        assert want <= set(rec), want - set(rec)
        assert len(rec["tokens_per_expert"]) == 3 and all(len(layer) == 4 for layer in rec["tokens_per_expert"])
        # every token goes to k=2 experts: routed assignments = 2 x tokens of the logged steps, per layer
        assert all(sum(layer) == 2 * per_step * rec["steps"] for layer in rec["tokens_per_expert"])
        assert 0 < rec["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1
    assert [r["step"] for r in train] == list(range(1, 13))
    val = _records(a, "val")
    assert [r["step"] for r in val] == [3, 6, 9, 12] and all(r["val_ppl"] > 1 for r in val)
    assert list((a / "tb").rglob("events.out.tfevents*")), "no TensorBoard event file"


def test_killed_run_resumes_and_reproduces_the_losses(runs):
    a, b = runs["a"], runs["b"]
    assert 4 <= runs["killed_at"] < 12, runs["killed_at"]
    assert "step=2" in runs["ckpts_after_kill"] and not any(n.startswith("step=11") for n in runs["ckpts_after_kill"])
    assert "resum" in runs["log"].read_text().lower()
    la = {r["step"]: r["loss"] for r in _records(a, "train")}
    steps_b = [r["step"] for r in _records(b, "train")]
    assert steps_b == list(range(1, 13)), steps_b  # each step once: the killed run's records past step 3 dropped
    lb = {r["step"]: r["loss"] for r in _records(b, "train")}
    assert lb == pytest.approx(la, abs=1e-6, rel=0)
    va = {r["step"]: r["val_loss"] for r in _records(a, "val")}
    vb = {r["step"]: r["val_loss"] for r in _records(b, "val")}
    assert vb == pytest.approx(va, abs=1e-6, rel=0)


def test_export_equals_the_trained_model_and_verify_accepts_it(runs, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import MixtralForCausalLM

    from nemo_upcycle.apps.cli import main

    a = runs["a"]
    hf = a / "hf_mixtral"
    ref = load_file(str(hf / "nemo_reference.safetensors"))
    model = MixtralForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ref["input_ids"]).logits
    assert (out - ref["logits"]).abs().max().item() < 1e-5
    dense = a / "dense_tiny"
    with torch.no_grad():
        from transformers import LlamaForCausalLM

        dl = LlamaForCausalLM.from_pretrained(str(dense), dtype=torch.float32)(ref["input_ids"]).logits
    assert (out - dl).abs().max().item() > 1e-3  # trained: no longer the dense function
    assert main(["verify", str(dense), str(hf)]) == 0
    # negative control: a changed expert weight no longer reproduces the trained NeMo model
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    shard = next(bad.glob("model*.safetensors"))
    tensors = load_file(str(shard))
    key = next(k for k in tensors if "experts.1.w2" in k)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["verify", str(dense), str(bad)]) == 1


def test_report_and_plots(runs):
    a = runs["a"]
    text = (a / "report.md").read_text()
    assert "Step-0 verification" in text and "PASS" in text
    for png in ("loss.png", "expert_load.png"):
        data = (a / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in text


def test_timings_and_report_time_section(runs):
    """timings.json: start-up phases in order and one entry per checkpoint save (NeMo's checkpoints on disk are the
    reference: every step that has a checkpoint directory was timed); report.md shows them."""
    a = runs["a"]
    t = json.loads((a / "timings.json").read_text())
    phases = [t[k] for k in ("recipe", "trainer", "upcycle", "optimizer", "data", "step0")]
    assert all(x >= 0 for x in phases) and t["startup"] == pytest.approx(sum(phases), abs=0.01)
    assert 0 < t["steps"] < t["to_train_end"]
    saved = sorted({int(p.name.split("step=")[1].split("-")[0]) for p in (a / "run" / "checkpoints").iterdir()
                    if "step=" in p.name})
    timed = sorted({s["step"] for s in t["saves"]})
    # NeMo names a checkpoint by its last batch's 0-based index (step=2 after 3 optimizer steps); timed: global_step
    assert saved and timed == [s + 1 for s in saved] and all(s["seconds"] > 0 for s in t["saves"])
    text = (a / "report.md").read_text()
    assert "## Time" in text and f"checkpoint save at step {timed[0]}" in text
    assert "Precision: **32-true**" in text or "Precision: **32**" in text
