"""The benchmarks' process as a one-rank gloo world with Megatron's parallel state and the CPU support on."""

from __future__ import annotations

import socket


def one_rank_world() -> None:
    """Initialise torch.distributed (gloo, world size 1) and Megatron's parallel state (TP = PP = EP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_upcycle.engine.cpu import enable_cpu_support

    enable_cpu_support()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ps.initialize_model_parallel()


def close_world() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()
