"""Which process this is, as the launcher (torchrun, Slurm's srun) or torch.distributed says: one home for "rank 0".

Before ``torch.distributed`` is initialised the launcher's environment is the only source: torchrun sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; Slurm sets ``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` for each task of an
``srun`` step (a batch script alone, with ``SLURM_NTASKS`` but one process, is not a launch). Afterwards the process
group is the truth. Errors under a launcher are printed by rank 0 only (``refuse``): a bad input reads as one line
however many processes were started.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

from nemo_upcycle.errors import UpcycleError


def _dist():
    """torch.distributed if it is already imported and initialised (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank() -> int:
    """Global rank: the process group's, else the launcher's (``RANK``, ``SLURM_PROCID``), else 0."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def is_rank0() -> bool:
    return rank() == 0


def launcher_world() -> Optional[int]:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun, ``SLURM_STEP_NUM_TASKS`` of srun), or
    None."""
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def launcher_nodes() -> Optional[tuple[int, int]]:
    """(nodes, processes per node) the launcher started, or None without one: torchrun's ``WORLD_SIZE`` /
    ``LOCAL_WORLD_SIZE``, srun's ``SLURM_STEP_NUM_NODES`` and tasks (a homogeneous step)."""
    world = launcher_world()
    if world is None:
        return None
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if not local.isdigit():
        nodes = os.environ.get("SLURM_STEP_NUM_NODES", "")
        local = str(world // int(nodes)) if nodes.isdigit() and int(nodes) and world % int(nodes) == 0 else ""
    per_node = int(local) if local.isdigit() and int(local) and world % int(local) == 0 else world
    return world // per_node, per_node


def launcher_name() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_STEP_NUM_TASKS" in os.environ:
        return "srun"
    return "the launcher"


def note(message: str) -> None:
    """Print ``note: ...`` on rank 0 only (something the run decided for the user, said once)."""
    if is_rank0():
        print(f"note: {message}", file=sys.stderr, flush=True)


def refuse(error: UpcycleError, names: Optional[Mapping[str, str]] = None) -> "None":
    """Print ``error: ...`` on rank 0 only and exit with the error's code (2): once, however many processes run.
    ``names``: how the edge calls the fields a ``FieldError`` names."""
    if is_rank0():
        print(f"error: {error.render(names)}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
              "MASTER_PORT")  # what torchrun / Lightning set for a process of a distributed job


def standalone_env() -> dict:
    """This process's environment without the distributed launch variables, for a helper process that must not
    join the job's process group (lm-eval's accelerate would try to, and fail without RANK)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
