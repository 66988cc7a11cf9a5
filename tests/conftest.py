"""Shared fixtures (session scope, so each tiny model is written once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import TINY, free_port, make_llama  # noqa: E402


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



@pytest.fixture(scope="module")
def megatron_world():
    """This process as a gloo group of world size 1 with Megatron's parallel state (TP = PP = EP = 1) and the
    CPU support on; torn down after the module. Imports NeMo / Megatron-core only when a test asks for it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_upcycle.engine.cpu import enable_cpu_support

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this session")
    enable_cpu_support()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()
