"""Every translation of a validated ``RunConfig`` into what the layers below it take, in one place: the planning
dimensions and layout, the core's ``UpcycleOptions``, the dense model as an HF config, FLOPs and peaks of the run,
and its corpus files. Nothing here reads weights or imports NeMo.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.core.options import UpcycleOptions, moe_layers_of
from nemo_upcycle.core.shared import shared_from_size
from nemo_upcycle.data.resources import shakespeare_texts
from nemo_upcycle.formats.keymap import hf_config, model_values
from nemo_upcycle.planning.flops import GPUS, flops_per_token, table_peak
from nemo_upcycle.planning.layout import ModelDims, ParallelLayout, TrainingSetup


def model_dims(run: RunConfig) -> ModelDims:
    moe, sizes = run.moe, model_values(run.model)
    shapes = {f.name: sizes[f.name] for f in fields(ModelDims) if f.name in sizes}
    return ModelDims(**shapes, num_moe_experts=moe.num_moe_experts, moe_router_topk=moe.moe_router_topk,
                     moe_ffn_hidden_size=run.model.ffn_hidden_size // run.upcycle.granularity,
                     moe_layer_freq=moe.moe_layer_freq, moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
                     moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size)


def parallel_layout(run: RunConfig) -> ParallelLayout:
    p = run.parallel
    return ParallelLayout(num_nodes=p.num_nodes, gpus_per_node=p.devices,
                          tensor_model_parallel_size=p.tensor_model_parallel_size,
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                          virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                          context_parallel_size=p.context_parallel_size,
                          expert_model_parallel_size=p.expert_model_parallel_size,
                          expert_tensor_parallel_size=p.expert_tensor_parallel_size,
                          sequence_parallel=p.sequence_parallel)


def training_setup(run: RunConfig) -> TrainingSetup:
    return TrainingSetup(seq_length=run.data.seq_length, micro_batch_size=run.data.micro_batch_size,
                         global_batch_size=run.data.global_batch_size, recompute=run.trainer.recompute,
                         bf16=run.trainer.precision.startswith("bf16"),
                         use_distributed_optimizer=run.optim.use_distributed_optimizer,
                         flash_attention=run.parallel.accelerator == "gpu")


# the recipe key of every UpcycleOptions field a recipe sets: the options are built from it, and the core's errors name
# their fields by it (``moe.moe_router_topk=9``); moe_layers is Megatron's moe_layer_freq (``core.moe_layers_of``)
OPTION_KEYS = {"num_moe_experts": "moe.num_moe_experts", "moe_router_topk": "moe.moe_router_topk",
               "granularity": "upcycle.granularity", "scaling": "upcycle.scaling", "router_init": "upcycle.router_init",
               "router_std": "upcycle.router_std", "noise_std": "upcycle.noise_std", "drop_ratio": "upcycle.drop_ratio",
               "moe_layers": "moe.moe_layer_freq", "seed": "upcycle.seed",
               "moe_router_score_function": "moe.moe_router_score_function",
               "moe_router_pre_softmax": "moe.moe_router_pre_softmax",
               "moe_expert_capacity_factor": "moe.moe_expert_capacity_factor",
               "moe_token_drop_policy": "moe.moe_token_drop_policy",
               "moe_pad_expert_input_to_capacity": "moe.moe_pad_expert_input_to_capacity",
               "moe_aux_loss_coeff": "moe.moe_aux_loss_coeff", "expert_split": "upcycle.expert_split",
               "expert_sources": "model.expert_sources", "non_expert": "model.non_expert",
               "shared_experts": "moe.moe_shared_expert_intermediate_size",
               "moe_shared_expert_gate": "moe.moe_shared_expert_gate",
               **{k: f"moe.{k}" for k in ("moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
                                          "moe_router_num_groups", "moe_router_group_topk", "moe_router_dtype")}}


def key_value(run: RunConfig, key: str):
    """The value of a dotted recipe key (``moe.moe_router_topk``) in a ``RunConfig``."""
    group, _, name = key.rpartition(".")
    return getattr(getattr(run, group) if group else run, name)


def upcycle_options(run: RunConfig) -> UpcycleOptions:
    """The core's ``UpcycleOptions`` for this recipe (``OPTION_KEYS``; not yet validated against the dense sizes)."""
    values = {f: key_value(run, key) for f, key in OPTION_KEYS.items()}
    shared = shared_from_size(values["shared_experts"], run.model.ffn_hidden_size, run.upcycle.granularity)
    return UpcycleOptions(**{**values, "moe_layers": moe_layers_of(values["moe_layers"]), "shared_experts": shared,
                             "expert_sources": tuple(values["expert_sources"])})


def hf_llama_config(run: RunConfig) -> dict:
    """The dense model as an HF Llama config dict (for the meta-device build and the key layout, which RoPE scaling
    does not change: it is left out)."""
    family = "qwen2" if run.model.add_qkv_bias else "llama"  # Qwen2: q/k/v biases (keymap.has_qkv_bias)
    return {"model_type": family, **hf_config(model_values(run.model, rope=False))}


def flops_for_run(run) -> float:
    """FLOPs per token of the model a validated ``RunConfig`` trains: its dims, sequence length and vocab as
    given. The recipe presets ``vocab_size``, and NeMo 2.7.3 pads only a vocab it takes from the tokenizer
    (``GPTConfig.configure_model``, nemo/collections/llm/gpt/model/base.py), so the logits layer has exactly
    ``model.vocab_size`` rows (tested with torch's FlopCounterMode). ``plan`` pads for TP as a tokenizer-sized vocab
    would be."""
    return flops_per_token(model_dims(run), run.data.seq_length)


def peak_for_run(run) -> tuple[Optional[float], Optional[str]]:
    """(peak FLOP/s per device, its name) for a GPU recipe (``parallel.gpu`` in ``plan.GPUS``); (None, None) on
    CPU, where the training process measures its own (:func:`device_peak`)."""
    if run.parallel.accelerator == "gpu" and run.parallel.gpu in GPUS:
        return table_peak(GPUS[run.parallel.gpu], run.trainer.precision)  # the precision's peak (fp32: no TF32)
    return None, None


def corpus_paths(run: RunConfig) -> list[str]:
    """The corpus files of a recipe: the Shakespeare texts, or ``data.paths`` (mock data: none)."""
    if run.data.kind == "mock":
        return []
    if run.data.kind == "shakespeare":

        return [str(p) for p in shakespeare_texts()]
    return list(run.data.paths)


def calibration_spec(run: RunConfig):
    """The calibration inputs of a recipe (``data.calibration``): ``upcycle.calibration``, else the training corpus
    (its first ``upcycle.calibration_tokens`` tokens); the prompts of a hidden router; the data's tokenizer."""
    from pathlib import Path

    from nemo_upcycle.data.calibration import CalibrationSpec

    up = run.upcycle
    files = [up.calibration] if up.calibration is not None else corpus_paths(run)
    return CalibrationSpec(files=[Path(f) for f in files], max_tokens=up.calibration_tokens,
                           prompts=None if up.router_prompts is None else Path(up.router_prompts),
                           tokenizer=None if run.data.tokenizer is None else Path(run.data.tokenizer),
                           flag="upcycle.calibration" if up.calibration is not None else "data.paths (the corpus)",
                           prompts_flag="upcycle.router_prompts", tokens_flag="upcycle.calibration_tokens")
