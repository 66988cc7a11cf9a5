"""Validation of a composed recipe: ``validate(cfg)`` turns Hydra's DictConfig into a ``RunConfig`` and refuses, in
one line naming the key, what the schema's types cannot express: every number against its range (``RANGES``),
choices, keys that must agree with each other, the upcycling options (their rules live in the core) and the layout
rules that hold on any number of GPUs (they live in ``planning.layout``; ``check_layout`` runs all of them). The
rules of the layers below name fields (``errors.FieldError``); here they are rendered by recipe key (``KEYS``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nemo_upcycle.config.auto_model import FAMILIES, fill_model
from nemo_upcycle.config.schema import MODES, RunConfig
from nemo_upcycle.config.translate import OPTION_KEYS, model_dims, parallel_layout, training_setup, upcycle_options
from nemo_upcycle.errors import FieldError, UpcycleError
from nemo_upcycle.formats.hf_moe import FORMAT_CHOICES
from nemo_upcycle.planning.flops import GPUS
from nemo_upcycle.planning.layout import RECOMPUTE
from nemo_upcycle.planning.layout import check_layout as check_model_layout
from nemo_upcycle.system.machine import PRECISIONS, resolve_precision

# the recipe key of every field the planning layout rules name (ModelDims, ParallelLayout, TrainingSetup), and of
# every UpcycleOptions field: how a refusal from below reads in a recipe user's words
LAYOUT_KEYS = {
    **{f: f"model.{f}" for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                                 "num_query_groups", "kv_channels", "share_embeddings_and_output_weights")},
    **{f: f"moe.{f}" for f in ("num_moe_experts", "moe_router_topk", "moe_layer_freq", "moe_expert_capacity_factor")},
    **{f: f"parallel.{f}" for f in ("num_nodes", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                                    "virtual_pipeline_model_parallel_size", "context_parallel_size",
                                    "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel")},
    "gpus_per_node": "parallel.devices", "seq_length": "data.seq_length", "micro_batch_size": "data.micro_batch_size",
    "global_batch_size": "data.global_batch_size", "recompute": "trainer.recompute"}
KEYS = {**LAYOUT_KEYS, **OPTION_KEYS}


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise UpcycleError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")


SEED = "[0, 4294967296)"  # numpy's RandomState (Megatron's data order) takes 32-bit seeds
RANGES = {  # every numeric key: its interval ("[a, b)": a <= x < b; inf: unbounded); None values are not checked
    "seed": SEED,
    "model.num_layers": ">=1", "model.hidden_size": ">=1", "model.ffn_hidden_size": ">=1",
    "model.num_attention_heads": ">=1", "model.num_query_groups": ">=1", "model.kv_channels": ">=1",
    "model.vocab_size": ">=1", "model.seq_length": ">=1", "model.rotary_base": ">0", "model.layernorm_epsilon": ">0",
    "model.rope_scaling_factor": ">0",
    "moe.num_moe_experts": ">=1", "moe.moe_router_topk": ">=1", "moe.moe_expert_capacity_factor": ">0",
    "moe.moe_aux_loss_coeff": ">=0", "moe.moe_z_loss_coeff": ">=0", "moe.moe_layer_freq": ">=1",
    "moe.moe_shared_expert_intermediate_size": ">=1", "moe.moe_router_bias_update_rate": ">=0",
    "moe.moe_router_topk_scaling_factor": ">0", "moe.moe_router_num_groups": ">=1", "moe.moe_router_group_topk": ">=1",
    "upcycle.granularity": ">=1", "upcycle.router_std": ">=0", "upcycle.noise_std": ">=0",
    "upcycle.drop_ratio": "[0, 1]", "upcycle.seed": SEED, "upcycle.calibration_tokens": ">=256",
    "parallel.tensor_model_parallel_size": ">=1", "parallel.pipeline_model_parallel_size": ">=1",
    "parallel.virtual_pipeline_model_parallel_size": ">=1", "parallel.context_parallel_size": ">=1",
    "parallel.expert_model_parallel_size": ">=1", "parallel.expert_tensor_parallel_size": ">=1",
    "parallel.num_nodes": ">=1", "parallel.devices": ">=1",
    "data.seq_length": ">=1", "data.micro_batch_size": ">=1", "data.global_batch_size": ">=1",
    "data.validation_fraction": "(0, 1)", "data.seed": SEED,
    "optim.lr": ">0", "optim.min_lr": ">=0", "optim.warmup_steps": ">=0", "optim.weight_decay": ">=0",
    "optim.adam_beta1": "[0, 1)", "optim.adam_beta2": "[0, 1)", "optim.clip_grad": ">=0",
    "trainer.max_steps": ">=1", "trainer.val_check_interval": ">=1", "trainer.limit_val_batches": ">=0",
    "trainer.log_every_n_steps": ">=1", "trainer.checkpoint_every_n_steps": ">=0", "trainer.eval_windows": ">=0",
    "logging.eval_limit": ">=1",
}


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    """">=1" / ">0" / "[0, 1)" -> (low, high, low inclusive, high inclusive)."""
    if spec.startswith(">="):
        return float(spec[2:]), math.inf, True, False
    if spec.startswith(">"):
        return float(spec[1:]), math.inf, False, False
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return lo, hi, spec[0] == "[", spec[-1] == "]"


def numeric_fields(run: "RunConfig"):
    """(dotted key, value) of every number in the run (bools excluded), group by group."""
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                v = getattr(value, g.name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{f.name}.{g.name}", v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f.name, value


def check_numbers(run: "RunConfig") -> None:
    """NaN / inf in any float key, then each number against its key's range (``RANGES``), refused by key name."""
    for key, v in numeric_fields(run):
        if isinstance(v, float) and not math.isfinite(v):
            raise UpcycleError(f"{key}={v} is not a finite number; set {key} to a real value.")
    for key, v in numeric_fields(run):
        lo, hi, lo_in, hi_in = _interval(RANGES[key])
        if (v < lo or (v == lo and not lo_in)) or (v > hi or (v == hi and not hi_in)):
            raise UpcycleError(f"{key}={v} is out of range; {key} must be {_describe(RANGES[key])}.")


