"""Every translation of a validated ``RunConfig`` into what the layers below it take, in one place: the planning
dimensions and layout, the core's ``UpcycleOptions``, the dense model as an HF config, FLOPs and peaks of the run,
and its corpus files. Nothing here reads weights or imports NeMo.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.formats.keymap import hf_config, model_values
from nemo_upcycle.planning.plan import GPUS, ModelDims, ParallelLayout, TrainingSetup, flops_per_token


def model_dims(run: RunConfig) -> ModelDims:
    moe, sizes = run.moe, model_values(run.model)
    shapes = {f.name: sizes[f.name] for f in fields(ModelDims) if f.name in sizes}
    return ModelDims(**shapes, num_moe_experts=moe.num_moe_experts, moe_router_topk=moe.moe_router_topk,
                     moe_ffn_hidden_size=run.model.ffn_hidden_size // run.upcycle.granularity,
                     moe_layer_freq=moe.moe_layer_freq, moe_expert_capacity_factor=moe.moe_expert_capacity_factor)


def parallel_layout(run: RunConfig) -> ParallelLayout:
    p = run.parallel
    return ParallelLayout(num_nodes=p.num_nodes, gpus_per_node=p.devices,
                          tensor_model_parallel_size=p.tensor_model_parallel_size,
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                          virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                          context_parallel_size=p.context_parallel_size,
                          expert_model_parallel_size=p.expert_model_parallel_size,
                          expert_tensor_parallel_size=p.expert_tensor_parallel_size, sequence_parallel=p.sequence_parallel)


def training_setup(run: RunConfig) -> TrainingSetup:
    return TrainingSetup(seq_length=run.data.seq_length, micro_batch_size=run.data.micro_batch_size,
                         global_batch_size=run.data.global_batch_size, recompute=run.trainer.recompute,
                         bf16=run.trainer.precision.startswith("bf16"),
                         use_distributed_optimizer=run.optim.use_distributed_optimizer,
                         flash_attention=run.parallel.accelerator == "gpu")


def upcycle_options(run: RunConfig):
    """The core's ``UpcycleOptions`` for this recipe (not yet validated against the dense sizes)."""
    moe, up = run.moe, run.upcycle
    layers = "all" if moe.moe_layer_freq == 1 else f"every:{moe.moe_layer_freq}"
    return UpcycleOptions(moe.num_moe_experts, moe.moe_router_topk, granularity=up.granularity, scaling=up.scaling,
                          router_init=up.router_init, router_std=up.router_std, noise_std=up.noise_std,
                          drop_ratio=up.drop_ratio, moe_layers=layers, seed=up.seed,
                          moe_router_score_function=moe.moe_router_score_function,
                          moe_router_pre_softmax=moe.moe_router_pre_softmax,
                          moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
                          moe_token_drop_policy=moe.moe_token_drop_policy,
                          moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
                          moe_aux_loss_coeff=moe.moe_aux_loss_coeff)


def hf_llama_config(run: RunConfig) -> dict:
    """The dense model as an HF Llama config dict (for the meta-device build and the key layout, which RoPE scaling
    does not change: it is left out)."""
    return {"model_type": "llama", **hf_config(model_values(run.model, rope=False))}


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
        gpu = GPUS[run.parallel.gpu]
        return gpu.peak_bf16_flops, f"{gpu.name} bf16 dense"
    return None, None


def corpus_paths(run: RunConfig) -> list[str]:
    """The corpus files of a recipe: the Shakespeare texts, or ``data.paths`` (mock data: none)."""
    if run.data.kind == "mock":
        return []
    if run.data.kind == "shakespeare":
        from nemo_upcycle.data.resources import shakespeare_texts

        return [str(p) for p in shakespeare_texts()]
    return list(run.data.paths)
