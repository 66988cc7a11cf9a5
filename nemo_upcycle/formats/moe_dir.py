"""An upcycled HF Mixtral / Qwen2-MoE directory on disk (what ``convert`` and ``engine.export`` write): recognise and
check it (the format of a directory: ``formats.hf_moe.BY_MODEL_TYPE``).

``is_upcycled_mixtral_dir(d)``: the recogniser for outputs written before the ``.nemo-upcycle`` mark existed: an HF
MoE ``config.json`` with an ``upcycling`` record, and nothing but files convert / export write (weights, their
index, config, tokenizer files, generation config, NeMo's reference logits). ``--overwrite`` may replace such a
directory; any other directory without the mark is never replaced (``files.check_replaceable``).

``check_moe_dir(d)``: what ``verify`` checks before transformers loads anything: a Mixtral / Qwen2-MoE config with the
``upcycling`` record and sane sizes, every safetensors file present and complete, exactly the tensors and shapes
the config implies, float weights. ``check_pair`` then refuses a dense model the MoE cannot have come from (hidden
size, layers, heads, vocabulary, FFN); ``sniff`` tells a dense model from an MoE by its config (swapped arguments).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import MOE_CONFIG_KEYS, SIZE_KEYS, check_config_values, read_json
from nemo_upcycle.formats.hf_llama import check_safetensors_size
from nemo_upcycle.formats.hf_moe import BY_MODEL_TYPE
from nemo_upcycle.formats.mixtral import LLAMA_DEFAULTS
from nemo_upcycle.system import files

REFERENCE_FILE = "nemo_reference.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WRITTEN = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json"
                     r"|generation_config\.json|nemo_reference\.safetensors|tokenizer(_config)?\.json"
                     r"|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt"
                     r"|chat_template\.(jinja|json)")
FLOAT_DTYPES = ("F32", "F16", "BF16")


def _config(d: Path) -> Optional[dict]:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_upcycled_mixtral_dir(d: Path) -> bool:
    """True for a directory convert / export wrote before marks existed (see the module docstring)."""
    d = Path(d)
    if d.is_symlink() or not d.is_dir():
        return False
    cfg = _config(d)
    if cfg is None or cfg.get("model_type") not in BY_MODEL_TYPE or not isinstance(cfg.get("upcycling"), dict):
        return False
    return all(p.is_file() and not p.is_symlink() and WRITTEN.fullmatch(p.name) for p in d.iterdir())


def sniff(p: Path) -> Optional[str]:
    """"dense" (a .gguf file or an HF Llama directory), "moe" (an HF MoE config) or None, from the config alone."""
    if p.is_file():
        return "dense" if p.suffix.lower() == ".gguf" else None
    cfg = _config(p) if p.is_dir() else None
    if cfg is None:
        return None
    if cfg.get("model_type") in BY_MODEL_TYPE or any(cfg.get(k) for k in MOE_CONFIG_KEYS):
        return "moe"
    return "dense" if cfg.get("model_type") in ("llama", "qwen2") else None


def check_moe_dir(d: Path) -> dict:
    """Refuse anything but a complete upcycled HF Mixtral / Qwen2-MoE directory; return its config."""
    fix = "pass the MoE directory nemo-upcycle convert (or a training run's hf_mixtral/) wrote"
    if not d.is_dir():
        raise UpcycleError(f"{d} is not a directory; {fix}.")
    if not (d / "config.json").is_file():
        raise UpcycleError(f"{d} has no config.json; {fix}.")
    cfg = read_json(d / "config.json")
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in BY_MODEL_TYPE:
        raise UpcycleError(f"{d} is model_type {mt!r}, not an HF Mixtral or Qwen2-MoE; {fix}.")
    fmt = BY_MODEL_TYPE[mt]
    if not isinstance(cfg.get("upcycling"), dict):
        raise UpcycleError(f"{d} is an HF {fmt.architecture} without an upcycling record in config.json (not "
                           f"upcycled by nemo-upcycle), so there is no dense model to compare it with; {fix}.")
    experts = "num_local_experts" if mt == "mixtral" else "num_experts"
    sizes = (experts, "num_experts_per_tok") + (() if mt == "mixtral" else ("moe_intermediate_size",))
    check_config_values(cfg, str(d / "config.json"), SIZE_KEYS + sizes)
    E, k = cfg[experts], cfg["num_experts_per_tok"]
    if k > E:
        raise UpcycleError(f"{d}/config.json: num_experts_per_tok {k} > {experts} {E}; the config is corrupt.")
    dense, opts = _dense_view(cfg, d)
    tensors = _tensors(d)
    n = fmt.num_output_tensors(dense, opts)
    if len(tensors) != n:  # before the key table is built: E in a bad config can be huge
        raise UpcycleError(f"{d} holds {len(tensors)} tensors but its config ({cfg['num_hidden_layers']} layers, {E} "
                           f"experts) implies {n}; the directory is incomplete or not an upcycled {fmt.architecture}.")
    for spec, _ in fmt.layout(dense, opts, torch.float32):
        got = tensors.get(spec.name)
        if got is None:
            raise UpcycleError(f"{d} lacks {spec.name}, which its config implies; the directory is incomplete.")
        if tuple(got[1]) != spec.shape:
            raise UpcycleError(f"{d}: {spec.name} has shape {list(got[1])} but config.json implies {list(spec.shape)}; "
                               "the config does not match the weights.")
        if got[0] not in FLOAT_DTYPES:
            raise UpcycleError(f"{d}: {spec.name} is stored as {got[0]}; an MoE's weights are F32, F16 or BF16.")
    return cfg


def _dense_view(cfg: dict, d: Path) -> tuple[dict, UpcycleOptions]:
    """An MoE config as the dense config + options its format's layout reads (sizes only)."""
    if cfg["model_type"] == "mixtral":
        return cfg, UpcycleOptions(cfg["num_local_experts"], cfg["num_experts_per_tok"])
    F, Fe, Fs = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg.get("shared_expert_intermediate_size")
    only = cfg.get("mlp_only_layers") or []
    L = cfg["num_hidden_layers"]
    if (F % Fe or not isinstance(Fs, int) or isinstance(Fs, bool) or Fs < 0 or Fs % Fe
            or not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < L for i in only)
            or len(set(only)) == L or cfg.get("decoder_sparse_step", 1) != 1):
        raise UpcycleError(f"{d}/config.json: intermediate_size {F}, moe_intermediate_size {Fe}, "
                           f"shared_expert_intermediate_size {Fs}, mlp_only_layers {only} do not describe an upcycled "
                           "Qwen2-MoE; the config is corrupt.")
    dense = {**cfg, "intermediate_size": F, "model_type": "qwen2" if cfg.get("qkv_bias", True) else "llama"}
    moe_layers = [i for i in range(L) if i not in set(only)]
    return dense, UpcycleOptions(cfg["num_experts"], cfg["num_experts_per_tok"], granularity=F // Fe,
                                 shared_experts=Fs // Fe, moe_layers=moe_layers)


def _tensors(d: Path) -> dict[str, tuple[str, list]]:
    """name -> (dtype, shape) from the safetensors headers (every file checked complete), as the index maps them."""
    index = d / INDEX_FILE
    weight_map = None
    if index.is_file():
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UpcycleError(f"{index} has no weight_map of tensor -> file; the index is corrupt: convert again.")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors") if p.name != REFERENCE_FILE)
    if not files:
        raise UpcycleError(f"{d} holds no .safetensors weights; pass the MoE directory convert wrote.")
    out: dict[str, tuple[str, list]] = {}
    for name in files:
        f = d / name
        if not f.is_file():
            raise UpcycleError(f"{d}: the index names {name}, which is missing; convert again.")
        _, header = check_safetensors_size(f)
        for key, v in header.items():
            if key != "__metadata__" and (weight_map is None or weight_map.get(key) == name):
                out[key] = (v.get("dtype"), v.get("shape", []))
    if weight_map is not None and set(weight_map) - set(out):
        missing = sorted(set(weight_map) - set(out))
        raise UpcycleError(f"{index} maps {missing[0]} to {weight_map[missing[0]]}, which does not hold it; the index "
                           "is corrupt: convert again.")
    return out


def _resolved(c: dict) -> dict:
    H = c["num_attention_heads"]
    return {"vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"], "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": H, "num_key_value_heads": c.get("num_key_value_heads") or H,
            "head_dim": c.get("head_dim") or c["hidden_size"] // H,
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False))}


