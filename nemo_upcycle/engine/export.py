"""A trained Megatron-core MoE (one rank holding the whole model) -> an HF Mixtral directory, with its proof.

``export_hf_mixtral(module, config, out_dir, hf_llama_config=...)`` writes what
``transformers.MixtralForCausalLM.from_pretrained`` loads, plus ``nemo_reference.safetensors``: token ids and
the Megatron module's own logits on them, which ``nemo-upcycle verify DENSE OUT`` replays with transformers.

Which Megatron parameter holds which HF Mixtral tensor, and how (q/k/v split, fc1 = [w1; w3], padded vocabulary
rows cut), is the key table's (``formats.keymap``); ``lm_head`` is absent when the embeddings are tied.

Steps: 1. refuse what a Mixtral cannot hold (a sharded rank, a dense layer, routing HF cannot express, sizes that
disagree with ``hf_llama_config``); 2. if ``reference_ids`` are given, run the module on them (eval mode, its own
dtype) and keep the logits cut to the HF vocab; 3. stream every tensor in the order of ``formats.mixtral.layout``
(the same key table ``convert`` writes) into safetensors shards in a marked staging directory next to ``out_dir``
(``files.staging``: removed on failure and on SIGTERM / SIGINT); 4. prove every Megatron parameter was written
exactly once; 5. config.json (``formats.mixtral.mixtral_config``: the ``upcycling`` record carries the routing that
verify replays, plus a ``trained`` record), tokenizer files, reference; 6. ``files.publish`` onto ``out_dir``, marked
``export``. Before any of it the output is checked as ``convert`` checks it (``convert.check_output``): an existing
``out_dir`` is replaced only with ``overwrite`` and only if nemo-upcycle wrote it; never the current or home
directory. Peak extra memory: one tensor (the writer converts one at a time).

Getting the bare module out of a NeMo run (``unwrap``): ``trainer.strategy.megatron_parallel`` (a
``MegatronParallel``) holds the LightningModule (``UpcycledLlamaModel``), whose ``.module`` is Megatron's
``DistributedDataParallel`` around ``Float16Module`` (mixed precision) around the Megatron ``GPTModel``;
``unwrap`` follows ``[0]`` and ``.module`` through all of them. Call it on one rank only (data-parallel
ranks hold identical copies; rank 0 exports). A module trained in bf16 is exported from its bf16 weights
(exact in fp32) and its reference logits are computed in bf16: verify then needs a looser ``--atol``.
Keep ``reference_ids`` to a few hundred tokens: the reference holds B*T*V fp32 logits (SmolLM2: 192 KiB a token);
it costs one forward pass of the module.

From a saved NeMo 2 checkpoint (``<ckpt>/context`` + ``<ckpt>/weights``): ``export_checkpoint(ckpt, out)``
builds the model in this process as one rank (a gloo world of one unless one exists), loads the weights with
Megatron's ``dist_checkpointing`` and calls ``export_hf_mixtral``; also ``python -m nemo_upcycle.engine.export
CKPT OUT`` (bad input: one ``error:`` line, exit 2, before NeMo is imported). Megatron checkpoints reshard on
load, so the run's own layout does not matter (tested: 1 rank).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Optional

# torch.cuda imports the deprecated pynvml; its FutureWarning would break the entry point's one-line errors (as cli.py),
# so the filter is set before the imports below (noqa: E402): torch, and keymap and verify, which import torch too.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import KEYMAP, KeyMap, Sizes, hf_values, megatron_values, mismatches

# re-exported (F401): the reference reader lives with verify (no NeMo there)
from nemo_upcycle.offline.verify import REFERENCE_FILE, load_reference  # noqa: E402, F401

log = logging.getLogger(__name__)

# weights and marks (not tokenizer files)
_NOT_TOKENIZER = re.compile(r"(config\.json|.*\.safetensors|.*\.bin|.*\.pt|.*\.index\.json|\.nemo-upcycle.*)")


def unwrap(module):
    """The Megatron ``GPTModel`` inside NeMo's wrappers (MegatronParallel, LightningModule, DDP, Float16Module)."""
    from megatron.core.models.gpt import GPTModel as MCoreGPTModel

    m = module
    for _ in range(16):
        if isinstance(m, MCoreGPTModel):
            return m
        if isinstance(m, torch.nn.ModuleList):  # MegatronParallel: one entry per virtual-pipeline chunk
            if len(m) != 1:
                raise UpcycleError(f"the model has {len(m)} pipeline chunks; export from a 1-rank process without "
                                   "virtual pipelining.")
            m = m[0]
        elif isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        else:
            break
    raise UpcycleError(f"no Megatron GPTModel inside {module.__class__.__name__}; pass the trained model "
                       "(LightningModule, MegatronParallel or its .module).")


