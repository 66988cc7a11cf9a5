"""A validated ``RunConfig`` (the Hydra recipe) -> the NeMo-Run ``run.Partial(llm.train, ...)`` NeMo's own
recipes return. One source of truth: ``train.py mode=train`` builds and calls this Partial; ``recipes/<name>.py``
return it to NeMo-Run (local, Slurm, NGC containers).

What goes where (NeMo 2 names): model = ``UpcycledLlamaModel(config=<NeMo Llama config + MoE fields>,
upcycle_from=<dense source>)`` (online upcycling); trainer = ``nl.Trainer`` + ``nl.MegatronStrategy`` (TP, PP,
VP, CP, EP, ETP, SP); optim = Megatron Adam with a cosine schedule; log = ``nl.NeMoLogger`` with checkpoints
under the run directory; resume = ``nl.AutoResume`` (resume_if_exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import nemo_run as run
import torch
from megatron.core.optimizer import OptimizerConfig
from nemo import lightning as nl
from nemo.collections import llm
from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.engine.config import UpcycledLlama31Config, UpcycledLlamaConfig
from nemo_upcycle.engine.cpu import cpu_config_overrides, cpu_strategy_kwargs
from nemo_upcycle.engine.cpu_mixed import cpu_bf16_config_overrides
from nemo_upcycle.engine.data import CorpusData, MockTokens
from nemo_upcycle.engine.lifecycle import UpcycleLifecycle
from nemo_upcycle.engine.metrics import MetricsLogger
from nemo_upcycle.engine.model import UpcycledLlamaModel
from nemo_upcycle.engine.timing import PhaseTimer
from nemo_upcycle.formats.keymap import FIELDS, model_values


def model_config(r: RunConfig, tokenizer_dir: Optional[str] = None) -> run.Config:
    """The NeMo Llama config of the recipe: the ``model.*`` sizes under their Megatron names (the key table's config
    fields; ``data.seq_length`` is the sequence trained on), the MoE and upcycling fields, precision and layout."""
    m, moe, up = r.model, r.moe, r.upcycle
    bf16 = r.trainer.precision.startswith("bf16")
    sizes = model_values(m)
    scale_factor = sizes["scale_factor"]
    kw = {k: v for k, v in sizes.items() if not FIELDS[k].rope}
    kw["seq_length"] = r.data.seq_length
    if m.add_qkv_bias:  # Qwen2 / Qwen2.5 (NeMo's Qwen2Config sets the same)
        kw["add_qkv_bias"] = True
    kw.update(vocab_padding(r))
    kw.update(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
              num_moe_experts=moe.num_moe_experts, moe_router_topk=moe.moe_router_topk,
              moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
              moe_token_drop_policy=moe.moe_token_drop_policy,
              moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
              moe_aux_loss_coeff=moe.moe_aux_loss_coeff, moe_z_loss_coeff=moe.moe_z_loss_coeff,
              moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
              moe_token_dispatcher_type=moe.moe_token_dispatcher_type, moe_grouped_gemm=moe.moe_grouped_gemm,
              moe_router_pre_softmax=moe.moe_router_pre_softmax,
              moe_router_score_function=moe.moe_router_score_function,
              moe_layer_freq=moe.moe_layer_freq,
              moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
              moe_shared_expert_gate=moe.moe_shared_expert_gate, export_format=r.logging.export_format,
              moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
              moe_router_bias_update_rate=moe.moe_router_bias_update_rate,
              moe_router_topk_scaling_factor=moe.moe_router_topk_scaling_factor,
              moe_router_num_groups=moe.moe_router_num_groups, moe_router_group_topk=moe.moe_router_group_topk,
              moe_router_dtype=moe.moe_router_dtype,
              upcycle_granularity=up.granularity,
              upcycle_scaling=up.scaling,
              upcycle_router_init=up.router_init, upcycle_router_std=up.router_std, upcycle_noise_std=up.noise_std,
              upcycle_drop_ratio=up.drop_ratio, upcycle_seed=up.seed)
    kw.update(calibration_fields(r, tokenizer_dir))
    if r.trainer.recompute != "none":
        kw.update(recompute_granularity=r.trainer.recompute,
                  recompute_method="uniform" if r.trainer.recompute == "full" else None,
                  recompute_num_layers=1 if r.trainer.recompute == "full" else None)
    if r.parallel.accelerator == "cpu":
        kw.update(cpu_config_overrides())
        if bf16:
            kw.update(cpu_bf16_config_overrides())
    cls = UpcycledLlamaConfig
    if scale_factor:  # Llama 3.1 / 3.2 RoPE scaling; NeMo's other RoPE fields keep their defaults
        cls = UpcycledLlama31Config
        kw.update(scale_factor=scale_factor)
    return run.Config(cls, **kw)


def calibration_fields(r: RunConfig, tokenizer_dir: Optional[str]) -> dict:
    """The split and, when upcycling learns from data, its calibration inputs (``config.translate.calibration_spec``:
    ``upcycle.calibration`` or the corpus; the data's tokenizer, else the source's)."""
    from nemo_upcycle.config.translate import calibration_spec, upcycle_options

    out = dict(upcycle_expert_split=r.upcycle.expert_split, upcycle_non_expert=r.model.non_expert,
               upcycle_expert_sources=list(r.model.expert_sources) or None)
    if r.moe.num_moe_experts is None:
        return out
    opts = upcycle_options(r)
    if opts.reads_text:
        spec = calibration_spec(r)
        out.update(upcycle_calibration=[str(f) for f in spec.files] or None,
                   upcycle_calibration_tokens=spec.max_tokens,
                   upcycle_router_prompts=None if spec.prompts is None else str(spec.prompts),
                   upcycle_calibration_tokenizer=str(spec.tokenizer or tokenizer_dir or "") or None)
    return out


def vocab_padding(r: RunConfig) -> dict:
    """The vocabulary padded as NeMo pads a tokenizer's (``make_vocab_size_divisible_by`` x TP, nemo/lightning/base.py
    ``get_vocab_size``; the planner's ``ModelDims.padded_vocab``), the real size kept for the logits mask."""
    from nemo_upcycle.config.translate import model_dims

    dims = model_dims(r)
    return dict(vocab_size=dims.padded_vocab(r.parallel.tensor_model_parallel_size),
                make_vocab_size_divisible_by=dims.make_vocab_size_divisible_by,
                unpadded_vocab_size=r.model.vocab_size)


