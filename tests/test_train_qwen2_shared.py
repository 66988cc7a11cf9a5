"""``python train.py --config-name=tiny_llama_upcycle model=auto model.source=QWEN2 moe=e8_top2_shared`` end to end, as
a user runs it: the model group read from a random Qwen2 checkpoint's own config (family qwen2, q/k/v biases, tied
embeddings), online upcycling with a gated shared expert, the step-0 check (step0.json: exact, and says why), a few
steps of training, and the export in the format auto picks (HF Qwen2-MoE: Mixtral holds no shared expert), which
``nemo-upcycle verify`` accepts against the trained NeMo logits (transformers' Qwen2MoeForCausalLM). Negative control:
verify rejects the export once the shared expert's gate is changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_qwen2

pytestmark = pytest.mark.slow  # one NeMo process

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def test_qwen2_source_with_shared_experts_trains_and_exports(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from nemo_upcycle.apps.cli import main

    dense = make_qwen2(tmp_path / "qwen2")
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config-name=tiny_llama_upcycle", "model=auto", f"model.source={dense}",
           "moe=e8_top2_shared", "moe.moe_shared_expert_gate=true", "trainer.max_steps=3",
           "trainer.checkpoint_every_n_steps=0", "trainer.val_check_interval=3", f"hydra.run.dir={run}"]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    identity = json.loads((run / "run_identity.json").read_text())
    assert identity["model.family"] == "qwen2" and identity["model.add_qkv_bias"] is True
    assert identity["moe.moe_shared_expert_intermediate_size"] == 44 and identity["moe.moe_shared_expert_gate"]
    step0 = json.loads((run / "step0.json").read_text())
    assert step0["passed"] and step0["max_abs_logit_diff"] < 1e-5, step0
    assert "shared expert" in json.dumps(step0)
    out = run / "hf_mixtral"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["qkv_bias"] is True and cfg["shared_expert_intermediate_size"] == 44
    capsys.readouterr()
    assert main(["verify", str(dense), str(out), "--atol", "1e-4"]) == 0
    assert "PASS" in capsys.readouterr().out
    f = out / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.shared_expert_gate.weight"] = sd["model.layers.1.mlp.shared_expert_gate.weight"] + 0.5
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    assert main(["verify", str(dense), str(out), "--atol", "1e-4"]) == 1