def _describe(spec: str) -> str:
    if spec.startswith(">"):
        return {">=1": ">= 1", ">=0": ">= 0", ">0": "> 0"}.get(spec, spec)
    lo, hi, lo_in, hi_in = _interval(spec)
    if hi == 4294967296:
        return "between 0 and 2**32 - 1"
    return f"{'>=' if lo_in else '>'} {lo:g} and {'<=' if hi_in else '<'} {hi:g}"


def check_relations(run: "RunConfig") -> None:
    """What the ranges of single keys cannot say: keys that must agree with each other (batch sizes against the
    parallel sizes: ``planning.layout``)."""
    m, d, o = run.model, run.data, run.optim
    if o.min_lr > o.lr:
        raise UpcycleError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}; the cosine schedule decays from lr to "
                           "min_lr: set optim.min_lr <= optim.lr.")
    if m.num_attention_heads % m.num_query_groups:
        raise UpcycleError(f"model.num_query_groups={m.num_query_groups} does not divide model.num_attention_heads="
                           f"{m.num_attention_heads}; each key/value head serves a whole number of query heads.")
    up = run.upcycle
    if run.moe.num_moe_experts is not None:
        opts = upcycle_options(run)
        what = (f"upcycle.expert_split={up.expert_split}" if opts.expert_split in ("importance", "clustering")
                else f"upcycle.router_init={opts.router_init_resolved}")
        if up.calibration is None and d.kind == "mock" and opts.needs_calibration:
            raise UpcycleError(f"{what} needs calibration text and data=mock has none; set upcycle.calibration=FILE "
                               "or use a text corpus (data=shakespeare).")
        if opts.router_init_resolved == "hidden" and up.router_prompts is None:
            raise UpcycleError("upcycle.router_init=hidden needs upcycle.router_prompts=DIR: a directory of prompt "
                               f"files, one per copy ({opts.copies}).")
    if d.seq_length > m.seq_length:
        raise UpcycleError(f"data.seq_length={d.seq_length} is above the model's maximum positions model.seq_length="
                           f"{m.seq_length} (max_position_embeddings; RoPE extension is not done here); lower "
                           f"data.seq_length to at most {m.seq_length}.")


HF_ROUTING_KNOBS = ("moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "moe_router_num_groups")


def check_hf_routing(run: RunConfig) -> None:
    """Knobs no HF MoE format expresses (``engine.export_files.check_config_exportable`` refuses them at export) are
    refused up front when the run ends in an HF export (``logging.export_hf``) or converts to HF (mode=verify)."""
    moe = run.moe
    on = [k for k in HF_ROUTING_KNOBS if getattr(moe, k) not in (None, False)]
    if on and (run.logging.export_hf or run.mode == "verify"):
        where = "mode=verify converts" if run.mode == "verify" else "logging.export_hf=true exports"
        raise UpcycleError(f"moe.{on[0]} is set and {where} to HF, whose MoE formats cannot express it; set "
                           "logging.export_hf=false (mode=train), or drop the knob.")


def validate(cfg) -> RunConfig:
    """DictConfig -> RunConfig, refusing in one line (naming the key) what the types cannot express."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    fill_model(cfg)  # model=auto: the sizes from the source's own config, before interpolations resolve
    try:
        run: RunConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        msg = e.msg if hasattr(e, "msg") else e
        raise UpcycleError(f"bad config: {msg} (key {getattr(e, 'full_key', '?')}).") from None
    _one_of("mode", run.mode, MODES)
    check_numbers(run)
    m, moe, par = run.model, run.moe, run.parallel
    _one_of("model.family", m.family, FAMILIES)
    _one_of("parallel.accelerator", par.accelerator, ("gpu", "cpu"))
    _one_of("trainer.precision", run.trainer.precision, PRECISIONS)
    run.trainer.precision, run.trainer.precision_reason = resolve_precision(run.trainer.precision, par.accelerator)
    _one_of("trainer.recompute", run.trainer.recompute, RECOMPUTE)
    _one_of("data.kind", run.data.kind, ("shakespeare", "files", "mock"))
    _one_of("moe.moe_router_load_balancing_type", moe.moe_router_load_balancing_type,
            ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    _one_of("moe.moe_token_dispatcher_type", moe.moe_token_dispatcher_type, ("allgather", "alltoall", "flex"))
    _one_of("parallel.gpu", par.gpu, tuple(GPUS))
    _one_of("logging.export_format", run.logging.export_format, FORMAT_CHOICES)
    if moe.num_moe_experts is None and run.mode == "verify":  # dense continuation: nothing to upcycle
        raise UpcycleError("mode=verify checks an upcycled MoE against the dense model; moe=dense has no experts.")
    try:
        if moe.num_moe_experts is not None:
            upcycle_options(run).validate(ffn_hidden_size=m.ffn_hidden_size, num_layers=m.num_layers)
            check_hf_routing(run)
        check_relations(run)
        check_model_layout(model_dims(run), parallel_layout(run))
    except FieldError as e:
        raise e.named(KEYS) from None
    return run


def check_layout(run: RunConfig) -> list[str]:
    """Every layout rule (``planning.layout``) on the recipe, refused by recipe key; returns the warnings."""
    try:
        return check_model_layout(model_dims(run), parallel_layout(run), training_setup(run))
    except FieldError as e:
        raise e.named(KEYS) from None
