"""What every HF MoE export (Mixtral, Qwen2-MoE) of a Megatron MoE writes, wherever its tensors come from.

``engine.export`` reads the tensors from a live 1-rank module, ``engine.export_stream`` from a distributed
checkpoint; both hand ``write_export`` a function ``hf name -> tensor`` and it writes, in order:
1. the HF format (``export_format``: ``formats.hf_moe``, the config's ``export_format``; Qwen2-MoE holds shared
   experts, dense layers and q/k/v biases) and refusals for what it cannot hold, from the config alone
   (``check_config_exportable``: routing HF cannot express, sizes that disagree with the dense ``hf_llama_config``);
2. every tensor in the order of the format's layout (the key table's names; ``convert`` writes the same) into
   safetensors shards (``formats.safetensors_stream``: one tensor in memory at a time) in a marked staging directory
   next to ``out`` (``system.files.staging``: removed on failure and on SIGTERM / SIGINT); then the source proves
   that every Megatron tensor it holds was written (``check_used``);
3. config.json (the format's config: the ``upcycling`` record carries the routing verify replays, plus
   a ``trained`` record), the tokenizer files, ``nemo_reference.safetensors`` (token ids and the Megatron logits on
   them) when a model was at hand to compute them;
4. ``files.publish`` onto ``out``, marked ``export``. The output is checked first as ``convert`` checks it
   (``convert.check_output``): an existing ``out`` is replaced only with ``overwrite`` and only if nemo-upcycle wrote
   it; never the current or home directory.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import QWEN_SHARED, has_qkv_bias, hf_values, megatron_values, mismatches
from nemo_upcycle.offline.verify import REFERENCE_FILE

log = logging.getLogger(__name__)

# weights and marks (not tokenizer files)
_NOT_TOKENIZER = re.compile(r"(config\.json|.*\.safetensors|.*\.bin|.*\.pt|.*\.index\.json|\.nemo-upcycle.*)")
EXPORT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "moe_ffn_hidden_size", "share_embeddings_and_output_weights", "layernorm_epsilon", "rotary_base",
                 "scale_factor")


def export_format(config, hf_llama: dict):
    """The HF format of the export (``formats.hf_moe.choose``): the config's ``export_format`` (the recipe's
    ``logging.export_format``; auto: Mixtral when it holds the model, else Qwen2-MoE), refused in one line when it
    cannot hold the model."""
    from nemo_upcycle.formats.hf_moe import choose

    return choose(hf_llama, upcycle_options(config), getattr(config, "export_format", "auto") or "auto",
                  flag="logging.export_format")


def check_config_exportable(config, hf_llama: dict, padded_vocab: int) -> None:
    """One-line UpcycleError for anything of the config the HF format (``export_format``) cannot hold exactly."""
    fmt = export_format(config, hf_llama)
    bad = [k for k in ("moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
                       "moe_input_jitter_eps", "mtp_num_layers") if getattr(config, k, None)]
    if getattr(config, "moe_router_topk_scaling_factor", None) not in (None, 1.0):
        bad.append("moe_router_topk_scaling_factor")
    if bad:
        name = fmt.architecture.removesuffix("ForCausalLM")
        raise UpcycleError(f"{', '.join(bad)} set: HF {name} cannot express this routing; export needs plain top-k "
                           "routing (softmax or sigmoid, pre-softmax or not).")
    act = getattr(config.activation_func, "__name__", "")
    if not (config.gated_linear_unit and act == "silu" and config.normalization == "RMSNorm") \
            or config.add_bias_linear or getattr(config, "qk_layernorm", False):
        raise UpcycleError("the model is not a Llama-style MoE (SwiGLU, RMSNorm, no linear biases, no qk norm); only "
                           "those export to HF.")
    if bool(config.add_qkv_bias) != has_qkv_bias(hf_llama):
        raise UpcycleError(f"the model has add_qkv_bias={config.add_qkv_bias} but hf_llama_config "
                           f"{'has' if has_qkv_bias(hf_llama) else 'has no'} q/k/v biases; pass the config.json of the "
                           "dense model this MoE was upcycled from.")
    # sizes agree with the dense HF config the Mixtral config is written from (the key table's config fields)
    ours, theirs = megatron_values(config), hf_values(hf_llama)
    G = config.upcycle_granularity if hasattr(config, "upcycle_granularity") else 1
    ours["moe_ffn_hidden_size"] = config.moe_ffn_hidden_size
    theirs["moe_ffn_hidden_size"] = theirs["ffn_hidden_size"] // G
    for name, a, b in mismatches(ours, theirs, EXPORT_FIELDS)[:1]:
        name = "scale_factor (Llama 3.1 RoPE)" if name == "scale_factor" else name
        raise UpcycleError(f"the model has {name}={a} but hf_llama_config says {b}; pass the config.json of the "
                           "dense model this MoE was upcycled from.")
    if padded_vocab < hf_llama["vocab_size"]:
        raise UpcycleError(f"the model's vocabulary ({padded_vocab}) is smaller than hf_llama_config's vocab_size "
                           f"({hf_llama['vocab_size']}); pass the dense model's config.json.")


def upcycle_options(config):
    if not hasattr(config, "upcycle_options"):
        raise UpcycleError(f"{config.__class__.__name__} has no upcycling fields; "
                           "pass the UpcycledLlamaConfig of the run.")
    return config.upcycle_options()


def check_reference_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dtype != torch.long or input_ids.ndim != 2:
        raise UpcycleError(f"reference_ids must be a LongTensor [B, T], got {input_ids.dtype} {list(input_ids.shape)}.")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise UpcycleError(f"reference_ids hold ids outside 0..{vocab_size - 1}; "
                           "pass tokens of this model's tokenizer.")


def save_reference(path: Path, input_ids: torch.Tensor, logits: torch.Tensor, megatron_dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({"input_ids": input_ids.cpu().long().contiguous(), "logits": logits.float().cpu().contiguous()},
              str(path), metadata={"format": "pt", "megatron_dtype": str(megatron_dtype).removeprefix("torch.")})


def versions() -> dict:
    out = {}
    for name, mod in (("nemo", "nemo.package_info"), ("megatron_core", "megatron.core.package_info")):
        try:
            out[name] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            pass
    return out


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer files (everything but configs and weights) of an HF or NeMo tokenizer directory."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise UpcycleError(f"tokenizer_dir {d} is not a directory; pass the dense model's directory or None.")
    copied = [f.name for f in sorted(d.iterdir()) if f.is_file() and not _NOT_TOKENIZER.fullmatch(f.name)]
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UpcycleError(f"{d} holds no tokenizer.json / tokenizer.model / vocab.json; pass a tokenizer directory.")
    for n in copied:
        shutil.copy2(d / n, out / n)
    return copied


def routing_note(config) -> str:
    c = config.moe_expert_capacity_factor
    return "dropless" if c is None else f"dropless (trained with capacity factor {c})"


def shared_expert_reader(get: Callable[[str], torch.Tensor], config, hidden: int) -> Callable[[str], torch.Tensor]:
    """``get`` for HF Qwen2-MoE, whose shared expert always exists behind a gate: without Megatron's gate the gate is
    written as zeros and the down projection doubled (``formats.qwen2_moe.hf_shared_down``); without a shared expert,
    empty projections (they add exactly 0)."""
    from nemo_upcycle.formats.keymap import QWEN2_MOE_KEYMAP
    from nemo_upcycle.formats.qwen2_moe import hf_shared_down

    sh_gate, sh_up, sh_down, sh_expert_gate = QWEN_SHARED
    has, gated = bool(config.moe_shared_expert_intermediate_size), bool(getattr(config, "moe_shared_expert_gate", 0))

    def read(name: str) -> torch.Tensor:
        try:
            t = QWEN2_MOE_KEYMAP.hf(name)
        except KeyError:
            return get(name)
        which = t.row.hf[t.part]
        if which is sh_expert_gate and not (has and gated):
            return torch.zeros(1, hidden)
        if which in (sh_gate, sh_up, sh_down) and not has:
            return torch.zeros((hidden, 0) if which is sh_down else (0, hidden))
        if which is sh_down and not gated:
            return hf_shared_down(get(name), False)
        return get(name)

    return read


def write_export(out: Path, get: Callable[[str], torch.Tensor], *, config, hf: dict, trained: dict,
                 dtype: torch.dtype = torch.float32, tokenizer_dir=None, reference=None,
                 check_used: Callable[[], None] = lambda: None, overwrite: bool = False, progress: bool = True,
                 max_shard_bytes: int = 2 << 30, protect=()) -> Path:
    """Steps 2-4 of the module docstring: ``get(hf_name)`` gives each tensor (any dtype, CPU); ``reference``:
    (ids [B, T], logits [B, T, V] fp32, Megatron dtype) or None; ``trained``: the ``trained`` record of config.json.
    The caller has checked the output (``convert.check_output``) and the config (``check_config_exportable``)."""
    from tqdm.auto import tqdm

    from nemo_upcycle.formats.moe_dir import is_upcycled_mixtral_dir
    from nemo_upcycle.formats.safetensors_stream import ShardedWriter
    from nemo_upcycle.offline.convert import OUTPUT_KINDS
    from nemo_upcycle.system.files import check_writable, publish, staging

    opts, fmt = config.upcycle_options(), export_format(config, hf)
    if fmt.name == "qwen2_moe":
        get = shared_expert_reader(get, config, hf["hidden_size"])
    ref_bytes = 0 if reference is None else reference[0].numel() * (hf["vocab_size"] * 4 + 8)
    needed = fmt.output_bytes(hf, opts, dtype) + ref_bytes
    check_writable(out.parent, needed, flag="output")
    specs = [spec for spec, _ in fmt.layout(hf, opts, dtype)]
    with staging(out, needed) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        with torch.no_grad(), tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="export",
                                   disable=not progress) as bar:
            for spec in specs:
                t = get(spec.name)
                if tuple(t.shape) != spec.shape:
                    raise UpcycleError(f"{spec.name} is {list(t.shape)} in the model but {list(spec.shape)} in the "
                                       f"{fmt.architecture} layout of hf_llama_config; pass the dense model's "
                                       "config.json.")
                writer.write(spec.name, t.to("cpu", spec.dtype))
                bar.update(spec.nbytes)
        writer.close()
        check_used()
        cfg = fmt.config(hf, opts, dtype, source=trained.get("source"))
        cfg["trained"] = {**trained, "routing": routing_note(config),
                          "reference": REFERENCE_FILE if reference is not None else None,
                          "reference_tokens": int(reference[0].numel()) if reference is not None else 0, **versions()}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        if reference is not None:
            save_reference(tmp / REFERENCE_FILE, *reference)
        if out.exists() and not overwrite:  # made by someone else while this ran
            raise UpcycleError(f"{out} appeared while exporting; choose another output or pass overwrite.")
        publish(tmp, out, "export", kinds=OUTPUT_KINDS, legacy=is_upcycled_mixtral_dir, protect=protect)
    log.info("exported %s: %d tensors, %.1f MiB", out, len(specs), writer.bytes_written / 2**20)
    return out
