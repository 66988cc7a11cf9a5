"""What upcycling learned from data, per MoE layer: each copy's unit permutation and the router rows.

An ``UpcyclePlan`` is computed once (``data.calibration``: the dense model on calibration text, layer by layer) and
then read by every producer of MoE tensors: the HF conversion, the online filler on each rank and the step-0 check,
so they all build the same experts. It is small (L x R x F unit indices and L x E x D router rows) and plain tensors,
so the engine can broadcast it from rank 0. Without data it still answers: contiguous or seeded random splits
(``core.split``) and the random / zero / virtual-group routers (``core.upcycle.router_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_upcycle.core.options import DATA_ROUTER_INITS, UpcycleOptions
from nemo_upcycle.core.split import units_of
from nemo_upcycle.core.upcycle import router_weight


@dataclass
class UpcyclePlan:
    perms: dict = field(default_factory=dict)  # layer -> LongTensor [R, F]: copy i's units, G slices of F/G
    routers: dict = field(default_factory=dict)  # layer -> FloatTensor [E, D]
    record: dict = field(default_factory=dict)  # what was measured (calibration tokens, seconds, per-layer stats)

    def units(self, opts: UpcycleOptions, layer: int, expert: int, F: int) -> Optional[torch.Tensor]:
        """The dense units expert ``expert`` holds (None: its contiguous slice; ``core.split.units_of``)."""
        return units_of(opts, layer, expert, F, self.perms)

    def router(self, hidden_size: int, opts: UpcycleOptions, layer: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The router [E, D] of ``layer``: the data's rows, else ``core.upcycle.router_weight``."""
        if layer in self.routers:
            return self.routers[layer].to(dtype)
        if opts.router_init_resolved in DATA_ROUTER_INITS:
            raise RuntimeError(f"the {opts.router_init_resolved} router of layer {layer} needs the calibration plan "
                               "(data.calibration.calibrate); none was given")
        return router_weight(hidden_size, opts, layer, dtype)
