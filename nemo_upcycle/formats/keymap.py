"""The one HF <-> Megatron-core table: parameter names with their transforms, and the config fields.

Tensors: each ``Row`` pairs Megatron parameter names (the local spec first, then the Transformer Engine / grouped-GEMM
alternatives of ``megatron/core/models/gpt/gpt_layer_specs.py``) with the HF tensors they hold and a named transform:
``copy``, ``vocab`` (pad rows / cut them), ``qkv`` (q, k, v grouped per query group, as NeMo's
``TransformFns.merge_qkv``), ``glu`` ([gate; up], each half split per tensor-parallel rank), ``qkv_bias``; the
transforms themselves are ``formats.transforms``. Names have ``{layer}`` / ``{expert}`` slots. The HF side is HF Llama
/ Qwen2 for the dense model and HF Mixtral (``block_sparse_moe``) or Qwen2-MoE (``mlp.experts``, ``mlp.shared_expert``)
for the MoE (``KEYMAP``, ``QWEN2_MOE_KEYMAP``; the filler's ``FILL_KEYMAP`` holds every Megatron name once); a MoE
tensor says what the upcycling makes it from (``made_from``). Read by the online filler, the HF export, the NeMo
checkpoint reader, the format layouts and the dense readers' shape check: a new tensor is a new row.

Config: ``CONFIG_FIELDS`` pairs HF ``LlamaConfig`` keys with Megatron / NeMo config fields (also our ``model.*``
keys, except ``rope_scaling_factor``), with HF's defaults; every config translation reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from nemo_upcycle.formats.transforms import (  # noqa: F401 -- re-exported: the table's transforms live there
    TRANSFORMS,
    Sizes,
    glu_fc1,
    merge_qkv,
    shard,
    split_qkv,
)


# ---------------------------------------------------------------------------------------------- HF tensors
@dataclass(frozen=True)
class HFTensor:
    """An HF tensor name with slots; its shape in the symbols of ``tensor_dims``; for an MoE tensor, what the
    upcycling makes it from: ``router`` (a new router) or the expert's ``gate`` / ``up`` / ``down`` (core)."""

    name: str
    shape: tuple[str, ...]
    made_from: Optional[str] = None

    def key(self, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        return self.name.format(layer=layer, expert=expert)

    def shape_for(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[s] for s in self.shape)

    def recipe(self, layer: Optional[int] = None, expert: Optional[int] = None) -> tuple:
        """How an HF MoE writer (``formats.mixtral`` / ``formats.qwen2_moe``) makes this tensor: ``copy`` a dense key,
        a new ``router``, a ``shared`` expert's part, or a routed ``expert``'s part."""
        if self.made_from is None:
            return ("copy", self.key(layer))
        if self.made_from == "router":
            return ("router", layer)
        if self.made_from.startswith("shared_"):
            return ("shared", layer, self.made_from.removeprefix("shared_"))
        return ("expert", layer, expert, self.made_from)


_L = "model.layers.{layer}."
EMBED = HFTensor("model.embed_tokens.weight", ("V", "D"))
NORM = HFTensor("model.norm.weight", ("D",))
LM_HEAD = HFTensor("lm_head.weight", ("V", "D"))
INPUT_NORM = HFTensor(_L + "input_layernorm.weight", ("D",))
POST_ATTN_NORM = HFTensor(_L + "post_attention_layernorm.weight", ("D",))
Q_PROJ = HFTensor(_L + "self_attn.q_proj.weight", ("Q", "D"))
K_PROJ = HFTensor(_L + "self_attn.k_proj.weight", ("KV", "D"))
V_PROJ = HFTensor(_L + "self_attn.v_proj.weight", ("KV", "D"))
O_PROJ = HFTensor(_L + "self_attn.o_proj.weight", ("D", "Q"))
GATE = HFTensor(_L + "mlp.gate_proj.weight", ("F", "D"))
UP = HFTensor(_L + "mlp.up_proj.weight", ("F", "D"))
DOWN = HFTensor(_L + "mlp.down_proj.weight", ("D", "F"))
# HF Mixtral's sparse block (transformers modeling_mixtral.py): w1 = gate, w3 = up, w2 = down
ROUTER = HFTensor(_L + "block_sparse_moe.gate.weight", ("E", "D"), made_from="router")
W1 = HFTensor(_L + "block_sparse_moe.experts.{expert}.w1.weight", ("Fe", "D"), made_from="gate")
W2 = HFTensor(_L + "block_sparse_moe.experts.{expert}.w2.weight", ("D", "Fe"), made_from="down")
W3 = HFTensor(_L + "block_sparse_moe.experts.{expert}.w3.weight", ("Fe", "D"), made_from="up")

ATTENTION = (INPUT_NORM, POST_ATTN_NORM, Q_PROJ, K_PROJ, V_PROJ, O_PROJ)  # per layer, shared by the dense and MoE
DENSE_MLP = (GATE, UP, DOWN)
MIXTRAL_EXPERT = (W1, W2, W3)  # the order Mixtral files hold them in
# Qwen2 / Qwen2-MoE (transformers modeling_qwen2.py, modeling_qwen2_moe.py): q/k/v biases (``qkv_bias``); the sparse
# block ``mlp.gate`` (router), ``mlp.experts.{e}.{gate,up,down}_proj``, ``mlp.shared_expert.*`` (S x Fe = Fs units)
# and ``mlp.shared_expert_gate`` [1, D]; a layer in ``mlp_only_layers`` keeps the dense ``mlp.*_proj`` above.
Q_BIAS = HFTensor(_L + "self_attn.q_proj.bias", ("Q",))
K_BIAS = HFTensor(_L + "self_attn.k_proj.bias", ("KV",))
V_BIAS = HFTensor(_L + "self_attn.v_proj.bias", ("KV",))
QKV_BIAS = (Q_BIAS, K_BIAS, V_BIAS)
QWEN_ROUTER = HFTensor(_L + "mlp.gate.weight", ("E", "D"), made_from="router")
QWEN_GATE = HFTensor(_L + "mlp.experts.{expert}.gate_proj.weight", ("Fe", "D"), made_from="gate")
QWEN_UP = HFTensor(_L + "mlp.experts.{expert}.up_proj.weight", ("Fe", "D"), made_from="up")
QWEN_DOWN = HFTensor(_L + "mlp.experts.{expert}.down_proj.weight", ("D", "Fe"), made_from="down")
SHARED_GATE = HFTensor(_L + "mlp.shared_expert.gate_proj.weight", ("Fs", "D"), made_from="shared_gate")
SHARED_UP = HFTensor(_L + "mlp.shared_expert.up_proj.weight", ("Fs", "D"), made_from="shared_up")
SHARED_DOWN = HFTensor(_L + "mlp.shared_expert.down_proj.weight", ("D", "Fs"), made_from="shared_down")
SHARED_EXPERT_GATE = HFTensor(_L + "mlp.shared_expert_gate.weight", ("1", "D"), made_from="shared_expert_gate")
QWEN_EXPERT = (QWEN_GATE, QWEN_UP, QWEN_DOWN)
QWEN_SHARED = (SHARED_GATE, SHARED_UP, SHARED_DOWN, SHARED_EXPERT_GATE)


def tensor_dims(hf: dict, expert_ffn: Optional[int] = None, experts: Optional[int] = None,
                shared_ffn: int = 0) -> dict[str, int]:
    """The shape symbols of an HF Llama config: V vocab, D hidden, Q = heads x head_dim, KV = kv heads x head_dim,
    F intermediate, Fe an expert's intermediate, E experts, Fs the shared expert's intermediate."""
    v = hf_values(hf, rope=False)
    D, F = v["hidden_size"], v["ffn_hidden_size"]
    return {"V": v["vocab_size"], "D": D, "Q": v["num_attention_heads"] * v["kv_channels"],
            "KV": v["num_query_groups"] * v["kv_channels"], "F": F, "Fe": expert_ffn or F, "E": experts or 0,
            "Fs": shared_ffn, "1": 1}


def llama_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a dense HF Llama and its shape, from the config (lm_head only when not tied)."""
    dims = tensor_dims(hf)
    out = {t.key(): t.shape_for(dims) for t in (EMBED, NORM, LM_HEAD)}
    if hf.get("tie_word_embeddings", False):
        del out[LM_HEAD.key()]
    bias = QKV_BIAS if has_qkv_bias(hf) else ()
    for i in range(hf["num_hidden_layers"]):
        out.update({t.key(i): t.shape_for(dims) for t in ATTENTION + bias + DENSE_MLP})
    return out


def has_qkv_bias(hf: dict) -> bool:
    """Whether a dense HF config's attention has q/k/v biases: every Qwen2 / Qwen2.5 (transformers' Qwen2Attention
    has them unconditionally); a Llama with ``attention_bias`` (then o_proj has one too, which no MoE format holds)."""
    return hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias"))


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """Megatron parameter names (alternatives) <-> the HF tensors they hold, joined by ``transform``; ``dim``: the
    tensor- (``group="tp"``) or expert-tensor-parallel (``"etp"``) split, 0 column- / 1 row-parallel, None
    replicated; ``tied``: the HF tensor it holds when the embeddings are tied."""

    megatron: tuple[str, ...]
    hf: tuple[HFTensor, ...]
    transform: str = "copy"
    dim: Optional[int] = None
    group: str = "tp"
    tied: Optional[HFTensor] = None

    def to_megatron(self, parts, sizes: Sizes, rank: int = 0, size: int = 1) -> torch.Tensor:
        """The HF tensors -> this rank's shard of the Megatron tensor (a glu fc1 splits each half)."""
        if self.transform == "glu":
            return glu_fc1(*parts, rank, size)
        t = TRANSFORMS[self.transform][1](list(parts), sizes)
        return t if self.dim is None else shard(t, rank, size, self.dim)

    def to_hf(self, t: torch.Tensor, sizes: Sizes) -> tuple[torch.Tensor, ...]:
        """The whole Megatron tensor (one rank holds it all) -> the HF tensors, in ``hf`` order."""
        return tuple(TRANSFORMS[self.transform][2](t, sizes))


