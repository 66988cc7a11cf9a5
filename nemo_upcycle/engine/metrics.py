"""Training metrics written as they happen: one JSON object per step in ``metrics.jsonl`` (rank 0).

Fields: ``step``, ``loss`` (NeMo's data-parallel reduced training loss), ``tokens_per_s`` (global batch tokens
over the step's wall time), ``seconds``; ``val_loss`` and ``val_ppl`` when a validation ran.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class MetricsLogger(pl.Callback):
    def __init__(self, path: str, tokens_per_step: int):
        super().__init__()
        self.path, self.tokens_per_step = Path(path), tokens_per_step
        self._t0 = None

    def _rank0(self) -> bool:
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        loss = trainer.callback_metrics.get("reduced_train_loss")
        rec = {"step": int(trainer.global_step), "loss": float(loss) if loss is not None else None,
               "tokens_per_s": self.tokens_per_step / dt if dt > 0 else None, "seconds": dt}
        self._write(rec)

    def on_validation_end(self, trainer, pl_module):
        val = trainer.callback_metrics.get("val_loss")
        if val is not None and not trainer.sanity_checking:
            v = float(val)
            self._write({"step": int(trainer.global_step), "val_loss": v, "val_ppl": math.exp(min(v, 50.0))})

    def _write(self, rec: dict) -> None:
        if self._rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
