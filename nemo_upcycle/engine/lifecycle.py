"""What a training run does around NeMo's fit loop: the step-0 check, the before / after evaluation, the HF export.

``UpcycleLifecycle`` is a Lightning callback:

  on_train_start, step 0   the step-0 check -> ``step0.json`` (the step-0 verification of the report), PASS/FAIL:
                           ``layers``: on every rank, each MoE layer it holds (its own forward, with the expert-parallel
                           exchange) against the dense MLP of the source, the router and every expert against what
                           upcycling builds, gathered to rank 0 (``engine.step0``; any layout, online upcycling);
                           where the whole model is in one process also the freshly upcycled Megatron MoE against
                           transformers' dense model on validation windows: max / mean |logit difference|, top-1
                           agreement, both validation losses (``logits_passed``; split runs say why not).
  on_train_start, resumed  ``metrics.jsonl`` records past the resumed step (written by the killed run after
                           its last checkpoint) are dropped, so the file reads as one uninterrupted run; the
                           batch counter is aligned with the step (validation on the same steps as unresumed).
  on_train_end (rank 0, the whole model in one process: TP = PP = EP = 1; other layouts note why not)
                           the MoE's loss on the same windows after training -> ``final_eval.json``; the MoE
                           exported as an HF Mixtral directory (``hf_mixtral/``) with reference logits, which
                           ``nemo-upcycle verify DENSE hf_mixtral`` checks. An ``hf_mixtral/`` that nemo-upcycle
                           did not write is never replaced: the export is skipped with a note (train.py refuses
                           such a run directory before training; this catches one made during training).
  on_fit_end, > 1 rank     after the final checkpoint save: the reference logits from the live ranks, then rank 0
                           streams that checkpoint into ``hf_mixtral/`` (``engine.export_scale``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch

from nemo_upcycle.formats.moe_dir import EXPORT_DIR, export_problem
from nemo_upcycle.offline.verify import STEP0_ATOL
from nemo_upcycle.system.files import atomic_write_json, atomic_write_text
from nemo_upcycle.system.launcher import is_rank0, launcher_world

log = logging.getLogger(__name__)


def window_loss(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> float:
    """Mean next-token cross entropy of ``logits`` [B, T, V'] on ``ids`` [B, T] (the first ``vocab`` logits)."""
    lg = logits[:, :-1, :vocab].float()
    return torch.nn.functional.cross_entropy(lg.reshape(-1, vocab), ids[:, 1:].reshape(-1)).item()


def compare_logits(moe: torch.Tensor, dense: torch.Tensor, ids: torch.Tensor) -> dict:
    V = dense.shape[-1]
    moe = moe[..., :V].float()
    d = (moe - dense.float()).abs()
    return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
            "top1_agreement": (moe.argmax(-1) == dense.argmax(-1)).float().mean().item(),
            "dense_loss": window_loss(dense, ids, V), "moe_loss": window_loss(moe, ids, V), "tokens": ids.numel()}