_M = "decoder.layers.{layer}."
_X = _M + "mlp.experts."
DENSE_ROWS = (
    Row(("embedding.word_embeddings.weight",), (EMBED,), "vocab", 0),
    Row((_M + "input_layernorm.weight", _M + "self_attention.linear_qkv.layer_norm_weight"), (INPUT_NORM,)),
    Row((_M + "self_attention.linear_qkv.weight",), (Q_PROJ, K_PROJ, V_PROJ), "qkv", 0),
    Row((_M + "self_attention.linear_proj.weight",), (O_PROJ,), dim=1),
    Row((_M + "pre_mlp_layernorm.weight", _M + "mlp.linear_fc1.layer_norm_weight"), (POST_ATTN_NORM,)),
    Row((_M + "mlp.linear_fc1.weight",), (GATE, UP), "glu", 0),  # a layer kept dense (moe_layer_freq)
    Row((_M + "mlp.linear_fc2.weight",), (DOWN,), dim=1),
    Row(("decoder.final_layernorm.weight",), (NORM,)),
    Row(("output_layer.weight",), (LM_HEAD,), "vocab", 0, tied=EMBED),
)
MIXTRAL_ROWS = (  # local experts, then TE grouped GEMM (TEGroupedMLP: linear_fc1.weight<e>)
    Row((_M + "mlp.router.weight",), (ROUTER,)),
    Row((_X + "local_experts.{expert}.linear_fc1.weight", _X + "linear_fc1.weight{expert}"), (W1, W3), "glu", 0, "etp"),
    Row((_X + "local_experts.{expert}.linear_fc2.weight", _X + "linear_fc2.weight{expert}"), (W2,), dim=1, group="etp"),
)

