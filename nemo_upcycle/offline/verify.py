"""Verification with transformers: does the upcycled MoE compute the dense function at step 0, and is an export
faithful?

Both models are loaded by transformers (``LlamaForCausalLM`` from an HF directory or a GGUF file;
``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM``, by the MoE's ``model_type``) in fp32 on the CPU and run on the same
tokens: max and mean absolute logit difference, top-1 agreement. HF Mixtral always renormalizes its top-k weights,
Qwen2-MoE as ``norm_topk_prob`` says; when the checkpoint's ``upcycling`` record says the routing differs (Mixtral:
softmax then top-k without renormalization; either: sigmoid), each sparse block is given that routing
(``core.routing.route``; Qwen2-MoE's gated shared expert added as transformers adds it), so the check measures the
model training will see. Before loading, ``check_inputs``
checks both sides as ``convert`` does (``formats.base.open_dense``, ``formats.moe_dir.check_moe_dir``) and the pair
(``formats.moe_dir.check_pair``); swapped arguments are named as such.

A trained export (``engine.export``) carries ``nemo_reference.safetensors`` (token ids and the logits NeMo computed
on them): ``verify_trained`` checks that transformers reproduces those logits and reports, as information only, how
far training moved the MoE from the dense model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.core.routing import route
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import DenseSource, locate, open_dense, read_json
from nemo_upcycle.formats.hf_moe import BY_MODEL_TYPE
from nemo_upcycle.formats.moe_dir import REFERENCE_FILE, check_moe_dir, check_pair, sniff

# the step-0 tolerance: the largest |logit difference| (fp32) at which the MoE still computes the dense function (a
# function-preserving upcycle differs by rounding only); verify, mode=verify and the training's step-0 check use it
STEP0_ATOL = 1e-3
DEFAULT_TEXT = (
    "The upcycled mixture of experts starts from the dense model: every expert is a copy of its feed-forward "
    "block, and the router decides which of them each token visits. At the first step the two models should "
    "agree on every logit, up to rounding. 1 2 3 4 5, and so on: numbers, punctuation; and names like Llama."
)


@dataclass
class VerifyResult:
    max_abs: float
    mean_abs: float
    top1: float
    tokens: int
    note: str
    token_source: str = ""
    sources: list = field(default_factory=list)  # a MoE of several dense sources: per source (offline.verify_sources)

    def passed(self, atol: float = STEP0_ATOL, min_top1: float = 1.0) -> bool:
        return self.max_abs <= atol and self.top1 >= min_top1


@dataclass
class TrainedVerifyResult(VerifyResult):
    """A trained export: ``max_abs``/``mean_abs``/``top1`` compare transformers with NeMo's recorded logits;
    ``drift`` = (max, mean |dlogit|, top-1 agreement) of the MoE against the dense model (information)."""

    drift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    trained: Optional[dict] = None
    reference_dtype: str = "float32"


def is_trained_export(moe_path: str | Path) -> bool:
    return (Path(moe_path).expanduser() / REFERENCE_FILE).is_file()


def check_inputs(dense_path: Path, moe_path: Path) -> tuple[DenseSource, dict]:
    """The dense source (opened and checked) and the MoE's config, or one line saying what is wrong (module doc)."""
    dense_path = locate(dense_path, "the dense HF Llama directory or .gguf file")
    moe_path = locate(moe_path, "the upcycled HF MoE directory")
    d, m = sniff(dense_path), sniff(moe_path)
    usage = "verify takes the dense model first, then the MoE: nemo-upcycle verify DENSE MOE"
    if d == "moe" and m == "dense":
        raise UpcycleError(f"the arguments are swapped: {dense_path} is the MoE and {moe_path} the dense model; "
                           f"run nemo-upcycle verify {moe_path} {dense_path}.")
    if m == "dense":
        raise UpcycleError(f"MOE {moe_path} is a dense Llama, not an upcycled MoE; {usage} (arguments swapped?).")
    if d == "moe":
        raise UpcycleError(f"DENSE {dense_path} is a Mixture-of-Experts, not the dense model; {usage} "
                           "(arguments swapped?).")
    if dense_path.is_dir() and (dense_path / "context").is_dir() and (dense_path / "weights").is_dir():
        raise UpcycleError(f"DENSE {dense_path} is a NeMo checkpoint; verify runs the dense model with transformers: "
                           "pass its HF Llama directory or .gguf file.")
    src = open_dense(dense_path)
    moe_cfg = check_moe_dir(moe_path)
    check_pair(src.config, moe_cfg, str(dense_path), str(moe_path))
    return src, moe_cfg


