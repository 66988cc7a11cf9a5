"""Dense Llama (HF directory or GGUF) -> HF Mixtral or Qwen2-MoE directory (``formats.hf_moe``), one layer at a time.

  1. cheap checks before the source is read: the source path opens (``formats.base.locate``); the output is none of
     the current directory, the home directory, the source or a directory holding it, and an existing output is
     replaced only with ``overwrite`` and only if nemo-upcycle wrote it (``check_output``);
  2. the source opened and checked (``formats.base.open_dense``), the options validated against it; a conversion
     whose peak memory or output size exceeds what the machine has is refused from the sizes (``check_fits``);
  3. every output tensor laid out from the configs alone (the format's ``layout``) and streamed into a marked
     staging directory (``system.files.staging``: removed on failure or SIGTERM / SIGINT): one dense layer read,
     its copies, router and experts written, the layer dropped;
  4. every source tensor proven consumed exactly once; config, tokenizer and index written; the staging directory
     renamed onto the output (``files.publish``, mark ``convert``).
Peak memory: about one dense layer (plus one expert when noise, drop or scaling makes a new tensor), the router,
and ``BYTES_PER_TENSOR`` of bookkeeping per output tensor (measured by ``bench/convert.py --per-tensor``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers
from nemo_upcycle.core.plan import UpcyclePlan
from nemo_upcycle.core.shared import GATE_AT_INIT, shared_expert_weights, shared_gate_weight, shared_intermediate_size
from nemo_upcycle.core.sources import MultiSourceExperts
from nemo_upcycle.core.upcycle import LayerExperts
from nemo_upcycle.errors import FieldError, UpcycleError
from nemo_upcycle.formats.base import DenseSource, locate, open_dense, read_dense_mlp
from nemo_upcycle.formats.hf_moe import FORMATS, HFMoEFormat, choose
from nemo_upcycle.formats.moe_dir import is_upcycled_mixtral_dir
from nemo_upcycle.formats.safetensors_stream import ShardedWriter
from nemo_upcycle.formats.sources import SourceSet, open_expert_sources
from nemo_upcycle.system.files import check_not_protected, check_replaceable, check_writable, publish, staging

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 2 << 30
OUTPUT_KINDS = ("convert", "export")  # marks of the HF Mixtral directories ``--overwrite`` may replace
# Memory per output tensor for the layout, the writer's order, the shard header and the index, and the consumed-key
# proof. Measured (bench/convert.py --per-tensor): 1.18-1.35 KB with one shard, 0.87 KB with 1 MiB shards.
BYTES_PER_TENSOR = 1536
HEADER_BYTES_PER_TENSOR = 256  # on disk: the tensor's entry in its shard header and in the index


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


def check_output(out: Path, overwrite: bool, protect: Iterable[Path] = (), flag: str = "output") -> None:
    """Before any work: the parent exists and is writable; ``out`` is not a link, not protected (the current or home
    directory, a source, a directory holding one); an existing ``out`` needs ``overwrite`` and must be an HF
    Mixtral directory nemo-upcycle wrote (its mark, or ``is_upcycled_mixtral_dir`` for older outputs) or empty."""
    check_writable(out.parent, 0, margin=0, flag=flag)
    if out.is_symlink():
        raise UpcycleError(f"{flag} {out} is a symbolic link; it is never replaced: pass a real directory path.")
    check_not_protected(out, protect, flag)
    if out.exists():
        check_replaceable(out, OUTPUT_KINDS, protect, flag, legacy=is_upcycled_mixtral_dir)
        if not overwrite:
            raise UpcycleError(f"{out} already exists; choose another output or pass --overwrite to replace it.")


def peak_memory_bytes(cfg: dict, opts: UpcycleOptions, out_dtype: torch.dtype, src_dtype: torch.dtype,
                      fmt: HFMoEFormat = FORMATS["mixtral"]) -> int:
    """Upper bound of the memory a conversion adds to the process, in closed form (see the module docstring):
    the dense MLP of one layer, one new expert (noise / drop / scaling), the larger of the embedding (read and
    cast) and the router (fp32 draw, scaled copy, virtual-group repeat, cast), and the per-tensor bookkeeping."""
    D, F, V, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], opts.num_moe_experts
    Fe, o, s = F // opts.granularity, out_dtype.itemsize, src_dtype.itemsize
    new_expert = (opts.noise_std > 0 or opts.drop_ratio > 0 or opts.scale_factor() != 1.0
                  or opts.expert_split != "contiguous")  # a split gathers the expert's units into new tensors
    expert = (3 * Fe * D * (8 + o) + (F * D * 4 if opts.drop_ratio > 0 else 0)) if new_expert else Fe * D * o
    embed, router = V * D * (s + o), E * D * (12 + o)
    shared = 3 * shared_intermediate_size(opts, F) * D * (4 + o)  # the shared expert, built once per layer
    sources = max(1, len(opts.expert_sources))  # one dense MLP per expert source; averaging reads one more tensor
    embed *= 2 if opts.non_expert == "average" else 1
    return (fmt.num_output_tensors(cfg, opts) * BYTES_PER_TENSOR + 3 * F * D * s * sources + expert
            + max(embed, router) + shared)


def check_fits(cfg: dict, opts: UpcycleOptions, out_dtype: torch.dtype, src_dtype: torch.dtype, where: Path,
               fmt: HFMoEFormat = FORMATS["mixtral"]) -> int:
    """Refuse a conversion that cannot fit in memory or on the disk under ``where``; return the output's bytes."""
    import psutil

    n = fmt.num_output_tensors(cfg, opts)
    peak, avail = peak_memory_bytes(cfg, opts, out_dtype, src_dtype, fmt), psutil.virtual_memory().available
    if peak > avail:
        raise FieldError(f"the conversion needs about {peak / 2**30:.1f} GiB of memory ({n:,} output tensors for "
                         f"{opts.num_moe_experts:,} experts x {cfg['num_hidden_layers']} layers), this machine has "
                         f"{avail / 2**30:.1f} GiB available; lower {{num_moe_experts}} or use a larger machine.",
                         num_moe_experts=opts.num_moe_experts)
    needed = fmt.output_bytes(cfg, opts, out_dtype) + n * HEADER_BYTES_PER_TENSOR
    check_writable(where, needed, flag="output")
    return needed


