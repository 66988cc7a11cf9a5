"""The calibration plan of an online-upcycled run: computed once, on global rank 0, and broadcast to every rank.

``plan_for(config, src)`` returns the ``core.plan.UpcyclePlan`` the run's upcycling options need (``data.calibration``
runs the dense model on the calibration text layer by layer); without data-aware options, an empty plan (contiguous
or seeded random splits and random routers need no data). Every rank of the job calls it from
``engine.model.upcycle_into`` (a collective when the world has more than one process: ``broadcast_object_list``
from rank 0, so every rank fills its experts and routers from the same numbers); the result is kept per process, so
the step-0 check (``engine.lifecycle``) reads the same plan without a second pass or a second collective.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from nemo_upcycle.core.plan import UpcyclePlan
from nemo_upcycle.formats.base import DenseSource

log = logging.getLogger(__name__)
_PLANS: dict = {}


def spec_of(config):
    """The ``CalibrationSpec`` recorded in the model config's ``upcycle_calibration*`` fields."""
    from nemo_upcycle.data.calibration import CalibrationSpec

    tok = getattr(config, "upcycle_calibration_tokenizer", None)
    prompts = getattr(config, "upcycle_router_prompts", None)
    return CalibrationSpec(files=[Path(f) for f in (getattr(config, "upcycle_calibration", None) or [])],
                           max_tokens=getattr(config, "upcycle_calibration_tokens", 4096),
                           prompts=None if prompts is None else Path(prompts), tokenizer=None if not tok else Path(tok),
                           flag="upcycle.calibration", prompts_flag="upcycle.router_prompts",
                           tokens_flag="upcycle.calibration_tokens")


def _key(config, src: DenseSource) -> str:
    opts = config.upcycle_options()
    return json.dumps([str(src.path), opts.to_record(), spec_of(config).to_record()], sort_keys=True, default=str)


def cached_plan(config, src: DenseSource) -> Optional[UpcyclePlan]:
    """The plan this process already has for (config, src), if any."""
    return _PLANS.get(_key(config, src)) if getattr(config, "num_moe_experts", None) else None


def plan_for(config, src: DenseSource, progress: bool = True) -> UpcyclePlan:
    """The run's plan (module docstring); a collective over the default process group when data is needed."""
    opts = config.upcycle_options()
    if not opts.reads_text:
        return UpcyclePlan()
    key = _key(config, src)
    if key in _PLANS:
        return _PLANS[key]
    import torch.distributed as dist

    from nemo_upcycle.system.launcher import is_rank0

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    box: list = [None]
    if not multi or is_rank0():
        from nemo_upcycle.data.calibration import calibrate, describe

        try:
            box[0] = calibrate(src, opts, spec_of(config), progress=progress)
            print(describe(box[0].record), flush=True)
        except Exception as e:  # every rank must leave the collective: rank 0 sends the error instead of a plan
            if not multi:
                raise
            box[0] = e
    if multi:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    _PLANS[key] = box[0]
    return box[0]
