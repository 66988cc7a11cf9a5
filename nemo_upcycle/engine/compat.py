"""NeMo 2.7 on megatron-core 0.16 (the ngc-26.02 stack, what nvcr.io/nvidia/nemo:26.02 ships): the one API break.

NeMo 2.7.0 (and 2.7.3) ``nemo/lightning/_strategy_lib.py:712`` builds the optimizer with
``get_megatron_optimizer(config, chunks, no_weight_decay_cond=..., scale_lr_cond=..., lr_mult=...,
use_gloo_process_groups=...)``; megatron-core 0.16.0 replaced those three arguments with ``config_overrides``
(megatron/core/optimizer/__init__.py:505, NVIDIA/Megatron-LM pull request 2047), so every NeMo 2 training run on
that stack fails with "get_megatron_optimizer() got an unexpected keyword argument 'no_weight_decay_cond'", on a GPU as
on the CPU. NeMo's defaults (None, None, 1.0: no weight decay for biases and 1-d parameters, no learning-rate scaling)
are what 0.16.0 does without ``config_overrides`` (``get_standard_config_overrides``, :70; 0.15.3 :104-120), so
``accept_nemo_optimizer_arguments`` lets the old arguments through when they are those defaults and refuses any other
value in one line. Applied only where the installed megatron-core lacks the arguments (not on the default stack), by
``engine/model.py`` on import (every run, GPU or CPU) and by ``cpu.enable_cpu_support``.
"""

from __future__ import annotations

import functools
import importlib
import inspect

from nemo_upcycle.errors import UpcycleError

LEGACY_DEFAULTS = {"no_weight_decay_cond": None, "scale_lr_cond": None, "lr_mult": 1.0}


def needs_optimizer_shim() -> bool:
    """Whether the installed ``get_megatron_optimizer`` lacks the arguments NeMo 2.7 passes (megatron-core 0.16)."""
    optimizer = importlib.import_module("megatron.core.optimizer")
    fn = inspect.unwrap(optimizer.get_megatron_optimizer)
    return not set(LEGACY_DEFAULTS) <= set(inspect.signature(fn).parameters)


def _accepting(stock):
    @functools.wraps(stock)
    def get_megatron_optimizer(*args, **kwargs):
        for name, default in LEGACY_DEFAULTS.items():
            value = kwargs.pop(name, default)
            if value is not default and value != default:
                raise UpcycleError(f"{name}={value!r} needs megatron-core<0.16 (0.16 takes config_overrides "
                                   f"instead); leave it unset, or install the default stack (scripts/setup.sh)")
        return stock(*args, **kwargs)

    get_megatron_optimizer.accepts_nemo_arguments = True
    return get_megatron_optimizer


def accept_nemo_optimizer_arguments() -> bool:
    """Patch ``megatron.core.optimizer.get_megatron_optimizer`` (NeMo imports it at call time) when the installed
    megatron-core needs it; returns whether it is patched now. Idempotent."""
    optimizer = importlib.import_module("megatron.core.optimizer")
    if getattr(optimizer.get_megatron_optimizer, "accepts_nemo_arguments", False):
        return True
    if not needs_optimizer_shim():
        return False
    optimizer.get_megatron_optimizer = _accepting(optimizer.get_megatron_optimizer)
    return True
