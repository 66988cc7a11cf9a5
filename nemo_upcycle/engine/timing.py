"""Where a run's wall time goes outside the training steps: start-up and checkpoint saves -> ``timings.json``.

``PhaseTimer`` (a Lightning callback, rank 0 writes) records, in seconds, the phases between these points (``PHASES``;
a point that did not happen, e.g. no online upcycling on a resumed run, merges its phase into the next):
  recipe         process start (the OS's record of it: imports count) -> the recipe built (``apps.training``:
                 imports, config, corpus tokenized or read from the cache, tokenizer)
  trainer        -> the model's ``configure_model`` starts (NeMo's trainer, strategy, process groups)
  upcycle        -> the model built and upcycled online (``engine.model.upcycle_into``)
  optimizer      -> Lightning's ``on_fit_start`` (DDP, optimizer, a resumed checkpoint's load)
  data           -> ``on_train_start`` (data loaders)
  step0          -> the first training step (the step-0 check, the metrics' peak probe)
  startup        the sum: process start -> first training step
  saves          one entry per checkpoint save: step, seconds (``trainer.save_checkpoint``: the sharded state dict
                 built and written; synchronous on CPU, NeMo's async save needs CUDA)
  steps          training wall time of the steps (``on_train_batch_start`` -> ``on_train_batch_end``)
Points outside the callback are set with ``mark(name)`` by the code that reaches them. The file is rewritten
(atomically) at the first step, after each save and at the end of training; ``apps.report`` shows it.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl

from nemo_upcycle.system.files import TIMINGS_FILE, atomic_write_json
from nemo_upcycle.system.launcher import is_rank0


def process_start() -> float:
    """This process's start (epoch seconds) as the OS recorded it; the import time of this module if unknown."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # psutil missing or /proc unreadable: the best later bound
        return _IMPORTED


_IMPORTED = time.time()
MARKS: dict = {}  # point -> epoch seconds, set by ``mark`` (the latest run of this process wins)
PHASES = (("recipe", "recipe_built"), ("trainer", "model_build_start"), ("upcycle", "upcycled"),
          ("optimizer", "fit_start"), ("data", "train_start"), ("step0", "first_step"))


def mark(name: str) -> None:
    """Record that this process reached ``name`` (one of the points of ``PHASES``) now."""
    MARKS[name] = time.time()


class PhaseTimer(pl.Callback):
    def __init__(self, out_dir: str):
        super().__init__()
        self.path = Path(out_dir) / TIMINGS_FILE
        self.t = {"process_start": process_start()}
        self.saves: list[dict] = []
        self.steps_seconds = 0.0
        self._step_t0: Optional[float] = None

    def _write(self) -> None:
        if not is_rank0():
            return
        t = {**{k: v for k, v in MARKS.items() if v >= self.t["process_start"]}, **self.t}
        start = t["process_start"]
        rec = {"saves": self.saves, "steps": round(self.steps_seconds, 3)}
        last = start
        for name, point in PHASES:
            if point in t:
                rec[name], last = round(t[point] - last, 3), t[point]
        if "first_step" in t:
            rec["startup"] = round(t["first_step"] - start, 3)
        if "train_end" in t:
            rec["to_train_end"] = round(t["train_end"] - start, 3)
        atomic_write_json(self.path, rec)

    def on_fit_start(self, trainer, pl_module):
        self.t.setdefault("fit_start", time.time())
        save = trainer.save_checkpoint
        if getattr(save, "_timed", False):
            return

        @functools.wraps(save)
        def timed_save(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                self.saves.append({"step": int(trainer.global_step), "seconds": round(time.perf_counter() - t0, 3)})
                self._write()

        timed_save._timed = True
        trainer.save_checkpoint = timed_save

    def on_train_start(self, trainer, pl_module):
        self.t.setdefault("train_start", time.time())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "first_step" not in self.t:
            self.t["first_step"] = time.time()
            self._write()
        self._step_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step_t0 is not None:
            self.steps_seconds += time.perf_counter() - self._step_t0

    def on_train_end(self, trainer, pl_module):
        self.t["train_end"] = time.time()
        self._write()
