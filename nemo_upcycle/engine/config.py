"""NeMo 2 config dataclasses for upcycled Llama 3 MoEs.

``UpcycledLlamaConfig`` (Llama 3) and ``UpcycledLlama31Config`` (Llama 3.1 rope scaling) extend NeMo's
``Llama3Config`` / ``Llama31Config`` with the MoE fields under their Megatron-core names and the core's upcycling
fields (prefixed ``upcycle_``); ``from_dense(hf_config)`` sizes one like any dense HF Llama. Defaults differ from
Megatron's where Megatron's would mislead an upcycling run: ``moe_aux_loss_coeff`` is 1e-2 (Megatron's 0 is no load
balancing at all; 1e-2 is Switch Transformer's, Fedus et al., arXiv 2101.03961), the dispatcher is alltoall (NeMo's
Mixtral default), and ``moe_ffn_hidden_size`` follows from the granularity. A padded vocabulary (``vocab_size`` above
``unpadded_vocab_size``) has its padding logits masked, so padding never changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Union

from nemo.collections.llm.gpt.model.llama import Llama3Config, Llama31Config

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.shared import shared_from_size
from nemo_upcycle.engine.spec import moe_layer_spec, reduce_expert_grads_over_expert_groups, te_importable
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import FIELDS, has_qkv_bias, hf_values


def padding_logits_masked(vocab: int, padded: int):
    """A forward hook for the output layer (a ``ColumnParallelLinear``): the logits of ids >= ``vocab`` become -inf,
    in place, on the tensor-parallel rank that holds them. Megatron's vocab-parallel cross entropy would otherwise
    count the padding's zero logits in the softmax (megatron/core/tensor_parallel/cross_entropy.py); masked, they
    take no probability and get no gradient, so the padding rows stay zero and the loss is the unpadded model's."""
    from megatron.core import parallel_state as ps

    per_rank = padded // ps.get_tensor_model_parallel_world_size()
    local_start = vocab - ps.get_tensor_model_parallel_rank() * per_rank  # first padded column of this rank's slice

    def hook(module, args, output):
        logits = output[0]
        start = vocab if logits.shape[-1] == padded else local_start  # gathered (inference) or this rank's slice
        if start < logits.shape[-1]:
            logits[..., max(start, 0):] = float("-inf")
        return output

    return hook


