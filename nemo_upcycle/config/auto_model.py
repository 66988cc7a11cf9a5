"""``model=auto``: the model group read from the dense source's own config, so that any supported dense checkpoint
(Llama 3 / 3.1 / 3.2, SmolLM2, Qwen2 / Qwen2.5; an HF directory or a GGUF) trains without a model YAML.

``fill_model(run)`` opens ``model.source`` (headers and config only: ``formats.base.open_dense``, which refuses another
family, an MoE, sliding-window attention), writes every ``model.*`` size the key table names
(``formats.keymap.CONFIG_FIELDS``), ``add_qkv_bias`` (Qwen2's q/k/v biases) and the family it detected
(``model.family``; ``model.name`` = ``auto:<family>``). A RoPE scaling other than Llama 3.1's is refused (NeMo's Llama
configs hold no other).
"""

from __future__ import annotations

from pathlib import Path

from nemo_upcycle.data.resources import smollm2_gguf
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import open_dense
from nemo_upcycle.formats.keymap import CONFIG_FIELDS, has_qkv_bias, hf_values, llama3_rope

AUTO = "auto"
FAMILIES = ("llama3", "llama3_1", "llama3_2", "smollm2", "tiny", "qwen2")


def detect_family(hf: dict) -> str:
    """qwen2 (q/k/v biases), llama3_1 (Llama 3.1 RoPE scaling) or llama3."""
    if hf.get("model_type") == "qwen2":
        return "qwen2"
    return "llama3_1" if llama3_rope(hf) else "llama3"


def fill_model(cfg) -> None:
    """Fill the composed (DictConfig) ``model`` group from its source when ``model.family`` is auto, in place and
    before interpolations (``${model.ffn_hidden_size}``) are resolved; see the module docstring."""
    from omegaconf import OmegaConf

    m = cfg.get("model") if hasattr(cfg, "get") else None
    if m is None or m.get("family") != AUTO:
        return
    source = None if OmegaConf.is_missing(m, "source") else m.get("source")
    if source in (None, "", "tiny"):
        raise UpcycleError(f"model=auto reads the sizes from model.source, which is {source!r}; set "
                           "model.source=PATH (a dense HF directory or .gguf) or model.source=smollm2.")
    path = smollm2_gguf() if source == "smollm2" else Path(str(source)).expanduser()
    src = open_dense(path)
    hf = src.config
    rope = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default", "llama3"):
        raise UpcycleError(f"{path} uses rope_scaling type {kind!r}; the NeMo Llama configs hold only Llama 3.1's "
                           "(llama3): remove rope_scaling from its config.json or pick another checkpoint.")
    values = hf_values(hf)
    for f in CONFIG_FIELDS:
        if f.schema_key:
            m[f.schema_key] = values[f.megatron]
    m.add_qkv_bias = has_qkv_bias(hf)
    m.family = detect_family(hf)
    m.name = f"{AUTO}:{m.family}"
