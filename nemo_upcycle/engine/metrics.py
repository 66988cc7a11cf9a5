"""Training metrics users can watch: ``metrics.jsonl`` (rank 0), TensorBoard scalars and the progress line.

``MetricsLogger`` (a Lightning callback) writes one record every ``log_every_n_steps`` optimizer steps and at the
end, over the steps since the previous record (the window). By ``kind``:
  run    once per fit: tokens_per_step, flops_per_token, peak_flops (one device, for the precision that runs: on
         CPU measured in its matmul dtype), peak_name, precision (the trainer's), devices, num_layers, num_experts,
         topk, capacity_factor, aux / z-loss coefficients
  train  step, tokens, steps, loss (mean of NeMo's reduced_train_loss), lr, grad_norm, seconds (training wall time:
         validation and checkpoints excluded), step_seconds, tokens_per_s, tflops, mfu (null without a peak),
         elapsed, and the MoE fields below
  val    step, tokens, val_loss, val_ppl
MoE fields, over the window's training forwards, per MoE layer as ``<name>_layers`` and summarized as ``<name>``:
  tokens_per_expert   tokens each expert received, after capacity dropping
  load_max_over_mean  max / mean of those (1 = balanced; summary: the worst layer)
  load_cv             std / mean (summary: the layer mean, as for the next two)
  router_entropy      mean H(softmax(router logits)) in nats, at most ln E
  dropped_fraction    1 - routed / (tokens x k); 0 when dropless
  aux_loss, z_loss    Megatron's per-layer tracker, before the coefficient (summary: sum / MoE layers, as
                      Megatron's ``track_moe_metrics`` logs it)

Routing counts come from forward hooks on Megatron's ``TopKRouter``, summed over ranks and divided by TP (TP ranks
see the same tokens unless sequence parallel). The aux / z losses are read from Megatron's tracker and cleared here:
NeMo 2.7.3's ``MegatronStrategy`` does not read them. tokens_per_s, tflops and mfu_pct also go to the progress bar
every step and to every ``trainer.loggers`` (TensorBoard) on logged steps.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from nemo_upcycle.planning.flops import device_peak, mfu, tflops
from nemo_upcycle.system.launcher import is_rank0

TRACKER_AUX = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")


# the run record's ``router`` block (the report's router section)
ROUTER_KNOBS = ("moe_router_score_function", "moe_router_pre_softmax", "moe_router_load_balancing_type",
                "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_topk_scaling_factor",
                "moe_router_num_groups", "moe_router_group_topk", "moe_router_dtype",
                "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---- routing statistics from router forward hooks ----------------------------------------------------------
class RouterStats:
    """Forward hooks on Megatron ``TopKRouter`` modules; accumulates per layer, for training forwards only:
    tokens per expert (E columns), the sum over tokens of the router entropy, and the token count."""

    def __init__(self, num_layers: int, num_experts: int, topk: int):
        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        self.acc = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64, device=_device())  # (L, E + 2)
        self.handles: list = []
        self.routers: list = []  # for the aux-loss-free expert bias (a buffer Megatron updates each step)
        self.replication = 1  # ranks that see the same tokens (TP without sequence parallel)

    def attach(self, modules: Iterable[torch.nn.Module]) -> int:
        """Hook every ``TopKRouter`` found in ``modules`` (each module walked, duplicates once); return the count."""
        from megatron.core.transformer.moe.router import TopKRouter

        seen = set()
        for root in modules:
            for m in root.modules():
                if isinstance(m, TopKRouter) and id(m) not in seen:
                    seen.add(id(m))
                    self.routers.append(m)
                    self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
                    if not m.config.sequence_parallel:
                        self.replication = _tp_size()
        return len(seen)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, router, args, kwargs, output) -> None:
        if router.training and torch.is_grad_enabled() and router.layer_number is not None:
            with torch.no_grad():
                self._count(router, args[0] if args else kwargs["input"], *output)

    def _count(self, router, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), router.weight.float(),
                                            None if router.bias is None else router.bias.float())  # (T, E)
        entropy = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)  # (T,)
        routed = routing_map.bool()
        if router.config.moe_expert_capacity_factor is not None and router.config.moe_pad_expert_input_to_capacity:
            routed = routed & (probs != 0)  # the map then also marks padding slots; real tokens have probs > 0
        row = self.acc[router.layer_number - 1]
        row[: self.num_experts] += routed.sum(0).to(row.dtype)
        row[self.num_experts] += entropy.sum().double()
        row[self.num_experts + 1] += logits.shape[0]

    def collect(self) -> Optional[dict]:
        """Sum over ranks (collective: every rank calls it), turn into per-layer statistics, reset."""
        acc = self.acc.clone()
        self.acc.zero_()
        if _dist():
            dist.all_reduce(acc)
        out = routing_summary(acc / self.replication, self.topk)
        bias = self.expert_bias()
        return {**out, **bias} if out is not None and bias else out

    def expert_bias(self) -> dict:
        """The aux-loss-free expert bias (``moe_router_enable_expert_bias``) per MoE layer: its spread (max - min)
        and max |b|, over ranks (collective: every rank calls it when any router has the bias); {} when off."""
        if not any(getattr(r, "expert_bias", None) is not None for r in self.routers):
            return {}
        t = torch.zeros(self.num_layers, 3, dtype=torch.float64, device=_device())  # spread, max |b|, present
        for r in self.routers:
            b = getattr(r, "expert_bias", None)
            if b is not None and r.layer_number is not None:
                b = b.detach().double()
                t[r.layer_number - 1] = torch.stack([b.max() - b.min(), b.abs().max(), torch.ones((), dtype=b.dtype,
                                                                                                      device=b.device)])
        if _dist():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # replicas agree; pipeline stages hold different layers
        layers = [i for i in range(self.num_layers) if t[i, 2] > 0]
        spread = [t[i, 0].item() for i in layers]
        return {"expert_bias_spread_layers": spread, "expert_bias_spread": sum(spread) / len(spread),
                "expert_bias_max_abs": max(t[i, 1].item() for i in layers)} if layers else {}


def _tp_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def routing_summary(acc: torch.Tensor, topk: int) -> Optional[dict]:
    """Per-layer statistics from an (L, E + 2) accumulator [tokens per expert..., entropy sum, tokens]; layers
    without tokens (dense layers) are left out. None when no layer saw tokens."""
    acc = acc.double().cpu()
    layers = [i for i in range(acc.shape[0]) if acc[i, -1] > 0]
    if not layers:
        return None
    counts, ent, tokens = acc[layers, :-2], acc[layers, -2], acc[layers, -1]  # (M, E), (M,), (M,)
    mean = counts.mean(1)
    max_over_mean = counts.max(1).values / mean
    cv = counts.std(1, unbiased=False) / mean
    entropy = ent / tokens
    dropped = 1.0 - counts.sum(1) / (tokens * topk)
    return {"moe_layers": layers, "tokens_per_expert": [[int(round(v)) for v in row] for row in counts.tolist()],
            "load_max_over_mean_layers": max_over_mean.tolist(), "load_max_over_mean": max_over_mean.max().item(),
            "load_cv_layers": cv.tolist(), "load_cv": cv.mean().item(),
            "router_entropy_layers": entropy.tolist(), "router_entropy": entropy.mean().item(),
            "dropped_fraction_layers": dropped.clamp(min=0.0).tolist(),
            "dropped_fraction": dropped.clamp(min=0.0).mean().item()}


# ---- aux / z losses from Megatron's tracker -------------------------------------------------------------
def tracker_names(config) -> list[str]:
    """The tracker entries a router with this TransformerConfig writes (aux loss types with coeff > 0, z_loss)."""
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    types, coeffs = ([types], [coeffs]) if isinstance(types, str) else (types, coeffs)
    kinds = ("aux_loss", "seq_aux_loss", "global_aux_loss")
    names = [TRACKER_AUX[kinds.index(t)] for t, c in zip(types, coeffs) if t in kinds and c and c > 0]
    return names + (["z_loss"] if config.moe_z_loss_coeff is not None else [])


def read_aux_losses(forwards: int, moe_layers: Optional[list[int]] = None, names: Iterable[str] = (),
                    num_layers: Optional[int] = None) -> dict:
    """Reduce Megatron's per-layer aux-loss tracker across ranks (collective), divide by the training forwards
    it summed (micro-batches x steps), clear it. Returns ``{"aux_loss": mean over MoE layers, "aux_loss_layers":
    [...], "z_loss": ..., "z_loss_layers": [...]}`` for what the tracker holds. ``names`` (from
    :func:`tracker_names`) are created empty when missing, so that every rank joins the same reductions."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in names:  # as Megatron's track_moe_metrics(force_initialize=True)
        if name not in tracker and num_layers:
            tracker[name] = {"values": torch.zeros(num_layers, device=_device()), "reduce_group": None,
                             "avg_group": None}
    if not tracker:
        return {}
    if _dist():
        moe_utils.reduce_aux_losses_tracker_across_ranks()
    out = {}
    for name in sorted(tracker):
        values = tracker[name]["values"].double().cpu() / max(forwards, 1)
        layers = moe_layers if moe_layers is not None else [i for i, v in enumerate(values.tolist()) if v != 0]
        key = "z_loss" if name == "z_loss" else "aux_loss" if name in TRACKER_AUX else name
        if key in out or not layers:
            continue
        per_layer = values[layers]
        out[key], out[f"{key}_layers"] = per_layer.mean().item(), per_layer.tolist()
    moe_utils.clear_aux_losses_tracker()
    return out