@dataclass
class MoEUpcycleFields:
    """The MoE and upcycling fields shared by every upcycled config (mixed in before a NeMo Llama config)."""

    num_moe_experts: Optional[int] = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size // upcycle_granularity
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "softmax"
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    moe_aux_loss_coeff: Union[float, List[float]] = 1e-2
    moe_z_loss_coeff: Optional[float] = None
    moe_router_load_balancing_type: Union[str, List[str]] = "aux_loss"
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    moe_layer_freq: Union[int, List[int]] = 1
    moe_shared_expert_gate: bool = False  # Megatron's sigmoid shared-expert gate (engine.spec sets it in the spec)
    export_format: str = "auto"  # the HF export: auto | mixtral | qwen2_moe (formats.hf_moe; logging.export_format)
    # upcycling (nemo_upcycle.core.UpcycleOptions)
    upcycle_granularity: int = 1
    upcycle_scaling: str = "exact"
    upcycle_router_init: Optional[str] = None
    upcycle_router_std: float = 0.02
    upcycle_noise_std: float = 0.0
    upcycle_drop_ratio: float = 0.0
    upcycle_seed: int = 1234
    # experts and routers from data (issue 15): the split (core.split) and the calibration inputs (data.calibration)
    upcycle_expert_split: str = "contiguous"
    upcycle_calibration: Optional[List[str]] = None  # text / jsonl files; their first N tokens
    upcycle_calibration_tokens: int = 4096
    upcycle_router_prompts: Optional[str] = None  # router_init=hidden: a directory of prompt files, one per copy
    upcycle_calibration_tokenizer: Optional[str] = None  # default: the dense source's own tokenizer
    upcycle_expert_sources: Optional[List[str]] = None  # several dense sources: copy i from source i mod n
    upcycle_non_expert: str = "base"  # attention, norms, embeddings: "base" or the sources' "average"
    # which layer spec: "auto" (TE + grouped GEMM where TE imports and CUDA is there), "te" or "local"
    spec_backend: str = "auto"
    # the local spec's experts: "auto" / "batched" (engine.experts.BatchedMLP), "sequential" (Megatron's)
    expert_backend: str = "auto"
    transformer_layer_spec: Union[object, Callable] = moe_layer_spec
    # the vocabulary before padding when ``vocab_size`` is padded (NeMo pads to make_vocab_size_divisible_by x TP:
    # ``engine.partial`` does it for the recipes): the logits of the padding rows are -inf, so the padded model is
    # the unpadded one at any TP (loss, gradients, export); None: ``vocab_size`` is all real tokens
    unpadded_vocab_size: Optional[int] = None

    def __post_init__(self):
        G = self.upcycle_granularity
        if self.moe_ffn_hidden_size is None and self.num_moe_experts:
            if G < 1 or self.ffn_hidden_size % G:
                raise UpcycleError(f"upcycle_granularity {G} does not divide ffn_hidden_size {self.ffn_hidden_size}; "
                                   "choose a divisor.")
            self.moe_ffn_hidden_size = self.ffn_hidden_size // G
        if (self.num_moe_experts and self.moe_router_topk == 1 and self.moe_router_score_function == "softmax"
                and not self.moe_router_pre_softmax):
            raise UpcycleError("moe_router_topk=1 needs moe_router_pre_softmax=true in Megatron-core "
                               "(a softmax over one score has zero gradient); "
                               "set it, knowing the step-0 output is then scaled by the top probability.")
        if self.apply_rope_fusion and not te_importable():
            self.apply_rope_fusion = False  # the fused RoPE kernel lives in Transformer Engine (ValueError without it)
        super().__post_init__()

    def configure_model(self, tokenizer=None, pre_process=None, post_process=None, vp_stage=None):
        """NeMo's model; expert gradients reduced over the expert groups (``spec``); the logits of the vocabulary
        padding masked (``unpadded_vocab_size``)."""
        model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        reduce_expert_grads_over_expert_groups(model, self)
        V = self.unpadded_vocab_size
        if V is not None and V < self.vocab_size and getattr(model, "output_layer", None) is not None:
            model.output_layer.register_forward_hook(padding_logits_masked(V, self.vocab_size))
        return model

    def upcycle_options(self) -> UpcycleOptions:
        """The core's options; validated against the dense sizes."""
        n = self.num_layers
        freq = self.moe_layer_freq
        layers = ((f"every:{freq}" if freq != 1 else "all") if isinstance(freq, int)
                  else [i for i, m in enumerate(freq) if m])
        return UpcycleOptions(
            num_moe_experts=self.num_moe_experts, moe_router_topk=self.moe_router_topk,
            granularity=self.upcycle_granularity, scaling=self.upcycle_scaling, router_init=self.upcycle_router_init,
            router_std=self.upcycle_router_std, noise_std=self.upcycle_noise_std, drop_ratio=self.upcycle_drop_ratio,
            moe_layers=layers, seed=self.upcycle_seed, moe_router_score_function=self.moe_router_score_function,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_expert_capacity_factor=self.moe_expert_capacity_factor,
            moe_token_drop_policy=self.moe_token_drop_policy,
            moe_pad_expert_input_to_capacity=self.moe_pad_expert_input_to_capacity,
            moe_aux_loss_coeff=self.moe_aux_loss_coeff if isinstance(self.moe_aux_loss_coeff, float) else 0.0,
            shared_experts=shared_from_size(self.moe_shared_expert_intermediate_size, self.ffn_hidden_size,
                                            self.upcycle_granularity),
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_router_num_groups=self.moe_router_num_groups, moe_router_group_topk=self.moe_router_group_topk,
            moe_router_dtype=self.moe_router_dtype,
            expert_split=self.upcycle_expert_split, expert_sources=tuple(self.upcycle_expert_sources or ()),
            non_expert=self.upcycle_non_expert,
        ).validate(ffn_hidden_size=self.ffn_hidden_size, num_layers=n)


@dataclass
class UpcycledLlamaConfig(MoEUpcycleFields, Llama3Config):
    """Llama 3 architecture, any size (set the sizes, or use ``from_dense``)."""

    @classmethod
    def from_dense(cls, hf: dict, **overrides) -> "UpcycledLlamaConfig":
        """Sizes from a dense HF Llama config dict (the key table's config fields); Llama 3.1 rope scaling picks
        the 3.1 variant."""
        values = hf_values(hf)
        sizes = {k: v for k, v in values.items() if not FIELDS[k].rope}
        sizes["seq_length"] = min(sizes["seq_length"], 8192)
        if has_qkv_bias(hf):  # Qwen2 / Qwen2.5: q/k/v biases (Megatron add_qkv_bias, as NeMo's Qwen2Config)
            sizes["add_qkv_bias"] = True
        rope = hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type"))
        target = cls
        if kind == "llama3":
            if values["scale_factor"] is None:
                raise UpcycleError("rope_scaling of type llama3 has no factor; fix the dense model's config.json.")
            target = UpcycledLlama31Config
            sizes.update({k: v for k, v in values.items() if FIELDS[k].rope})
        elif kind not in (None, "default"):
            raise UpcycleError(f"rope_scaling type {kind!r} is not supported by the NeMo Llama configs; "
                               "use a Llama 3 / 3.1 checkpoint.")
        names = {f.name for f in fields(target)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise UpcycleError(f"unknown config field(s) {', '.join(unknown)}; "
                               "see nemo_upcycle/engine/config.py for the names.")
        return target(**{**sizes, **overrides})


@dataclass
class UpcycledLlama31Config(MoEUpcycleFields, Llama31Config):
    """Llama 3.1 (rope scaling type llama3)."""