# ---------------------------------------------------------------------------------------------- checks


EXPORT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "moe_ffn_hidden_size", "share_embeddings_and_output_weights", "layernorm_epsilon", "rotary_base",
                 "scale_factor")


def check_exportable(module, config, hf_llama: dict) -> None:
    """One-line UpcycleError for anything an HF Mixtral directory cannot hold exactly."""
    # 1. one rank holds the whole model
    sizes = {"TP": config.tensor_model_parallel_size, "PP": config.pipeline_model_parallel_size,
             "EP": config.expert_model_parallel_size, "ETP": config.expert_tensor_parallel_size or 1,
             "CP": config.context_parallel_size}
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            sizes.update(TP=max(sizes["TP"], ps.get_tensor_model_parallel_world_size()),
                         PP=max(sizes["PP"], ps.get_pipeline_model_parallel_world_size()),
                         EP=max(sizes["EP"], ps.get_expert_model_parallel_world_size()))
    except ImportError:
        pass
    split = {k: v for k, v in sizes.items() if v != 1}
    whole = getattr(module, "pre_process", True) and getattr(module, "post_process", True)
    if split or not whole:
        what = ", ".join(f"{k}={v}" for k, v in split.items()) or "a pipeline stage"
        raise UpcycleError(f"HF export needs the whole model on one rank, this one is sharded ({what}); export from a "
                           "1-rank process (TP=PP=EP=1), e.g. load the checkpoint there.")
    # 2. every layer is a sparse block (Mixtral has no dense layers)
    for i, layer in enumerate(module.decoder.layers):
        if not hasattr(layer.mlp, "router"):
            raise UpcycleError(f"layer {i} is dense (moe_layer_freq={config.moe_layer_freq!r}) but HF Mixtral has no "
                               "dense layers; train with moe_layer_freq=1 to export to HF.")
    # 3. routing that HF Mixtral + the recorded routing (verify) reproduces
    bad = [k for k in ("moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
                       "moe_input_jitter_eps", "mtp_num_layers") if getattr(config, k, None)]
    if getattr(config, "moe_router_topk_scaling_factor", None) not in (None, 1.0):
        bad.append("moe_router_topk_scaling_factor")
    if bad:
        raise UpcycleError(f"{', '.join(bad)} set: HF Mixtral cannot express this routing; export needs plain top-k "
                           "routing (softmax or sigmoid, pre-softmax or not).")
    act = getattr(config.activation_func, "__name__", "")
    if not (config.gated_linear_unit and act == "silu" and config.normalization == "RMSNorm") \
            or config.add_bias_linear or config.add_qkv_bias or getattr(config, "qk_layernorm", False):
        raise UpcycleError("the model is not a Llama-style MoE (SwiGLU, RMSNorm, no biases, no qk norm); only those "
                           "export to HF Mixtral.")
    # 4. sizes agree with the dense HF config the Mixtral config is written from (the key table's config fields)
    ours, theirs = megatron_values(config), hf_values(hf_llama)
    G = config.upcycle_granularity if hasattr(config, "upcycle_granularity") else 1
    ours["moe_ffn_hidden_size"] = config.moe_ffn_hidden_size
    theirs["moe_ffn_hidden_size"] = theirs["ffn_hidden_size"] // G
    for name, a, b in mismatches(ours, theirs, EXPORT_FIELDS)[:1]:
        name = "scale_factor (Llama 3.1 RoPE)" if name == "scale_factor" else name
        raise UpcycleError(f"the model has {name}={a} but hf_llama_config says {b}; pass the config.json of the "
                           "dense model this MoE was upcycled from.")
    padded = module.embedding.word_embeddings.weight.shape[0]
    if padded < hf_llama["vocab_size"]:
        raise UpcycleError(f"the model's vocabulary ({padded}) is smaller than hf_llama_config's vocab_size "
                           f"({hf_llama['vocab_size']}); pass the dense model's config.json.")