def load_dense(path: str | Path):
    """The dense model with transformers' own class for its family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists():
        raise UpcycleError(f"{p} does not exist; pass the dense HF Llama directory or .gguf file.")
    if p.is_file() and p.suffix.lower() == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    if not (p / "config.json").is_file():
        raise UpcycleError(f"{p} has no config.json; pass the dense HF Llama directory or .gguf file.")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)


def load_moe(path: str | Path):
    """The upcycled MoE with transformers' own class for its format (Mixtral or Qwen2-MoE), the recorded routing
    applied."""
    import transformers

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UpcycleError(f"{p} has no config.json; pass the upcycled HF MoE directory written by convert.")
    cfg = read_json(p / "config.json")
    fmt = BY_MODEL_TYPE.get(cfg.get("model_type") if isinstance(cfg, dict) else None)
    if fmt is None:
        raise UpcycleError(f"{p} is neither an HF Mixtral nor a Qwen2-MoE; pass the directory convert wrote.")
    model = getattr(transformers, fmt.architecture).from_pretrained(str(p), dtype=torch.float32)
    apply_recorded_routing(model)
    return model


def apply_recorded_routing(model) -> bool:
    """Give every sparse block the routing recorded under ``config.upcycling``; True if it differs from HF's."""
    rec = getattr(model.config, "upcycling", None) or {}
    score = rec.get("moe_router_score_function", "softmax")
    pre = bool(rec.get("moe_router_pre_softmax", False))
    renorm = rec.get("norm_topk_prob", True)
    qwen = getattr(model.config, "model_type", None) == "qwen2_moe"
    if score == "softmax" and (renorm or not pre or qwen):
        return False  # HF's own routing (softmax, top-k, renormalize / Qwen2-MoE's norm_topk_prob) is the recorded one
    for module in model.modules():
        if module.__class__.__name__ in ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock"):
            module.forward = types.MethodType(_routed_forward(score, pre, renorm), module)
    return True


def _routed_forward(score: str, pre: bool, renorm: bool):
    def forward(self, hidden_states: torch.Tensor):
        B, T, D = hidden_states.shape
        x = hidden_states.view(-1, D)  # (B*T, D)
        logits = self.gate(x)  # (B*T, E)
        probs, indices = route(logits, self.top_k, score, pre, renorm)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(indices == e, as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * probs[tok, slot, None].to(x.dtype))
        if hasattr(self, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert, as transformers adds it
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, T, D), logits
    return forward


