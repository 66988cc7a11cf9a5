"""The end-of-training evaluation runs in a process of its own, outside the training's process group: Lightning sets
MASTER_ADDR / WORLD_SIZE / ... for the training process, and lm-eval's accelerate, seeing them, tries to join a
process group and fails (RANK expected). ``standalone_env`` drops exactly the launch variables."""

from __future__ import annotations

from nemo_upcycle.system.launcher import LAUNCH_ENV, standalone_env


def test_launch_variables_dropped_others_kept(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = standalone_env()
    assert not set(LAUNCH_ENV) & set(env) and "TORCHELASTIC_RUN_ID" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and "PATH" in env
    assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"} <= set(LAUNCH_ENV)
