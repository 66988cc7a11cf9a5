"""Shared fixtures (session scope, so each tiny model is written once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import TINY, make_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "dense")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama_tied") / "dense", seed=1, tied=True)


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY["vocab_size"], (2, 23), generator=g)