QKV_BIAS_ROWS = (Row((_M + "self_attention.linear_qkv.bias",), QKV_BIAS, "qkv_bias", 0),)  # add_qkv_bias
# Megatron's SharedExpertMLP (moe/shared_experts.py): a tensor-parallel MLP, ``gate_weight`` [1, D] replicated. HF
# Qwen2-MoE always gates the shared expert: an ungated Megatron shared expert is exported with a zero gate and down x 2
# (``formats.qwen2_moe.hf_shared_down``).
SHARED_ROWS = (
    Row((_M + "mlp.shared_experts.linear_fc1.weight",), (SHARED_GATE, SHARED_UP), "glu", 0),
    Row((_M + "mlp.shared_experts.linear_fc2.weight",), (SHARED_DOWN,), dim=1),
    Row((_M + "mlp.shared_experts.gate_weight",), (SHARED_EXPERT_GATE,)),
)
QWEN2_MOE_ROWS = (
    Row((_M + "mlp.router.weight",), (QWEN_ROUTER,)),
    Row((_X + "local_experts.{expert}.linear_fc1.weight", _X + "linear_fc1.weight{expert}"), (QWEN_GATE, QWEN_UP),
        "glu", 0, "etp"),
    Row((_X + "local_experts.{expert}.linear_fc2.weight", _X + "linear_fc2.weight{expert}"), (QWEN_DOWN,), dim=1,
        group="etp"),
) + SHARED_ROWS