def check_pair(dense: dict, moe: dict, dense_name: str, moe_name: str) -> None:
    """Refuse a dense config the MoE cannot have been upcycled from (sizes, vocabulary, FFN, eps, RoPE base)."""
    rec = moe["upcycling"]
    fix = (f"the MoE was not upcycled from this dense model; pass the dense model it was made from "
           f"(its upcycling record says {rec.get('source')})")
    a, b = _resolved(dense), _resolved(moe)
    for key in a:
        if a[key] != b[key]:
            raise UpcycleError(f"{dense_name} and {moe_name} differ in {key} ({a[key]} vs {b[key]}): {fix}.")
    G = rec.get("granularity", 1)
    G = G if isinstance(G, int) and not isinstance(G, bool) and G >= 1 else 1
    Fe = moe["intermediate_size"] if moe.get("model_type") == "mixtral" else moe.get("moe_intermediate_size")
    if Fe * G != dense["intermediate_size"]:
        raise UpcycleError(f"{moe_name} has experts of FFN size {Fe} x granularity {G}, the "
                           f"dense FFN of {dense_name} is {dense['intermediate_size']}: {fix}.")
    for key in ("rms_norm_eps", "rope_theta"):
        x, y = dense.get(key, LLAMA_DEFAULTS[key]), moe.get(key, LLAMA_DEFAULTS[key])
        if not math.isclose(x, y, rel_tol=1e-6):  # a GGUF stores both as float32
            raise UpcycleError(f"{dense_name} and {moe_name} differ in {key} ({x} vs {y}): {fix}.")


# ---- the trained export of a run directory ------------------------------------------------------------------
EXPORT_DIR = "hf_mixtral"  # RUN/hf_mixtral: the HF export at the end of training


def legacy_export(d: Path) -> bool:
    """An HF Mixtral export written by the training lifecycle before marks existed (its config.json says so)."""
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("trained") or {}).get("exported_from") == "megatron-core GPTModel"


def export_problem(run_dir: Path) -> Optional[str]:
    """Why ``RUN/hf_mixtral`` may not be replaced by the export at the end of training (None: absent, empty, ours)."""
    out = Path(run_dir) / EXPORT_DIR
    if not out.exists() and not out.is_symlink():
        return None
    try:
        files.check_replaceable(out, ("export",), flag="the export directory", legacy=legacy_export)
    except UpcycleError as e:
        if out.is_dir() and not out.is_symlink() and "holds files" in str(e):
            return f"{out} holds files nemo-upcycle did not write (no {files.MARK} mark)"
        return str(e).rstrip(".")
    return None