def data_module(r: RunConfig, tokenizer_dir: Optional[str]) -> run.Config:
    d = r.data
    common = dict(seq_length=d.seq_length, micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size)
    if d.kind == "mock":
        return run.Config(MockTokens, vocab_size=r.model.vocab_size, seed=d.seed, **common)
    from nemo_upcycle.config.translate import corpus_paths

    return run.Config(CorpusData, paths=corpus_paths(r), tokenizer_dir=tokenizer_dir, vocab_size=r.model.vocab_size,
                      validation_fraction=d.validation_fraction, seed=d.seed, **common)


def strategy(r: RunConfig) -> run.Config:
    p = r.parallel
    extra = cpu_strategy_kwargs() if p.accelerator == "cpu" else {}
    return run.Config(nl.MegatronStrategy, tensor_model_parallel_size=p.tensor_model_parallel_size,
                      pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                      virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                      context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                      expert_model_parallel_size=p.expert_model_parallel_size,
                      expert_tensor_parallel_size=p.expert_tensor_parallel_size,
                      ckpt_include_optimizer=True, **extra)


def callbacks(r: RunConfig, out_dir: Path, source: Optional[str], tokenizer_dir: Optional[str]) -> list:
    """The phase timer first (its ``on_train_start`` precedes the step-0 check), the step-0 check / final eval / HF
    export next (its forwards are not training statistics), then metrics."""
    from nemo_upcycle.config.translate import flops_for_run, peak_for_run

    peak, peak_name = peak_for_run(r)
    return [run.Config(PhaseTimer, out_dir=str(out_dir)),
            run.Config(UpcycleLifecycle, out_dir=str(out_dir), eval_windows=r.trainer.eval_windows, dense_source=source,
                       metrics_file=r.logging.metrics_file, export=r.logging.export_hf, tokenizer_dir=tokenizer_dir),
            run.Config(MetricsLogger, path=str(out_dir / r.logging.metrics_file),
                       tokens_per_step=r.data.global_batch_size * r.data.seq_length, flops_per_token=flops_for_run(r),
                       peak_flops=peak, peak_name=peak_name, log_every_n_steps=r.trainer.log_every_n_steps)]