def tokenize(moe_dir: Path, dense_path: Path, text: str, vocab_size: int,
             max_tokens: int = 256) -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` with the MoE's (or the dense model's) tokenizer; without one, seeded random ids."""
    from transformers import AutoTokenizer

    if _has_tokenizer(moe_dir):
        tok, where = AutoTokenizer.from_pretrained(str(moe_dir)), "MoE tokenizer"
    elif dense_path.suffix.lower() == ".gguf":
        tok, where = AutoTokenizer.from_pretrained(str(dense_path.parent), gguf_file=dense_path.name), "GGUF tokenizer"
    elif _has_tokenizer(dense_path):
        tok, where = AutoTokenizer.from_pretrained(str(dense_path)), "dense tokenizer"
    else:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, max_tokens), generator=g), "no tokenizer: seeded random token ids"
    ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.numel() == 0:
        raise UpcycleError("the verification text tokenizes to nothing; pass a --text file with some words in it.")
    return ids, where


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


@torch.no_grad()
def compare(dense, moe, input_ids: torch.Tensor) -> tuple[float, float, float]:
    return logit_stats(dense(input_ids).logits, moe(input_ids).logits)


def logit_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max |a - b|, mean |a - b|, top-1 agreement) of two [B, T, V] logit tensors."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        raise UpcycleError(f"dense logits {list(a.shape)} and MoE logits {list(b.shape)} differ in shape; "
                           "are these the dense model and its upcycled MoE?")
    d = (a - b).abs()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return d.max().item(), d.mean().item(), top1


def verify(dense_path, moe_path, text: Optional[str] = None, max_tokens: int = 256) -> VerifyResult:
    """Step 0 for a conversion; for a trained export (it holds the reference), ``verify_trained``."""
    dense_path, moe_path = Path(dense_path).expanduser(), Path(moe_path).expanduser()
    check_inputs(dense_path, moe_path)
    if is_trained_export(moe_path):
        return verify_trained(dense_path, moe_path)
    moe = load_moe(moe_path)
    dense = load_dense(dense_path)
    ids, where = tokenize(moe_path, dense_path, text or DEFAULT_TEXT, moe.config.vocab_size, max_tokens)
    if ids.numel() and ids.max() >= moe.config.vocab_size:
        raise UpcycleError(f"the {where} gives token id {ids.max().item()}, outside the models' vocabulary of "
                           f"{moe.config.vocab_size}; the tokenizer does not belong to these models.")
    mx, mean, top1 = compare(dense, moe, ids)
    rec = getattr(moe.config, "upcycling", None) or {}
    note = rec.get("step0_note", "no upcycling record in config.json")
    sources = []
    if rec.get("expert_sources"):
        from nemo_upcycle.offline.verify_sources import per_source

        sources = per_source(moe_path, ids, load_moe, load_dense, logit_stats)
    return VerifyResult(mx, mean, top1, ids.numel(), note, where, sources)


def load_reference(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids [B, T], logits [B, T, V], metadata) of a ``nemo_reference.safetensors``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, logits = f.get_tensor("input_ids"), f.get_tensor("logits")
    except (OSError, SafetensorError) as e:  # missing, truncated, foreign, or without these tensors
        raise UpcycleError(f"{path} is not a readable NeMo reference ({e.__class__.__name__}); re-export the "
                           "model.") from None
    if ids.ndim != 2 or logits.shape[:2] != ids.shape:
        raise UpcycleError(f"{path}: ids {list(ids.shape)} and logits {list(logits.shape)} do not match; re-export "
                           "the model.")
    return ids.long(), logits.float(), meta


@torch.no_grad()
def verify_trained(dense_path: Path, moe_path: Path) -> TrainedVerifyResult:
    """transformers' Mixtral vs the logits NeMo recorded at export; then the MoE vs the dense model (information)."""
    ids, ref, meta = load_reference(moe_path / REFERENCE_FILE)
    moe = load_moe(moe_path)
    if ids.numel() and (ids.min() < 0 or ids.max() >= moe.config.vocab_size):
        raise UpcycleError(f"{moe_path / REFERENCE_FILE} holds token ids outside the vocabulary; re-export the model.")
    ours = moe(ids).logits
    mx, mean, top1 = logit_stats(ref, ours)
    drift = logit_stats(load_dense(dense_path)(ids).logits, ours)
    trained = getattr(moe.config, "trained", None) or {}
    note = (getattr(moe.config, "upcycling", None) or {}).get("step0_note", "no upcycling record in config.json")
    return TrainedVerifyResult(mx, mean, top1, ids.numel(), note, f"{list(ids.shape)} ids recorded at export",
                               drift=drift, trained=trained, reference_dtype=meta.get("megatron_dtype", "float32"))