# ---------------------------------------------------------------------------------------------- tensors


class MegatronTensors:
    """HF-named tensors read from one rank's Megatron parameters by the key table; remembers which were used."""

    def __init__(self, module, config, vocab_size: int, keymap: KeyMap = KEYMAP):
        self.params = {n: p for n, p in module.named_parameters()}
        self.used: set[str] = set()
        self.sizes = Sizes.of({**megatron_values(config, rope=False), "vocab_size": vocab_size})
        self.keymap = keymap
        self._last: tuple[Optional[str], tuple[torch.Tensor, ...]] = (None, ())

    def get(self, hf_key: str) -> torch.Tensor:
        """The HF tensor ``hf_key`` (a name of ``formats.mixtral.layout``)."""
        try:
            hit = self.keymap.hf(hf_key)
        except KeyError:
            raise KeyError(f"no Megatron source for {hf_key}") from None
        names = hit.megatron_names()
        name = next((n for n in names if n in self.params), None)
        if name is None:
            raise KeyError(f"the model has no parameter {names[0]}")
        self.used.add(name)
        if self._last[0] != name:  # q, k, v (and w1, w3) are split from one parameter: split it once
            self._last = (name, hit.row.to_hf(self.params[name].detach(), self.sizes))
        return self._last[1][hit.part]

    def check_all_used(self) -> None:
        left = sorted(set(self.params) - self.used)
        if left:
            raise RuntimeError(f"export left {len(left)} Megatron parameters unwritten: {left[:4]}")


# ---------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def reference_logits(module, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The module's logits [B, T, V] (fp32, cut to the HF vocab) in eval mode, dropless (no capacity)."""
    from nemo_upcycle.engine.model import megatron_forward_logits

    if input_ids.dtype != torch.long or input_ids.ndim != 2:
        raise UpcycleError(f"reference_ids must be a LongTensor [B, T], got {input_ids.dtype} {list(input_ids.shape)}.")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise UpcycleError(f"reference_ids hold ids outside 0..{vocab_size - 1}; "
                           "pass tokens of this model's tokenizer.")
    device = next(module.parameters()).device
    config = module.config
    was_training, capacity = module.training, config.moe_expert_capacity_factor
    if capacity is not None and config.moe_pad_expert_input_to_capacity:
        raise UpcycleError("moe_pad_expert_input_to_capacity=true: the reference logits cannot be computed dropless; "
                           "export without reference_ids or train with padding off.")
    module.eval()
    config.moe_expert_capacity_factor = None  # HF Mixtral routes dropless; so does the reference
    try:
        logits = megatron_forward_logits(module, input_ids.to(device))  # (B, T, Vp)
    finally:
        config.moe_expert_capacity_factor = capacity
        module.train(was_training)
    return logits[..., :vocab_size].float().cpu().contiguous()


