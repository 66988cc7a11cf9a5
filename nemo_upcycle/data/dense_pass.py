"""The dense model on calibration tokens, one decoder layer at a time: what enters each MoE layer's router and MLP.

transformers' own layer does the math (``LlamaDecoderLayer`` / ``Qwen2DecoderLayer`` with the family's rotary
embedding: RoPE scaling, GQA, q/k/v biases and SDPA's causal attention as the HF model runs them), its weights read
from any dense source (``formats.base.DenseSource.get``) for one layer at a time, in fp32, and dropped before the
next: the pass holds one layer's weights and the hidden states of the calibration tokens ([N, D] fp32), never the
whole model. For each layer it yields the router's input (the pre-MLP RMSNorm output) and the layer's dense MLP; the
residual stream then goes through the whole layer as the model computes it.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from nemo_upcycle.formats.base import DenseSource
from nemo_upcycle.formats.keymap import EMBED


class LayerInput(NamedTuple):
    layer: int
    x: torch.Tensor  # [N, D] fp32: the router / MLP input of every calibration token, segments concatenated
    gate: torch.Tensor  # [F, D] fp32
    up: torch.Tensor  # [F, D]
    down: torch.Tensor  # [D, F]


def hf_modules(src: DenseSource):
    """transformers' (config, decoder layer class, rotary embedding class) of the source's family (Llama, or Qwen2
    with its q/k/v biases: ``formats.base.DENSE_FAMILIES``)."""
    if src.config.get("model_type") == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rope
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rope
    cfg = Config(**{k: v for k, v in src.config.items() if k not in ("architectures", "torch_dtype", "dtype")})
    cfg._attn_implementation = "sdpa"
    return cfg, Layer, Rope


def mlp_activation(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU intermediate units silu(gate x) * up x [N, F]: unit u's contribution is act[:, u] * down[:, u]."""
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


@torch.no_grad()
def layer_inputs(src: DenseSource, segments: Sequence[torch.Tensor], layers: Sequence[int],
                 progress: bool = True) -> Iterator[LayerInput]:
    """For each layer in ``layers`` (ascending), the MLP input of every token of ``segments`` (1-D id tensors, each
    its own causal sequence from position 0). Stops after the last layer asked for."""
    from tqdm.auto import tqdm

    cfg, DecoderLayer, RotaryEmbedding = hf_modules(src)
    wanted = sorted(set(layers))
    embed = src.get(EMBED.key()).float()
    hs = [embed[s.long()][None] for s in segments]  # [1, S, D] each
    del embed
    rope = RotaryEmbedding(cfg)
    last = wanted[-1] if wanted else -1
    seen: list = []  # the MLP inputs of the current layer, one [S, D] per segment
    for layer in tqdm(range(last + 1), desc="calibration pass", unit="layer", disable=not progress):
        with torch.device("meta"):
            block = DecoderLayer(cfg, layer)
        prefix = f"model.layers.{layer}."
        block.load_state_dict({k: src.get(prefix + k).float() for k in block.state_dict()}, assign=True)
        block.eval()
        seen.clear()
        hook = block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
        try:
            for i, h in enumerate(hs):
                pos = torch.arange(h.shape[1])[None]
                hs[i] = block(h, position_ids=pos, position_embeddings=rope(h, pos))
        finally:
            hook.remove()
        if layer in wanted:
            yield LayerInput(layer, torch.cat(seen), block.mlp.gate_proj.weight, block.mlp.up_proj.weight,
                             block.mlp.down_proj.weight)
        del block
