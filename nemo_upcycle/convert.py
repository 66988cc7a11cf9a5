"""The conversion engine: dense Llama (HF directory or GGUF) -> HF Mixtral directory, layer by layer.

Steps:
  1. open and check the source (``hf.source.open_dense``): a dense Llama whose tensors match its config;
  2. validate the options against it; refuse an existing output unless ``overwrite``; check free disk;
  3. lay out every output tensor from the configs alone (``hf.mixtral.layout``);
  4. stream: read one dense layer, write its copies, router and experts, drop it; a progress bar counts bytes;
  5. prove every source tensor was consumed exactly once; write config, tokenizer, index;
  6. rename the temporary directory onto the output. On any failure the temporary directory is removed.
Peak memory is about one dense layer (plus one expert when noise / drop / scaling makes a new tensor).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .core.options import UpcycleOptions, resolve_moe_layers
from .core.upcycle import LayerExperts, router_weight
from .errors import UpcycleError
from .hf.mixtral import layout, mixtral_config, source_keys
from .hf.safetensors_stream import ShardedWriter
from .hf.source import DenseSource, open_dense, read_dense_mlp

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 2 << 30
DISK_MARGIN = 64 << 20


@dataclass
class ConvertResult:
    out_dir: Path
    bytes_written: int
    num_tensors: int
    config: dict


def resolve_dtype(name: Optional[str], src: DenseSource) -> torch.dtype:
    if name in (None, "auto"):
        return src.dtype("model.embed_tokens.weight")
    try:
        return DTYPES[name]
    except KeyError:
        raise UpcycleError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}.") from None


def prepare_output(out: Path, overwrite: bool, needed_bytes: int) -> Path:
    """Check the output path and free disk; return the temporary directory to write into."""
    if out.exists() and not overwrite:
        raise UpcycleError(f"{out} already exists; choose another output or pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"{out} exists and is not a directory; remove it or choose another output.")
    parent = out.parent
    if not parent.is_dir():
        raise UpcycleError(f"the output's parent directory {parent} does not exist; create it first.")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + DISK_MARGIN:
        raise UpcycleError(f"not enough disk under {parent}: the MoE needs {needed_bytes / 2**30:.2f} GiB, "
                           f"{free / 2**30:.2f} GiB are free; free space or choose another output.")
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finalize(tmp: Path, out: Path) -> None:
    """Atomically put the finished directory in place (the old one, with --overwrite, goes last)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(src_path, out_dir, opts: UpcycleOptions, *, dtype: Optional[str] = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> ConvertResult:
    """Upcycle ``src_path`` into an HF Mixtral directory ``out_dir``. See the module docstring."""
    from tqdm.auto import tqdm

    src = open_dense(src_path)
    cfg = src.config
    opts.validate(ffn_hidden_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"])
    moe_layers = resolve_moe_layers(opts.moe_layers, cfg["num_hidden_layers"])
    if len(moe_layers) != cfg["num_hidden_layers"]:
        raise UpcycleError(f"--moe-layers selects {len(moe_layers)} of {cfg['num_hidden_layers']} layers, but an HF "
                           "Mixtral checkpoint has no dense layers; use --moe-layers all for HF output.")
    out_dtype = resolve_dtype(dtype, src)
    plan = layout(cfg, opts, out_dtype)
    specs = [spec for spec, _ in plan]
    out = Path(out_dir).expanduser().absolute()
    tmp = prepare_output(out, overwrite, sum(s.nbytes for s in specs))
    try:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        consumed: list[str] = []
        experts = LayerExperts(lambda i: read_dense_mlp(src.get, i), opts)
        with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="upcycle",
                  disable=not progress) as bar:
            for spec, recipe in plan:
                consumed += source_keys(recipe)
                writer.write(spec.name, _produce(src, recipe, opts, experts, spec.dtype))
                bar.update(spec.nbytes)
        writer.close()
        _check_consumed(src, consumed)
        config = mixtral_config(cfg, opts, out_dtype, source=str(src.path))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src.save_tokenizer(tmp)
        finalize(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, writer.bytes_written, len(specs), config)


def _produce(src: DenseSource, recipe: tuple, opts: UpcycleOptions, experts: LayerExperts,
             dtype: torch.dtype) -> torch.Tensor:
    kind = recipe[0]
    if kind == "copy":
        return src.get(recipe[1])
    if kind == "router":
        return router_weight(src.config["hidden_size"], opts, recipe[1], dtype)
    _, layer, e, which = recipe
    w = experts.get(layer, e)
    return {"w1": w.gate, "w3": w.up, "w2": w.down}[which]


def _check_consumed(src: DenseSource, consumed: list[str]) -> None:
    seen, twice = set(), set()
    for k in consumed:
        (twice if k in seen else seen).add(k)
    leftover = sorted(k for k in set(src.keys()) - seen if not k.endswith("rotary_emb.inv_freq"))
    unknown = sorted(seen - set(src.keys()))
    if twice or leftover or unknown:
        raise RuntimeError(f"conversion consumed source keys wrongly: twice={sorted(twice)[:3]} "
                           f"leftover={leftover[:3]} unknown={unknown[:3]}")
