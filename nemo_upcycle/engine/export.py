"""A trained Megatron-core MoE -> an HF Mixtral directory, with its proof: from a live 1-rank module, or from a
NeMo 2 checkpoint streamed tensor by tensor (any size, any parallel layout).

``export_hf_mixtral(module, config, out_dir, hf_llama_config=...)`` (one rank holding the whole model) writes what
``transformers.MixtralForCausalLM.from_pretrained`` loads, plus ``nemo_reference.safetensors``: token ids and
the Megatron module's own logits on them, which ``nemo-upcycle verify DENSE OUT`` replays with transformers.
Which Megatron parameter holds which HF Mixtral tensor, and how (q/k/v split, fc1 = [w1; w3], padded vocabulary
rows cut), is the key table's (``formats.keymap``); ``lm_head`` is absent when the embeddings are tied. Steps:
refuse what a Mixtral cannot hold (a sharded rank, then ``export_files.check_config_exportable``); if
``reference_ids`` are given, run the module on them (eval mode, its own dtype, dropless) and keep the logits cut to
the HF vocab; then ``export_files.write_export`` (tensors one at a time, staging, config, publish) with
``MegatronTensors``, which proves every Megatron parameter was written. A module trained in bf16 is exported from
its bf16 weights (exact in fp32) and its reference logits are computed in bf16: verify then needs a looser
``--atol``. Keep ``reference_ids`` to a few hundred tokens: the reference holds B*T*V fp32 logits (SmolLM2: 192 KiB a
token); it costs one forward pass of the module.

Getting the bare module out of a NeMo run (``unwrap``): ``trainer.strategy.megatron_parallel`` (a
``MegatronParallel``) holds the LightningModule (``UpcycledLlamaModel``), whose ``.module`` is Megatron's
``DistributedDataParallel`` around ``Float16Module`` (mixed precision) around the Megatron ``GPTModel``;
``unwrap`` follows ``[0]`` and ``.module`` through all of them.

From a saved NeMo 2 checkpoint (``<ckpt>/context`` + ``<ckpt>/weights``), saved at any layout:
``export_checkpoint(ckpt, out)`` streams it (``export_stream``: no model, no process group, one layer's tensor in
memory); with ``reference_ids`` it first builds the whole model here as one rank (``load_module``) to record its
logits. ``python -m nemo_upcycle.engine.export CKPT OUT [--dense-config C] [--dtype D]`` streams without a reference
(bad input: one ``error:`` line, exit 2, before NeMo is imported). At the end of a multi-rank training run,
``engine.export_scale`` records the reference from the live ranks and streams the final checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import warnings
from pathlib import Path
from typing import Optional

# torch.cuda imports the deprecated pynvml; its FutureWarning would break the entry point's one-line errors (as cli.py),
# so the filter is set before the imports below: torch, and keymap and verify, which import torch too.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
import torch

from nemo_upcycle.engine.export_files import (
    check_config_exportable,
    check_reference_ids,
    export_format,
    upcycle_options,
    write_export,
)
from nemo_upcycle.engine.export_stream import (
    CheckpointTensors,
    check_checkpoint,
    checkpoint_config,
    stream_export,
)
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import KEYMAP, KeyMap, Sizes, megatron_values

# re-exported (F401): the reference reader lives with verify (no NeMo there)
from nemo_upcycle.offline.verify import REFERENCE_FILE, load_reference  # noqa: F401

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def check_exportable(module, config, hf_llama: dict) -> None:
    """One-line UpcycleError unless one rank holds the whole model and the config fits a Mixtral
    (``export_files.check_config_exportable``)."""
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
                           "1-rank process (TP=PP=EP=1), or stream its checkpoint: "
                           "python -m nemo_upcycle.engine.export CKPT OUT.")
    check_config_exportable(config, hf_llama, module.embedding.word_embeddings.weight.shape[0])


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

    check_reference_ids(input_ids, vocab_size)
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


# ---------------------------------------------------------------------------------------------- export


def export_hf_mixtral(module, config, out_dir, *, hf_llama_config: dict, tokenizer_dir=None,
                      reference_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, progress: bool = True, info: Optional[dict] = None,
                      max_shard_bytes: int = 2 << 30) -> Path:
    """Write the trained MoE ``module`` (1 rank, whole model) as an HF Mixtral directory; see the module docstring.

    ``hf_llama_config``: the dense model's config.json (dict); ``info``: extra facts for the ``trained`` record of
    config.json (steps, tokens, run directory, ``source``: the dense checkpoint). Returns the output directory.
    """
    from nemo_upcycle.offline.convert import check_output

    out = Path(out_dir).expanduser().absolute()
    check_output(out, overwrite)
    module = unwrap(module)
    config = module.config if config is None else config
    upcycle_options(config)
    hf = dict(hf_llama_config)
    check_exportable(module, config, hf)
    megatron_dtype = next(module.parameters()).dtype
    # the proof: the module's own logits, before any weight is written
    reference = None if reference_ids is None else \
        (reference_ids, reference_logits(module, reference_ids, hf["vocab_size"]), megatron_dtype)
    src = MegatronTensors(module, config, hf["vocab_size"], export_format(config, hf).keymap)
    trained = {**(info or {}), "exported_from": "megatron-core GPTModel",
               "megatron_dtype": str(megatron_dtype).removeprefix("torch."),
               "padded_vocab_size": module.embedding.word_embeddings.weight.shape[0]}
    return write_export(out, src.get, config=config, hf=hf, trained=trained, dtype=dtype, tokenizer_dir=tokenizer_dir,
                        reference=reference, check_used=src.check_all_used, overwrite=overwrite, progress=progress,
                        max_shard_bytes=max_shard_bytes)


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
    """(Megatron GPTModel with the checkpoint's weights, its config) built here as one rank, whole: for a model that
    fits in one process; needs ``one_rank_world``."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.engine.cpu import cpu_config_overrides, enable_cpu_support

    config = checkpoint_config(ckpt)
    for k, v in ONE_RANK.items():
        setattr(config, k, v)
    # the vocabulary as saved: padded for the saving run's TP, which one rank would pad less
    config.vocab_size = CheckpointTensors.stored_rows(ckpt / "weights", "embedding.word_embeddings.weight")
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


def export_checkpoint(ckpt_dir, out_dir, *, hf_llama_config: Optional[dict] = None, tokenizer_dir=None,
                      reference_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, progress: bool = True, info: Optional[dict] = None) -> Path:
    """Export a NeMo 2 checkpoint of an upcycled MoE, streamed tensor by tensor (``export_stream``); the dense config
    and tokenizer default to the checkpoint's own.

    ``hf_llama_config`` defaults to the one implied by the checkpoint's config (pass the dense model's config.json
    to keep its token ids and a vocabulary smaller than the model's); ``tokenizer_dir`` to ``context/nemo_tokenizer``.
    ``reference_ids``: also record the model's logits on them, which builds the whole model in this process first
    (``load_module``, one rank): only for a model that fits in memory.
    """
    from nemo_upcycle.engine.nemo_source import NeMoDenseSource
    from nemo_upcycle.offline.convert import check_output

    ckpt = check_checkpoint(ckpt_dir)
    check_output(Path(out_dir).expanduser().absolute(), overwrite, protect=[ckpt])
    tok = ckpt / "context" / "nemo_tokenizer"
    if tokenizer_dir is None and tok.is_dir() \
            and any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer_dir = tok
    config, reference = checkpoint_config(ckpt), None
    hf = dict(hf_llama_config or NeMoDenseSource._hf_config(config))
    if reference_ids is not None:
        check_reference_ids(reference_ids, hf["vocab_size"])
        with one_rank_world():
            module, _ = load_module(ckpt)
            megatron_dtype = next(module.parameters()).dtype
            reference = (reference_ids, reference_logits(module, reference_ids, hf["vocab_size"]), megatron_dtype)
            del module
    return stream_export(ckpt, out_dir, config=config, hf_llama_config=hf, tokenizer_dir=tokenizer_dir,
                         reference=reference, dtype=dtype, overwrite=overwrite, progress=progress, info=info)


def main(argv=None) -> int:
    """``python -m nemo_upcycle.engine.export CKPT OUT [--dense-config config.json] [--overwrite]``: bad input is one
    line and exit 2, checked before NeMo is imported (the checkpoint, the output, the dense config)."""
    import argparse

    from nemo_upcycle.offline.convert import check_output

    p = argparse.ArgumentParser(prog="python -m nemo_upcycle.engine.export",
                                description="export a NeMo 2 upcycled-MoE checkpoint as an HF Mixtral directory, "
                                            "streamed tensor by tensor (any size, any parallel layout)")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--dense-config", type=Path, default=None, help="the dense model's HF config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the exported tensors")
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
        out = export_checkpoint(ckpt, a.out, hf_llama_config=hf_cfg, overwrite=a.overwrite, dtype=DTYPES[a.dtype])
        print("note: no reference logits (no model in this process): nemo-upcycle verify DENSE OUT compares the "
              "export with the dense model, which a checkpoint matches at step 0 only", file=sys.stderr)
        print(f"wrote {out}")
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