def save_reference(path: Path, input_ids: torch.Tensor, logits: torch.Tensor, megatron_dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({"input_ids": input_ids.cpu().long().contiguous(), "logits": logits},
              str(path), metadata={"format": "pt", "megatron_dtype": str(megatron_dtype).removeprefix("torch.")})


# ---------------------------------------------------------------------------------------------- export


def _versions() -> dict:
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


def export_hf_mixtral(module, config, out_dir, *, hf_llama_config: dict, tokenizer_dir=None,
                      reference_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, progress: bool = True, info: Optional[dict] = None,
                      max_shard_bytes: int = 2 << 30) -> Path:
    """Write the trained MoE ``module`` (1 rank, whole model) as an HF Mixtral directory; see the module docstring.

    ``hf_llama_config``: the dense model's config.json (dict); ``info``: extra facts for the ``trained`` record of
    config.json (steps, tokens, run directory, ``source``: the dense checkpoint). Returns the output directory.
    """
    from tqdm.auto import tqdm

    from nemo_upcycle.formats.mixtral import layout, mixtral_config, output_bytes
    from nemo_upcycle.formats.moe_dir import is_upcycled_mixtral_dir
    from nemo_upcycle.formats.safetensors_stream import ShardedWriter
    from nemo_upcycle.offline.convert import OUTPUT_KINDS, check_output
    from nemo_upcycle.system.files import check_writable, publish, staging

    out = Path(out_dir).expanduser().absolute()
    check_output(out, overwrite)
    module = unwrap(module)
    config = module.config if config is None else config
    if not hasattr(config, "upcycle_options"):
        raise UpcycleError(f"{config.__class__.__name__} has no upcycling fields; "
                           "pass the UpcycledLlamaConfig of the run.")
    hf = dict(hf_llama_config)
    check_exportable(module, config, hf)
    opts = config.upcycle_options()
    V = hf["vocab_size"]
    megatron_dtype = next(module.parameters()).dtype

    ref_bytes = 0 if reference_ids is None else reference_ids.numel() * (V * 4 + 8)
    needed = output_bytes(hf, opts, dtype) + ref_bytes
    check_writable(out.parent, needed, flag="output")
    plan = layout(hf, opts, dtype)
    specs = [spec for spec, _ in plan]
    with staging(out, needed) as tmp:
        # 2. the proof: the module's own logits, before any weight is written
        reference = None if reference_ids is None else reference_logits(module, reference_ids, V)
        # 3. stream the tensors, in the key table's order
        src = MegatronTensors(module, config, V)
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        with torch.no_grad(), tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="export",
                                   disable=not progress) as bar:
            for spec in specs:
                writer.write(spec.name, src.get(spec.name).to("cpu", spec.dtype))
                bar.update(spec.nbytes)
        writer.close()
        src.check_all_used()  # 4.
        # 5. config, tokenizer, reference
        info = dict(info or {})
        cfg = mixtral_config(hf, opts, dtype, source=info.get("source"))
        cfg["trained"] = {
            **info, "exported_from": "megatron-core GPTModel",
            "megatron_dtype": str(megatron_dtype).removeprefix("torch."),
            "padded_vocab_size": module.embedding.word_embeddings.weight.shape[0],
            "routing": "dropless" if config.moe_expert_capacity_factor is None else
                       f"dropless (trained with capacity factor {config.moe_expert_capacity_factor})",
            "reference": REFERENCE_FILE if reference is not None else None,
            "reference_tokens": int(reference_ids.numel()) if reference is not None else 0, **_versions()}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        if reference is not None:
            save_reference(tmp / REFERENCE_FILE, reference_ids, reference, megatron_dtype)
        if out.exists() and not overwrite:  # made by someone else while this ran
            raise UpcycleError(f"{out} appeared while exporting; choose another output or pass overwrite.")
        publish(tmp, out, "export", kinds=OUTPUT_KINDS, legacy=is_upcycled_mixtral_dir)  # 6.
    log.info("exported %s: %d tensors, %.1f MiB", out, len(specs), writer.bytes_written / 2**20)
    return out


# ---------------------------------------------------------------------------------------------- from a checkpoint

ONE_RANK = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
            "expert_tensor_parallel_size": 1, "context_parallel_size": 1, "sequence_parallel": False,
            "virtual_pipeline_model_parallel_size": None}