def precision_plugin(precision: str) -> run.Config:
    """NeMo's precision plugin as its recipes build it (nemo/collections/llm/recipes/precision/mixed_precision.py):
    ``bf16_mixed()`` (bf16 parameters and pipeline tensors, gradients reduced in fp32; Megatron's optimizer keeps fp32
    main parameters) or ``fp16_mixed()``; fp32 otherwise. At ``connect`` the strategy writes its dtypes into the
    model, optimizer and DDP configs (``update_config_with_dtype_overrides``), so they agree with ``model_config``."""
    from nemo.collections.llm.recipes.precision.mixed_precision import bf16_mixed, fp16_mixed

    if precision in ("bf16", "bf16-mixed"):
        return bf16_mixed()
    if precision in ("16", "16-mixed"):
        return fp16_mixed()
    return run.Config(nl.MegatronMixedPrecision, precision=precision)


def trainer(r: RunConfig, out_dir: Path, source: Optional[str] = None,
            tokenizer_dir: Optional[str] = None) -> run.Config:
    t, p = r.trainer, r.parallel
    return run.Config(
        nl.Trainer, accelerator=p.accelerator, devices=p.devices, num_nodes=p.num_nodes, max_steps=t.max_steps,
        val_check_interval=t.val_check_interval, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0, strategy=strategy(r),
        enable_checkpointing=t.checkpoint_every_n_steps > 0,  # 0: no checkpoints at all (nemo-upcycle compare)
        plugins=precision_plugin(t.precision),
        callbacks=callbacks(r, out_dir, source, tokenizer_dir),
    )


def optimizer(r: RunConfig) -> run.Config:
    o = r.optim
    cfg = run.Config(OptimizerConfig, optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                     adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
                     bf16=r.trainer.precision.startswith("bf16"), use_distributed_optimizer=o.use_distributed_optimizer)
    sched = run.Config(CosineAnnealingScheduler, warmup_steps=o.warmup_steps, constant_steps=0, min_lr=o.min_lr,
                       max_steps=r.trainer.max_steps)
    return run.Config(nl.MegatronOptimizerModule, config=cfg, lr_scheduler=sched)


def logger(r: RunConfig, out_dir: Path) -> run.Config:
    ckpt = run.Config(nl.ModelCheckpoint, monitor=None, every_n_train_steps=r.trainer.checkpoint_every_n_steps,
                      save_last="link", save_top_k=-1, save_optim_on_train_end=True, filename="{step}")
    ckpt = ckpt if r.trainer.checkpoint_every_n_steps > 0 else None  # 0: no checkpoints (trainer() agrees)
    tb = run.Config(__import__("lightning.pytorch.loggers", fromlist=["TensorBoardLogger"]).TensorBoardLogger,
                    save_dir="tb", name="") if r.logging.tensorboard else None  # NeMoLogger puts it under log_dir
    return run.Config(nl.NeMoLogger, log_dir=str(out_dir), name="run", use_datetime_version=False, ckpt=ckpt,
                      tensorboard=tb)


def train_partial(r: RunConfig, out_dir: Path, source: Optional[str] = None, tokenizer_dir: Optional[str] = None,
           resume_from: Optional[str] = None) -> run.Partial:
    """The ``run.Partial(llm.train, ...)`` for this recipe (``source``: the dense checkpoint for online upcycling;
    the callbacks run the step-0 check on the data module's first validation windows). ``resume_from``: a checkpoint
    directory to resume instead of the newest (``run_dir.resume_checkpoint``: the newest one is damaged)."""
    model = run.Config(UpcycledLlamaModel, config=model_config(r, tokenizer_dir),
                       upcycle_from=source if r.upcycle.online else None)
    return run.Partial(llm.train, model=model, data=data_module(r, tokenizer_dir),
                       trainer=trainer(r, out_dir, source, tokenizer_dir),
                       log=logger(r, out_dir), optim=optimizer(r),
                       resume=run.Config(nl.AutoResume, resume_if_exists=True, resume_ignore_no_checkpoint=True,
                                         resume_from_path=resume_from),
                       tokenizer=None)
