"""The HF export at the end of a training run split over ranks (TP / PP / VP / EP / DP): the final checkpoint
streamed by rank 0, with reference logits from the live ranks.

``export_after_training(callback, trainer, pl_module)`` runs in ``UpcycleLifecycle.on_fit_end`` on every rank, i.e.
after Lightning's teardown, which finishes the final checkpoint save (``ModelCheckpoint.on_train_end`` runs after
the other callbacks' ``on_train_end``; an asynchronous save is finalized in the teardown):
1. rank 0 decides (and tells every rank, one broadcast): the checkpoint saved at the final step
   (``ModelCheckpoint._last_global_step_saved`` == the trainer's step; otherwise the export is skipped with a note:
   an older checkpoint would not match the live model), and the reference windows: the step-0 check's
   validation windows, at most ``REFERENCE_TOKENS`` tokens;
2. every rank runs one forward-only pass of Megatron's pipeline schedule (``get_forward_backward_func``, eval mode,
   dropless as HF Mixtral routes) over those windows, one window per micro-batch; the last pipeline stage gathers
   the vocabulary shards over TP and the rank holding rank 0's last stage sends the logits to rank 0;
3. rank 0 streams the checkpoint (``export_stream.stream_export``) into ``RUN/hf_mixtral`` with those logits as
   ``nemo_reference.safetensors``, which ``nemo-upcycle verify DENSE RUN/hf_mixtral`` replays with transformers, and
   records the result in ``final_eval.json``. Cost: one forward pass over the windows on every rank; rank 0 then
   writes the export (other ranks leave ``fit``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.system.launcher import is_rank0

REFERENCE_TOKENS = 1024  # the reference holds tokens x vocab fp32 logits (Llama 3: 0.5 MB a token)


def reference_windows(ids: Optional[torch.Tensor], multiple: int = 1) -> Optional[torch.Tensor]:
    """The first windows of ``ids`` [B, T] within ``REFERENCE_TOKENS`` (one window cut to a ``multiple`` of tokens:
    sequence parallelism splits it over TP)."""
    if ids is None or ids.numel() == 0:
        return None
    B, T = ids.shape
    if T <= REFERENCE_TOKENS:
        return ids[: max(1, REFERENCE_TOKENS // T)]
    return ids[:1, : REFERENCE_TOKENS - REFERENCE_TOKENS % multiple]


def _final_checkpoint(trainer) -> tuple[Optional[Path], Optional[str]]:
    """(the checkpoint saved at the trainer's final step, None) or (None, why there is none)."""
    cb = getattr(trainer, "checkpoint_callback", None)
    if cb is None or not getattr(cb, "last_model_path", None):
        return None, "no checkpoint was saved (trainer.checkpoint_every_n_steps=0)"
    saved = getattr(cb, "_last_global_step_saved", None)
    if saved != trainer.global_step:
        return None, (f"the last checkpoint is from step {saved} but training ended at step {trainer.global_step}; "
                      "export it with python -m nemo_upcycle.engine.export CKPT OUT")
    from nemo.lightning.ckpt_utils import ckpt_to_dir

    return Path(ckpt_to_dir(cb.last_model_path)).resolve(), None


def _plan(callback, trainer, pl_module) -> dict:
    """Rank 0: {"skipped": why} or {"ckpt": path, "ids": reference windows as lists}."""
    from megatron.core import parallel_state as ps

    from nemo_upcycle.formats.moe_dir import export_problem

    if not getattr(pl_module.config, "num_moe_experts", None):
        return {"skipped": None}  # a dense run has no Mixtral to export
    problem = export_problem(callback.out_dir)
    if problem is not None:  # never replace what we did not write
        return {"skipped": problem}
    ckpt, why = _final_checkpoint(trainer)
    if ckpt is None:
        return {"skipped": why}
    multiple = ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size() * 2
    ids = reference_windows(callback.check_ids, multiple)
    return {"ckpt": str(ckpt), "ids": None if ids is None else ids.tolist()}


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def live_logits(chunks: list, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Every rank: the logits [B, T, padded V] (fp32) of the model split over ranks (``chunks``: this rank's
    GPTModel per virtual stage) on ``ids``; rank 0 gets them, the other ranks None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    B, T = ids.shape
    device = next(chunks[0].parameters()).device
    ids = ids.to(device)
    pos = torch.arange(T, device=device)[None]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)[None, None]

    def step(data, model):
        x = next(data)
        return model(input_ids=x, position_ids=pos, attention_mask=mask), lambda out, non_loss_data=True: out

    configs = {id(c.config): c.config for c in chunks}.values()
    saved = [(c, c.moe_expert_capacity_factor) for c in configs]
    training = [c.training for c in chunks]
    for c in configs:
        c.moe_expert_capacity_factor = None  # HF Mixtral routes dropless; so does the reference
    for c in chunks:
        c.eval()
    try:
        data = [iter([ids[i:i + 1] for i in range(B)]) for _ in chunks]
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data if len(chunks) > 1 else data[0], model=chunks,
            num_microbatches=B, seq_length=T, micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    finally:
        for c, capacity in saved:
            c.moe_expert_capacity_factor = capacity
        for c, was in zip(chunks, training):
            c.train(was)
    sender = ps.get_pipeline_model_parallel_last_rank()  # on rank 0: the last stage of rank 0's pipeline
    rank = dist.get_rank()
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
        logits = torch.cat([gather_from_tensor_model_parallel_region(o) for o in outs]).float().contiguous()
        if rank != 0:
            dist.send(logits, dst=0)
        return logits if rank == 0 else None
    if ps.get_tensor_model_parallel_world_size() > 1 and ps.is_pipeline_last_stage(ignore_virtual=True):
        for o in outs:  # the gather is collective over the TP group
            gather_from_tensor_model_parallel_region(o)
    if rank != 0:
        return None
    vocab = chunks[0].vocab_size
    logits = torch.empty(B, T, vocab, dtype=torch.float32, device=device)
    dist.recv(logits, src=sender)
    return logits


def _update_final_eval(out_dir: Path, **fields) -> None:
    from nemo_upcycle.system.files import atomic_write_json

    p = out_dir / "final_eval.json"
    rec = json.loads(p.read_text()) if p.is_file() else {}
    atomic_write_json(p, {**rec, **fields})


def export_after_training(callback, trainer, pl_module) -> Optional[Path]:
    """Every rank of a run split over ranks, in ``on_fit_end`` (module docstring). Returns the export on rank 0."""
    from nemo_upcycle.engine.export import unwrap
    from nemo_upcycle.engine.export_stream import stream_export
    from nemo_upcycle.formats.moe_dir import EXPORT_DIR

    plan = _broadcast(_plan(callback, trainer, pl_module) if is_rank0() else None)
    if "skipped" in plan:
        if is_rank0() and plan["skipped"] is not None:
            print(f"warning: export to {EXPORT_DIR}/ skipped: {plan['skipped']}", flush=True)
            _update_final_eval(callback.out_dir, hf_mixtral=None, export_skipped=plan["skipped"])
        return None
    reference = None
    if plan["ids"] is not None:
        ids = torch.tensor(plan["ids"], dtype=torch.long)
        chunks = [unwrap(c) for c in trainer.strategy.megatron_parallel]
        logits = live_logits(chunks, ids)
        if logits is not None:
            megatron_dtype = next(chunks[0].parameters()).dtype
            reference = (ids, logits.cpu(), megatron_dtype)
    if not is_rank0():
        return None
    out = stream_export(plan["ckpt"], callback.out_dir / EXPORT_DIR, hf_llama_config=callback._dense_config(),
                        tokenizer_dir=callback.tokenizer_dir, reference=reference, overwrite=True,
                        info={"steps": int(trainer.global_step), "source": str(callback.dense_source),
                              "run_dir": str(callback.out_dir), "reference_from": "the live ranks at the end of "
                              "training" if reference is not None else None})
    _update_final_eval(callback.out_dir, hf_mixtral=str(out))
    return out