@dataclass(frozen=True)
class Hit:
    """A concrete name found in the table: its row, the slot values, and (HF side) which of the row's tensors."""

    row: Row
    layer: Optional[int]
    expert: Optional[int]
    part: int = 0

    def megatron_names(self) -> list[str]:
        return [m.format(layer=self.layer, expert=self.expert) for m in self.row.megatron]


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(out)


def _slots(m: re.Match) -> tuple[Optional[int], Optional[int]]:
    d = m.groupdict()
    return tuple(int(d[k]) if d.get(k) is not None else None for k in ("layer", "expert"))


class KeyMap:
    """Rows, looked up by a concrete Megatron or HF name; refuses a table where a name has two rows."""

    def __init__(self, rows):
        self.rows = tuple(rows)
        self._megatron, self._hf, seen = [], [], set()
        for row in self.rows:
            n, _, _ = TRANSFORMS[row.transform]
            if len(row.hf) != n or row.group not in ("tp", "etp") or (row.transform == "glu" and row.dim != 0):
                raise ValueError(f"row {row.megatron[0]}: {row.transform} needs {n} HF tensors and dim 0 (glu)")
            for name in row.megatron + tuple(t.name for t in row.hf):
                if name in seen:
                    raise ValueError(f"{name} is in two rows of the key table")
                seen.add(name)
            self._megatron += [(_pattern(m), row) for m in row.megatron]
            self._hf += [(_pattern(t.name), row, i) for i, t in enumerate(row.hf)]

    def megatron(self, name: str) -> Hit:
        """The row of a Megatron parameter name (KeyError: none)."""
        for pat, row in self._megatron:
            m = pat.fullmatch(name)
            if m:
                return Hit(row, *_slots(m))
        raise KeyError(name)

    def hf(self, name: str) -> Hit:
        """The row of an HF tensor name and which of its tensors it is (KeyError: none)."""
        for pat, row, i in self._hf:
            m = pat.fullmatch(name)
            if m:
                return Hit(row, *_slots(m), part=i)
        raise KeyError(name)


KEYMAP = KeyMap(DENSE_ROWS + MIXTRAL_ROWS)
QWEN2_MOE_KEYMAP = KeyMap(DENSE_ROWS + QKV_BIAS_ROWS + QWEN2_MOE_ROWS)  # the same Megatron names, HF Qwen2-MoE's
FILL_KEYMAP = KeyMap(DENSE_ROWS + QKV_BIAS_ROWS + MIXTRAL_ROWS + SHARED_ROWS)  # every Megatron name the filler meets


# ---------------------------------------------------------------------------------------------- config fields
@dataclass(frozen=True)
class ConfigField:
    """``megatron``: the Megatron / NeMo config field, also the ``model.*`` key unless ``schema`` names another
    (``in_schema``: there is one); ``hf``: the HF LlamaConfig key (``rope``: a key of HF's ``rope_scaling``, type
    llama3); ``default``: HF's value when the key is absent; ``derived``: the value None / absent means, from the
    other fields (Megatron names)."""

    megatron: str
    hf: str
    default: Any = None
    derived: Optional[Callable[[dict], Any]] = None
    schema: Optional[str] = None
    in_schema: bool = True
    rope: bool = False
    cast: Optional[type] = None

    @property
    def schema_key(self) -> Optional[str]:
        return (self.schema or self.megatron) if self.in_schema else None