def truncate_metrics(path: Path, step: int) -> int:
    """Drop records with ``step`` > ``step`` from a metrics.jsonl (atomically). Returns how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            dropped += 1
            continue
        if rec.get("step", 0) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


def align_batch_progress(trainer, step: int) -> None:
    """Make Lightning's batch counter agree with the resumed optimizer step.

    NeMo's checkpoint is written in ``on_train_batch_end``, before Lightning counts the batch as completed, so a
    restarted run's epoch loop starts one batch behind (Lightning warns: "resuming from a checkpoint that ended
    before the epoch ended") and ``val_check_interval`` fires one step early for the rest of the run. One
    Lightning batch is one optimizer step here (NeMo's data sampler makes the micro-batches), so the counters
    are set to the step. The data itself resumes by NeMo's consumed-samples count, not by this counter.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    progress = getattr(loop, "batch_progress", None)
    if progress is None:
        return
    for counter in (progress.current, progress.total):
        counter.ready = counter.started = counter.processed = counter.completed = step


class UpcycleLifecycle(pl.Callback):
    """``eval_windows`` validation windows (taken from the trainer's data module: the first windows of
    ``CorpusData``'s validation split, or ``MockTokens``' validation samples) unless ``check_ids`` gives them."""

    def __init__(self, out_dir: str, eval_windows: int = 4, dense_source: Optional[str] = None,
                 metrics_file: str = "metrics.jsonl", export: bool = True, tokenizer_dir: Optional[str] = None,
                 step0_atol: float = STEP0_ATOL, check_ids: Optional[list] = None):
        super().__init__()
        self.out_dir, self.dense_source, self.metrics_file = Path(out_dir), dense_source, metrics_file
        self.eval_windows = eval_windows
        self.check_ids = torch.tensor(check_ids, dtype=torch.long) if check_ids else None
        self.export, self.tokenizer_dir, self.step0_atol = export, tokenizer_dir, step0_atol

    # -- helpers -------------------------------------------------------------------------------------------
    def _one_rank(self) -> bool:
        return (launcher_world() or 1) == 1

    def _logits(self, pl_module) -> torch.Tensor:
        from nemo_upcycle.engine.export import unwrap
        from nemo_upcycle.engine.model import megatron_forward_logits

        module = unwrap(pl_module.module)
        was = module.training
        module.eval()
        try:
            return megatron_forward_logits(module, self.check_ids)
        finally:
            module.train(was)

    def _dense_logits(self, rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
        """transformers' dense model's logits (read once per check: ``self._dense`` until the check ends)."""
        if getattr(self, "_dense", None) is None:
            self._dense = dense_reference_model(self.dense_source)
        dense = self._dense
        if rounded_to is not None:  # the weights as a mixed-precision MoE holds them, computed in fp32; buffers
            dense = copy.deepcopy(dense)  # (rotary frequencies) stay fp32 as in Megatron, which keeps them outside
            for p in dense.parameters():  # its modules' buffers
                p.data = p.data.to(rounded_to).float()
        with torch.no_grad():
            out = dense(self.check_ids).logits
        del dense
        return out

    def _dense_config(self) -> Optional[dict]:
        """The dense source's HF config (read once): its vocabulary crops the logits, the export needs it whole."""
        if not hasattr(self, "_dense_cfg"):
            from nemo_upcycle.formats.base import open_dense

            self._dense_cfg = dict(open_dense(self.dense_source).config) if self.dense_source else None
        return self._dense_cfg

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if self.check_ids is None and self.eval_windows > 0 and is_rank0():
            ids = validation_windows(getattr(trainer, "datamodule", None), self.eval_windows)
            self.check_ids = torch.tensor(ids, dtype=torch.long) if ids else None
        step = int(trainer.global_step)
        if step > 0:
            align_batch_progress(trainer, step)
            if is_rank0():
                n = truncate_metrics(self.out_dir / self.metrics_file, step)
                log.info("resumed at step %d%s", step, f"; dropped {n} metrics records past it" if n else "")
            return
        from nemo_upcycle.engine.step0 import in_fp32

        roots = [pl_module] + ([trainer.model] if getattr(trainer, "model", None) is not None else [])
        with in_fp32(roots) as low:  # mixed precision: the bf16 / fp16 weights checked on fp32 copies
            layers = self._layer_check(trainer, pl_module, roots, low)  # every rank: the forwards are collectives
            if not is_rank0():
                return
            rec: dict = {"step": 0}
            logits_skipped = None
            if self.check_ids is None:
                logits_skipped = "no validation windows (trainer.eval_windows=0)"
            elif not self._one_rank():
                logits_skipped = ("the model is split over ranks: the whole-model logits check needs one process "
                                  "(mode=verify runs it offline); the per-layer check covers every layout")
            elif not self.dense_source or (Path(self.dense_source).is_dir()
                                           and not (Path(self.dense_source) / "config.json").is_file()):
                logits_skipped = "the dense source is not an HF directory or GGUF; run mode=verify on an HF copy"
            else:
                self._logits_check(rec, pl_module, low)
        if low is not None and "max_abs_logit_diff" in rec:
            self._as_trained(rec, pl_module, low)
        self._dense = None
        verdicts = [v for v in (rec.get("logits_passed"), layers.get("passed") if "rows" in layers else None)
                    if v is not None]
        if verdicts:
            rec["passed"] = all(verdicts)
            if logits_skipped:
                rec["logits_skipped"] = logits_skipped
        else:
            rec["skipped"] = logits_skipped if "skipped" not in layers else f"{logits_skipped}; {layers['skipped']}"
        rec["layers"] = layers
        atomic_write_json(self.out_dir / "step0.json", rec)

    def _logits_check(self, rec: dict, pl_module, low) -> None:
        """The whole model's logits against transformers' dense model on the validation windows (rank 0, one rank);
        under mixed precision both sides hold the weights rounded to ``low`` and compute in fp32."""
        t0 = time.perf_counter()
        moe = self._logits(pl_module)
        dense = self._dense_logits(low)
        rec.update(compare_logits(moe, dense, self.check_ids))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["atol"] = self.step0_atol
        rec["logits_passed"] = rec["max_abs_logit_diff"] <= self.step0_atol
        rec["dense_ppl"], rec["moe_ppl"] = math.exp(rec["dense_loss"]), math.exp(rec["moe_loss"])
        if low is not None:
            rec["checked_in"] = (f"fp32, on the {str(low).removeprefix('torch.')} weights that train (the dense "
                                 "reference's weights rounded alike)")
        print(f"step-0 check: max |dlogit| {rec['max_abs_logit_diff']:.2e}, top-1 agreement "
              f"{rec['top1_agreement']:.4f}, validation loss dense {rec['dense_loss']:.4f} / MoE "
              f"{rec['moe_loss']:.4f}: {'PASS' if rec['logits_passed'] else 'FAIL'}", flush=True)

    def _as_trained(self, rec: dict, pl_module, low) -> None:
        """What the training precision itself costs at step 0 (information, not a verdict): the MoE as it trains
        (bf16 / fp16 activations) against the fp32 dense model with the source's own weights."""
        t0 = time.perf_counter()
        d = compare_logits(self._logits(pl_module), self._dense_logits(None), self.check_ids)
        name = str(low).removeprefix("torch.")
        rec["as_trained"] = {"precision": name, "max_abs_logit_diff": d["max_abs_logit_diff"],
                             "top1_agreement": d["top1_agreement"], "moe_loss": d["moe_loss"],
                             "dense_loss": d["dense_loss"], "seconds": round(time.perf_counter() - t0, 3)}
        print(f"step-0 in {name} as it trains (rounding, not upcycling): max |dlogit| {d['max_abs_logit_diff']:.2e} "
              f"vs the fp32 dense model, top-1 agreement {d['top1_agreement']:.4f}", flush=True)

    def _layer_check(self, trainer, pl_module, roots, low=None) -> dict:
        """The per-layer check (``engine.step0``) on every rank; its summary on rank 0 (``{}`` elsewhere)."""
        from nemo_upcycle.engine import step0

        config = getattr(pl_module, "config", None)
        if not getattr(config, "num_moe_experts", None):
            return {"skipped": "no MoE layers (a dense run)"}
        if not getattr(pl_module, "upcycle_from", None) or not self.dense_source:
            return {"skipped": "the model was not upcycled online from a dense source"}
        opts = config.upcycle_options()
        t0 = time.perf_counter()
        from nemo_upcycle.engine.calibrate import cached_plan
        from nemo_upcycle.formats.base import open_dense

        plan = cached_plan(config, open_dense(self.dense_source))  # the splits / routers the filler used
        records = step0.gather(step0.run_checks(roots, opts, self.dense_source, weights_dtype=low, plan=plan))
        if records is None:
            return {}
        summary = step0.summarize(records, opts)
        if plan is not None and plan.record:
            summary["calibration"] = plan.record  # what the data gave: tokens, cost, balance, first-step load
        summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
        print(step0.format_summary(summary), flush=True)
        return summary

    def on_train_end(self, trainer, pl_module):
        if not is_rank0():
            return
        rec: dict = {"step": int(trainer.global_step)}
        if not self._one_rank():
            rec["skipped"] = "the model is split over ranks: no final evaluation (the HF export streams the checkpoint)"
            atomic_write_json(self.out_dir / "final_eval.json", rec)
            return
        if self.check_ids is not None:
            logits = self._logits(pl_module)
            dense_cfg = self._dense_config()
            vocab = dense_cfg["vocab_size"] if dense_cfg else logits.shape[-1]
            rec["moe_loss"] = window_loss(logits, self.check_ids, vocab)
            rec["moe_ppl"] = math.exp(rec["moe_loss"])
            rec["tokens"] = self.check_ids.numel()
        problem = export_problem(self.out_dir) if self.export else None
        if self.export and not getattr(pl_module.config, "num_moe_experts", None):
            rec["hf_mixtral"] = None  # a dense run (moe=dense) has no Mixtral to export
        elif problem is not None:  # never replace what we did not write
            rec.update(hf_mixtral=None, export_skipped=problem)
            print(f"warning: export to {EXPORT_DIR}/ skipped: {problem}; export a checkpoint elsewhere with python -m "
                  "nemo_upcycle.engine.export CKPT OUT", flush=True)
        elif self.export:
            from nemo_upcycle.engine.export import export_hf_mixtral, unwrap

            out = export_hf_mixtral(unwrap(pl_module.module), pl_module.config, self.out_dir / EXPORT_DIR,
                                    hf_llama_config=self._dense_config(), tokenizer_dir=self.tokenizer_dir,
                                    reference_ids=self.check_ids, overwrite=True,
                                    info={"steps": int(trainer.global_step), "source": str(self.dense_source),
                                          "run_dir": str(self.out_dir)})
            rec["hf_mixtral"] = str(out)
        atomic_write_json(self.out_dir / "final_eval.json", rec)

    def on_fit_end(self, trainer, pl_module):  # after the final checkpoint save (Lightning's teardown finishes it)
        if self.export and not self._one_rank():  # split over ranks: every rank joins (engine.export_scale)
            from nemo_upcycle.engine.export_scale import export_after_training

            export_after_training(self, trainer, pl_module)


def validation_windows(datamodule, n: int) -> list[list[int]]:
    """The first ``n`` validation windows (seq_length tokens each) of a ``CorpusData`` or ``MockTokens``: the
    same on every run of the same corpus."""
    from nemo_upcycle.engine.data import CorpusData, MockTokens

    if isinstance(datamodule, MockTokens):
        if datamodule.val_ds is None:
            datamodule.setup()
        ds = datamodule.val_ds
        return [ds[i]["tokens"].tolist() for i in range(min(n, len(ds)))]
    if isinstance(datamodule, CorpusData):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        T = datamodule.seq_length
        ds = IndexedDataset(datamodule.corpus.validation_prefix, mmap=False)
        ids: list[int] = []
        for i in range(len(ds)):
            ids += ds[i].tolist()
            if len(ids) >= n * T:
                break
        return [ids[i * T:(i + 1) * T] for i in range(min(n, len(ids) // T))]
    return []


def dense_reference_model(source: str):
    """transformers' ``LlamaForCausalLM`` (fp32) holding the dense source's tensors, as ``open_dense`` reads them.

    An HF directory loads with ``from_pretrained``; a GGUF (or NeMo) source is read by the project's reader,
    whose tensors equal transformers' own GGUF loading (tests/test_gguf_source.py), which is several times
    slower (it dequantizes through numpy) and holds a second copy of the weights while loading.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_upcycle.formats.base import open_dense
    from nemo_upcycle.offline.verify import load_dense

    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return load_dense(p).eval()
    src = open_dense(p)
    keys = {k: v for k, v in src.config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    model = LlamaForCausalLM(LlamaConfig(**keys)).float().eval()
    state = {k: src.get(k).float() for k in src.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dense reference: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model