@contextlib.contextmanager
def one_rank_world():
    """A gloo process group of one rank with Megatron's parallel state (TP=PP=EP=1), unless one is there already."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    made_group = not dist.is_initialized()
    if made_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise UpcycleError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}; export a checkpoint "
                           "from a separate 1-rank process (python -m nemo_upcycle.engine.export CKPT OUT).")
    made_state = not ps.model_parallel_is_initialized()
    if made_state:
        if not torch.cuda.is_available():
            from nemo_upcycle.engine.cpu import enable_cpu_support

            enable_cpu_support()  # before the seed call: its CUDA RNG tracker is replaced by the CPU one
        ps.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)  # weights are overwritten by the checkpoint; Megatron needs the tracker
    try:
        yield
    finally:
        if made_state:
            ps.destroy_model_parallel()
        if made_group:
            dist.destroy_process_group()


def load_module(ckpt: Path):
    """(Megatron GPTModel with the checkpoint's weights, its config) built here as one rank; needs
    ``one_rank_world``."""
    from megatron.core import dist_checkpointing
    from nemo.lightning.io import load_context

    from nemo_upcycle.engine.cpu import cpu_config_overrides, enable_cpu_support

    try:
        config = load_context(ckpt / "context", subpath="model.config")
    except Exception as e:  # a broken context raises many different errors
        raise UpcycleError(f"{ckpt}/context cannot be read ({e.__class__.__name__}); "
                           "pass a NeMo 2 checkpoint directory.") from None
    for k, v in ONE_RANK.items():
        setattr(config, k, v)
    if not torch.cuda.is_available():
        enable_cpu_support()
        for k, v in {**cpu_config_overrides(), "spec_backend": "local"}.items():
            setattr(config, k, v)
    module = config.configure_model(None)
    prefix = "module."  # NeMo's MegatronParallel saves the model under this prefix
    state = dist_checkpointing.load(module.sharded_state_dict(prefix=prefix), str(ckpt / "weights"))
    # the loaded dict also holds the common (non-model) state Lightning saved: epoch, loops, ...
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return module.eval(), config


def check_checkpoint(ckpt_dir) -> Path:
    """The checkpoint directory, or one line: missing (a broken link, a symlink loop) or not a NeMo 2 checkpoint."""
    from nemo_upcycle.formats.base import locate

    ckpt = locate(ckpt_dir, "a NeMo 2 checkpoint directory (context/ + weights/)")
    if not (ckpt.is_dir() and (ckpt / "context").is_dir() and (ckpt / "weights").is_dir()):
        raise UpcycleError(f"{ckpt} is not a NeMo 2 checkpoint (no context/ and weights/); pass the checkpoint "
                           "directory, e.g. RUN/run/checkpoints/<name>--step=N-last.")
    return ckpt


def export_checkpoint(ckpt_dir, out_dir, *, hf_llama_config: Optional[dict] = None, tokenizer_dir=None,
                      reference_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, progress: bool = True, info: Optional[dict] = None) -> Path:
    """Export a NeMo 2 checkpoint of an upcycled MoE; the dense config and tokenizer default to the checkpoint's own.

    ``hf_llama_config`` defaults to the one implied by the checkpoint's config (pass the dense model's config.json
    to keep its token ids and a vocabulary smaller than the model's); ``tokenizer_dir`` to ``context/nemo_tokenizer``.
    """
    from nemo_upcycle.engine.nemo_source import NeMoDenseSource
    from nemo_upcycle.offline.convert import check_output

    ckpt = check_checkpoint(ckpt_dir)
    check_output(Path(out_dir).expanduser().absolute(), overwrite, protect=[ckpt])
    step = re.search(r"step=(\d+)", ckpt.name)
    info = {"checkpoint": str(ckpt), **({"steps": int(step.group(1))} if step else {}), **(info or {})}
    tok = ckpt / "context" / "nemo_tokenizer"
    if tokenizer_dir is None and tok.is_dir() \
            and any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer_dir = tok
    with one_rank_world():
        module, config = load_module(ckpt)
        hf = hf_llama_config or NeMoDenseSource._hf_config(config)
        return export_hf_mixtral(module, config, out_dir, hf_llama_config=hf, tokenizer_dir=tokenizer_dir,
                                 reference_ids=reference_ids, dtype=dtype, overwrite=overwrite, progress=progress,
                                 info=info)


def main(argv=None) -> int:
    """``python -m nemo_upcycle.engine.export CKPT OUT [--dense-config config.json] [--overwrite]``: bad input is one
    line and exit 2, checked before NeMo is imported (the checkpoint, the output, the dense config)."""
    import argparse

    from nemo_upcycle.offline.convert import check_output

    p = argparse.ArgumentParser(prog="python -m nemo_upcycle.engine.export",
                                description="export a NeMo 2 upcycled-MoE checkpoint as an HF Mixtral directory")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--dense-config", type=Path, default=None, help="the dense model's HF config.json")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        ckpt = check_checkpoint(a.ckpt)
        check_output(Path(a.out).expanduser().absolute(), a.overwrite, protect=[ckpt])
        hf_cfg = None
        if a.dense_config is not None:
            try:
                hf_cfg = json.loads(a.dense_config.read_text())
            except (OSError, ValueError) as e:
                raise UpcycleError(f"cannot read --dense-config {a.dense_config} ({e.__class__.__name__}); pass the "
                                   "dense model's config.json.") from None
            if not isinstance(hf_cfg, dict):
                raise UpcycleError(f"--dense-config {a.dense_config} is not a JSON object; pass a config.json.")
        print(f"wrote {export_checkpoint(ckpt, a.out, hf_llama_config=hf_cfg, overwrite=a.overwrite)}")
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