CONFIG_FIELDS = (
    ConfigField("num_layers", "num_hidden_layers"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("ffn_hidden_size", "intermediate_size"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("num_query_groups", "num_key_value_heads", derived=lambda v: v["num_attention_heads"]),
    ConfigField("kv_channels", "head_dim", derived=lambda v: v["hidden_size"] // v["num_attention_heads"]),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("seq_length", "max_position_embeddings", 2048),
    ConfigField("rotary_base", "rope_theta", 10000.0),
    ConfigField("layernorm_epsilon", "rms_norm_eps", 1e-6),
    ConfigField("share_embeddings_and_output_weights", "tie_word_embeddings", False, cast=bool),
    # Llama 3.1 RoPE scaling (NeMo's Llama31Config; HF rope_scaling with rope_type "llama3")
    ConfigField("scale_factor", "factor", None, schema="rope_scaling_factor", rope=True),
    ConfigField("low_freq_factor", "low_freq_factor", 1.0, in_schema=False, rope=True),
    ConfigField("high_freq_factor", "high_freq_factor", 4.0, in_schema=False, rope=True),
    ConfigField("old_context_len", "original_max_position_embeddings", 8192, in_schema=False, rope=True),
)
FIELDS = {f.megatron: f for f in CONFIG_FIELDS}
# the fields that fix the weights' shapes (the vocabulary aside: Megatron may pad it)
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "share_embeddings_and_output_weights")
HF_DEFAULTS = {f.hf: f.default for f in CONFIG_FIELDS if f.default is not None and not f.rope}


def _finish(values: dict, rope: bool) -> dict:
    for f in CONFIG_FIELDS:
        if f.rope and not rope:
            values.pop(f.megatron, None)
            continue
        if values.get(f.megatron) is None and f.derived is not None:
            values[f.megatron] = f.derived(values)
        if f.cast is not None and values.get(f.megatron) is not None:
            values[f.megatron] = f.cast(values[f.megatron])
    return values


def llama3_rope(hf: dict) -> Optional[dict]:
    """HF's rope_scaling when it is Llama 3.1's (type llama3), else None."""
    rope = hf.get("rope_scaling") or {}
    return rope if rope.get("rope_type", rope.get("type")) == "llama3" else None


def hf_values(hf: dict, rope: bool = True) -> dict:
    """An HF Llama config under Megatron field names, HF's defaults and the derived values filled in (the rope fields:
    None unless the RoPE scaling is Llama 3.1's); a required key that is absent is a KeyError."""
    scaling = llama3_rope(hf)
    values = {}
    for f in CONFIG_FIELDS:
        if f.rope:
            values[f.megatron] = None if scaling is None else scaling.get(f.hf, f.default)
        elif f.default is None and f.derived is None:
            values[f.megatron] = hf[f.hf]
        else:
            v = hf.get(f.hf)
            values[f.megatron] = f.default if v is None else v
    return _finish(values, rope)


def megatron_values(config, rope: bool = True) -> dict:
    """A Megatron / NeMo config (an object) under its own field names, None replaced by the derived values."""
    return _finish({f.megatron: getattr(config, f.megatron, None) for f in CONFIG_FIELDS}, rope)


def model_values(model, rope: bool = True) -> dict:
    """Our ``model.*`` group (the schema object or a dict of it) under Megatron field names."""
    get = model.get if isinstance(model, Mapping) else lambda k: getattr(model, k, None)
    return _finish({f.megatron: get(f.schema_key) if f.schema_key else None for f in CONFIG_FIELDS}, rope)


def hf_config(values: dict) -> dict:
    """Megatron-named values -> HF Llama config keys; a ``scale_factor`` adds Llama 3.1's ``rope_scaling``."""
    out = {f.hf: values[f.megatron] for f in CONFIG_FIELDS if not f.rope and f.megatron in values}
    if values.get("scale_factor"):
        out["rope_scaling"] = {"rope_type": "llama3", **{f.hf: values[f.megatron] for f in CONFIG_FIELDS if f.rope}}
    return out


def mismatches(ours: dict, theirs: dict, names) -> list[tuple[str, Any, Any]]:
    """(field, ours, theirs) of each named field whose values differ; floats within a relative 1e-6 agree (a GGUF
    stores eps and theta in float32)."""
    out = []
    for n in names:
        a, b = ours[n], theirs[n]
        close = isinstance(a, (int, float)) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6)
        if a != b and not close:
            out.append((n, a, b))
    return out