# ---- the callback -----------------------------------------------------------------------------------------
class MetricsLogger(pl.Callback):
    """Write ``metrics.jsonl`` (rank 0), TensorBoard scalars and progress-bar values during training.

    Args:
        path: the JSONL file (appended to: a resumed run continues it).
        tokens_per_step: global batch x sequence length.
        flops_per_token: model FLOPs per token (``config.translate.flops_for_run``); None: no TFLOP/s, MFU.
        peak_flops: peak FLOP/s of one device; None: the GPU table by device name, or measured on CPU, for the
            trainer's precision (``planning.flops.device_peak``).
        peak_name: what that peak is (written to the records).
        log_every_n_steps: a record every n optimizer steps (values averaged over them), and one at the end.
    """

    def __init__(self, path: str, tokens_per_step: int, flops_per_token: Optional[float] = None,
                 peak_flops: Optional[float] = None, peak_name: Optional[str] = None, log_every_n_steps: int = 1):
        super().__init__()
        self.path, self.tokens_per_step, self.flops_per_token = Path(path), int(tokens_per_step), flops_per_token
        self.peak_flops, self.peak_name, self.log_every_n_steps = peak_flops, peak_name, max(1, int(log_every_n_steps))
        self.router_stats: Optional[RouterStats] = None
        self._names: list[str] = []
        self._num_layers: Optional[int] = None
        self._t0 = self._start = None
        self._val_batches = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._steps, self._seconds, self._losses, self._grad_norms, self._lr = 0, 0.0, [], [], None

    # -- setup
    def on_train_start(self, trainer, pl_module):
        precision = str(getattr(trainer, "precision", "32"))  # NeMo's plugin: "bf16-mixed", "16-mixed", "32-true"
        if self.peak_flops is None and is_rank0():
            self.peak_flops, name = device_peak(precision)  # the peak of the precision that runs
            self.peak_name = self.peak_name or name
        config = getattr(pl_module, "config", None)
        if config is not None and getattr(config, "num_moe_experts", None):
            self._num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
            self._names = tracker_names(config)
            self.router_stats = RouterStats(self._num_layers, config.num_moe_experts, config.moe_router_topk)
            self.router_stats.attach([pl_module, trainer.model] if trainer.model is not None else [pl_module])
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()  # nothing from forwards before training (e.g. a step-0 check) in window 1
        self._start = time.perf_counter()
        self._write({"kind": "run", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "step": int(trainer.global_step), "tokens_per_step": self.tokens_per_step,
                     "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
                     "peak_name": self.peak_name, "precision": precision, "devices": int(trainer.world_size),
                     "log_every_n_steps": self.log_every_n_steps,
                     **({} if config is None else {
                         "num_layers": getattr(config, "num_layers", None),
                         "num_experts": getattr(config, "num_moe_experts", None),
                         "topk": getattr(config, "moe_router_topk", None),
                         "capacity_factor": getattr(config, "moe_expert_capacity_factor", None),
                         "aux_loss_coeff": getattr(config, "moe_aux_loss_coeff", None),
                         "z_loss_coeff": getattr(config, "moe_z_loss_coeff", None),
                         "router": {k: getattr(config, k, None) for k in ROUTER_KNOBS}})})

    def on_train_end(self, trainer, pl_module):
        if self._steps:
            self._flush(trainer)
        if self.router_stats is not None:
            self.router_stats.detach()

    # -- steps
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        m = trainer.callback_metrics
        self._steps, self._seconds = self._steps + 1, self._seconds + dt
        if (loss := m.get("reduced_train_loss")) is not None:
            self._losses.append(float(loss))
        if (gn := m.get("grad_norm")) is not None:
            self._grad_norms.append(float(gn))
        if (lr := m.get("lr")) is not None:
            self._lr = float(lr)
        if dt > 0:
            tps = self.tokens_per_step / dt
            bar = {"tokens_per_s": float(round(tps))}
            if self.flops_per_token:
                bar["tflops"] = tflops(tps, self.flops_per_token)
                if self.peak_flops:
                    bar["mfu_pct"] = 100.0 * mfu(tps, self.flops_per_token, self.peak_flops * trainer.world_size)
            for k, v in bar.items():
                pl_module.log(k, v, prog_bar=True, logger=False, batch_size=1)
        if trainer.global_step % self.log_every_n_steps == 0:
            self._flush(trainer)

    def _flush(self, trainer) -> None:
        """Write the window's record (the MoE reductions are collectives: every rank gets here)."""
        moe = {}
        if self.router_stats is not None:
            moe = self.router_stats.collect() or {}
            moe.update(read_aux_losses(self._steps * _microbatches(), moe.get("moe_layers"), self._names,
                                       self._num_layers))
        step = int(trainer.global_step)
        tps = self.tokens_per_step * self._steps / self._seconds if self._seconds > 0 else None
        rec = {"kind": "train", "step": step, "tokens": step * self.tokens_per_step, "steps": self._steps,
               "loss": _mean(self._losses), "lr": self._lr, "grad_norm": _mean(self._grad_norms),
               "seconds": self._seconds, "step_seconds": self._seconds / self._steps, "tokens_per_s": tps,
               "tflops": tflops(tps, self.flops_per_token) if tps and self.flops_per_token else None,
               "mfu": (mfu(tps, self.flops_per_token, self.peak_flops * trainer.world_size)
                       if tps and self.flops_per_token and self.peak_flops else None),
               "elapsed": time.perf_counter() - self._start if self._start else None, **peak_memory(), **moe}
        self._reset_window()
        self._write(rec)
        self._to_loggers(trainer, {
            "train/loss": rec["loss"], "train/lr": rec["lr"], "train/grad_norm": rec["grad_norm"],
            "throughput/tokens_per_s": rec["tokens_per_s"], "throughput/tflops": rec["tflops"],
            "throughput/mfu": rec["mfu"], **{f"moe/{k}": rec.get(k) for k in (
                "aux_loss", "z_loss", "router_entropy", "load_cv", "load_max_over_mean", "dropped_fraction")},
            **{f"moe/{k}/layer_{i}": v for k in ("load_cv", "router_entropy", "aux_loss")
               for i, v in zip(rec.get("moe_layers", []), rec.get(f"{k}_layers", []))}}, step)

    # -- validation
    def on_validation_start(self, trainer, pl_module):
        self._val_batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._val_batches += 1

    def on_validation_end(self, trainer, pl_module):
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking or not self._val_batches:
            return
        v, step = float(val), int(trainer.global_step)
        ppl = math.exp(min(v, 50.0))
        self._write({"kind": "val", "step": step, "tokens": step * self.tokens_per_step, "val_loss": v, "val_ppl": ppl})
        self._to_loggers(trainer, {"val/ppl": ppl}, step)

    # -- output
    def _write(self, rec: dict) -> None:
        if is_rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    @staticmethod
    def _to_loggers(trainer, scalars: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if is_rank0() and scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """This process's peak memory so far, GiB: resident set size (CPU), and the CUDA allocator's peak on a GPU."""
    import resource

    out = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["max_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _mean(xs: list) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _microbatches() -> int:
    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return get_num_microbatches()
    except Exception:  # the calculator is not set up outside a NeMo / Megatron training loop
        return 1