def convert(src_path, out_dir, opts: UpcycleOptions, *, dtype: Optional[str] = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, fmt: str = "auto",
            make_plan: Optional[Callable[[DenseSource], UpcyclePlan]] = None) -> ConvertResult:
    """Upcycle ``src_path`` into an HF MoE directory ``out_dir`` (``fmt``: ``formats.hf_moe.choose``). See the
    module docstring.

    ``make_plan(src)``: what the experts and routers learn from data (``data.calibration.calibrate``: splits by
    importance or clustering, kmeans / hidden routers), run on the opened source after every cheap check and before
    anything is written; its record lands in ``config.json`` under ``upcycling.calibration``."""
    from tqdm.auto import tqdm

    out = Path(out_dir).expanduser().absolute()
    src_path = locate(src_path)
    check_output(out, overwrite, protect=[src_path])
    src = open_dense(src_path)
    cfg = src.config
    opts.validate(ffn_hidden_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"])
    resolve_moe_layers(opts.moe_layers, cfg["num_hidden_layers"])
    form = choose(cfg, opts, fmt)
    out_dtype = resolve_dtype(dtype, src)
    needed = check_fits(cfg, opts, out_dtype, src.dtype("model.embed_tokens.weight"), out.parent, form)
    sources = SourceSet(src, open_expert_sources(src, opts.expert_sources), opts.non_expert)  # checked up front
    data_plan = make_plan(src) if make_plan is not None else UpcyclePlan()
    plan = form.layout(cfg, opts, out_dtype)
    specs = [spec for spec, _ in plan]
    with staging(out, needed) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        consumed: list[str] = []
        experts = (MultiSourceExperts(sources.mlp_readers(), opts, plan=data_plan) if sources.experts
                   else LayerExperts(lambda i: read_dense_mlp(src.get, i), opts, plan=data_plan))
        with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="upcycle",
                  disable=not progress) as bar:
            for spec, recipe in plan:
                consumed += form.source_keys(recipe)
                writer.write(spec.name, _produce(sources, recipe, opts, experts, spec.dtype, data_plan))
                bar.update(spec.nbytes)
        writer.close()
        _check_consumed(src, consumed)
        config = form.config(cfg, opts, out_dtype, source=str(src.path))
        if data_plan.record:
            config["upcycling"]["calibration"] = data_plan.record
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src.save_tokenizer(tmp)
        if out.exists() and not overwrite:  # made by someone else while this ran
            raise UpcycleError(f"{out} appeared while converting; choose another output or pass --overwrite.")
        publish(tmp, out, "convert", kinds=OUTPUT_KINDS, protect=[src_path], legacy=is_upcycled_mixtral_dir,
                source=str(src.path))
    return ConvertResult(out, writer.bytes_written, len(specs), config)


def _produce(src: SourceSet, recipe: tuple, opts: UpcycleOptions, experts, dtype: torch.dtype,
             plan: UpcyclePlan) -> torch.Tensor:
    kind = recipe[0]
    if kind == "copy":
        return src.get(recipe[1])  # the base's, or the mean of the expert sources' (--non-expert)
    if kind == "router":
        return plan.router(src.base.config["hidden_size"], opts, recipe[1], dtype)
    if kind == "shared":  # HF Qwen2-MoE: the gate is always there, zero at step 0 (formats.qwen2_moe)
        _, layer, which = recipe
        if which == "expert_gate":
            return shared_gate_weight(src.base.config["hidden_size"], dtype)
        dense = experts.dense(layer)
        return getattr(shared_expert_weights(*dense, opts, gamma=GATE_AT_INIT), which)
    _, layer, e, which = recipe
    w = experts.get(layer, e)
    return getattr(w, which)  # the expert's part: gate, up or down (the format's layout)


def _check_consumed(src: DenseSource, consumed: list[str]) -> None:
    seen, twice = set(), set()
    for k in consumed:
        (twice if k in seen else seen).add(k)
    leftover = sorted(k for k in set(src.keys()) - seen if not k.endswith("rotary_emb.inv_freq"))
    unknown = sorted(seen - set(src.keys()))
    if twice or leftover or unknown:
        raise RuntimeError(f"conversion consumed source keys wrongly: twice={sorted(twice)[:3]} "
                           f"leftover={leftover[:3]} unknown={unknown[:3]}")
