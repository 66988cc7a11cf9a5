"""A NeMo 2 checkpoint of an upcycled MoE -> an HF MoE directory (Mixtral or Qwen2-MoE), streamed tensor by tensor (any
size, any layout).

Megatron saves every parameter as a global tensor whatever the run's layout (``megatron/core/dist_checkpointing``:
``ShardedTensor`` with global offsets; each rank writes its chunks): checkpoints of the tiny recipe saved at 1 rank,
EP2, PP2 (x VP2) and TP2 + SP hold the same keys with the same global shapes; only the chunking differs. Stored
keys (NeMo's ``module.`` prefix), from ``transformer_layer.py`` / ``moe/experts.py``'s ``sharded_state_dict``:
  per-layer parameters, stacked over the layers   decoder.layers.self_attention.linear_qkv.weight       [L, ...]
  experts, stacked over layers and experts        decoder.layers.mlp.experts.experts.linear_fc1.weight [L, E, 2F, D]
  (a mixed dense / MoE stack is not stacked: decoder.layers.<i>.self_attention.linear_qkv.weight, [E, 2F, D] experts)
  the local spec's norms under Transformer Engine names (``sharded_state_dict_keys_map``), which the key table lists
  as alternatives: decoder.layers.self_attention.linear_qkv.layer_norm_weight, ...mlp.linear_fc1.layer_norm_weight.
A gated fc1 is saved as [gate; up] of the whole tensor (``apply_swiglu_sharded_factory``) and a qkv by query groups,
so the region of one layer (and expert) is the whole Megatron tensor the key table (``formats.keymap``) turns into HF
tensors, at any TP / ETP. ``CheckpointTensors`` reads such a region with PyTorch's distributed-checkpoint reader
(``FileSystemReader``: the saved chunks overlapping it, ``create_read_items_for_chunk_list``) without a process group
or a model: peak memory is one region plus the saved chunk being copied (one expert's fc1 is 2 x 14336 x 4096 for
Llama 3 8B: 235 MB in bf16). The padded vocabulary rows are cut; ``check_all_used`` proves every stored model tensor
(every layer and expert) was written.

``stream_export(ckpt, out, ...)`` writes the directory through ``export_files.write_export`` (the same layout, config,
staging and publish as the 1-rank export). The config comes from ``<ckpt>/context`` (NeMo's ``load_context``).
Reference logits are written only when the caller has them (a live model computed them: the end of a multi-rank run,
``engine.export_scale``; or ``export.export_checkpoint(..., reference_ids=...)`` building the model on one rank);
without them ``nemo-upcycle verify`` can only compare with the dense model, which holds at step 0 only.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.engine.export_files import check_config_exportable, export_format, upcycle_options, write_export
from nemo_upcycle.engine.nemo_source import stacked
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import KEYMAP, KeyMap, Sizes, megatron_values

_LOCAL_EXPERT = "mlp.experts.local_experts.{expert}."
_GROUPED = re.compile(r"mlp\.experts\.(linear_fc[12]\.weight)\{expert\}$")  # TE grouped GEMM: linear_fc1.weight<e>


def stored_location(name: str) -> tuple[str, int]:
    """(stored key, number of leading stacked axes: layer, expert) of a key-table Megatron name with slots."""
    axes = 0
    if "{layer}." in name:
        name, axes = stacked(name), 1
    if _LOCAL_EXPERT in name:
        name, axes = name.replace(_LOCAL_EXPERT, "mlp.experts.experts."), axes + 1
    elif _GROUPED.search(name):
        name, axes = _GROUPED.sub(r"mlp.experts.experts.\1", name), axes + 1
    return name, axes


def _stored_candidates(name: str, layer: Optional[int], expert: Optional[int]) -> list[tuple[str, tuple]]:
    """(stored key, index on its stacked axes) where a key-table name may be stored: stacked over the layers (every
    layer alike), or per layer (a mixed dense / MoE stack: Megatron's block saves heterogeneous layers unstacked)."""
    key, axes = stored_location(name)
    out = [(key, tuple(i for i in (layer, expert)[:axes] if i is not None))]
    if "{layer}." in name and layer is not None:
        key, axes = stored_location(name.replace("{layer}.", f"{layer}."))
        out.append((key, (expert,) if axes and expert is not None else ()))
    return out


class _Slice(io.RawIOBase):
    """``length`` bytes of an open file from ``offset``: one saved item, which ``torch.load`` reads in place (as
    ``torch.distributed.checkpoint.utils._ReaderView`` does)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.offset, self.length = f, offset, length
        f.seek(offset)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos += self.offset
        elif whence == os.SEEK_END:
            pos, whence = self.offset + self.length + pos, os.SEEK_SET
        return self.f.seek(pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.length - self.tell()
        return self.f.readinto(memoryview(b)[:left]) if left > 0 else 0


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, offset, length)
    return t


class CheckpointTensors:
    """HF-named tensors read region by region from ``<ckpt>/weights``; remembers which regions were read."""

    def __init__(self, weights: Path, config, vocab_size: int, keymap: KeyMap = KEYMAP):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            md = FileSystemReader(str(weights)).read_metadata()
        except Exception as e:
            raise UpcycleError(f"{weights} is not a readable distributed checkpoint ({e.__class__.__name__}); "
                               "pass a complete NeMo 2 checkpoint.") from None
        self.weights, self.storage = Path(weights), md.storage_data
        meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.prefix = "module." if any(k.startswith("module.") for k in meta) else ""
        self.meta = {k[len(self.prefix):]: v for k, v in meta.items()
                     if k.startswith(self.prefix) and not k.startswith("optimizer.")}  # the model's tensors
        self.keymap = keymap
        emb = self.meta.get("embedding.word_embeddings.weight")
        if emb is None:
            raise UpcycleError(f"{weights} holds no embedding.word_embeddings.weight; pass a NeMo 2 checkpoint of a "
                               "GPT model.")
        self.dtype, self.padded_vocab = emb.properties.dtype, emb.size[0]
        self.sizes = Sizes.of({**megatron_values(config, rope=False), "vocab_size": vocab_size}, self.padded_vocab)
        self.read: dict[str, set[tuple[int, ...]]] = {}
        self._last: tuple[Optional[tuple], tuple[torch.Tensor, ...]] = (None, ())

    @staticmethod
    def stored_rows(weights: Path, key: str) -> int:
        """The first dimension of the stored model tensor ``key`` (metadata only)."""
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
        hit = meta.get("module." + key, meta.get(key))
        if hit is None:
            raise UpcycleError(f"{weights} holds no {key}; pass a NeMo 2 checkpoint of a GPT model.")
        return hit.size[0]

    def region(self, key: str, index: tuple[int, ...]) -> torch.Tensor:
        """The stored tensor ``key`` at ``index`` of its leading (stacked) axes, whole: the saved chunks that overlap
        it, copied into place (a region saved as one chunk is that chunk, not copied)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.meta[key]
        size = tuple(md.size)
        if len(index) > len(size) or any(not 0 <= i < n for i, n in zip(index, size)):
            raise UpcycleError(f"the checkpoint's {key} is {list(size)}; it has no index {list(index)} (the checkpoint "
                               "does not match its context).")
        shape = (1,) * len(index) + size[len(index):]
        chunk = ChunkStorageMetadata(torch.Size(tuple(index) + (0,) * (len(size) - len(index))), torch.Size(shape))
        items = create_read_items_for_chunk_list(self.prefix + key, md, [chunk])
        numel = torch.Size(shape).numel()
        covered = sum(torch.Size(it.lengths).numel() for it in items)
        if covered != numel:
            raise UpcycleError(f"the checkpoint holds {covered} of the {numel} elements of {key}{list(index)}; "
                               "it is incomplete (a rank's files missing?): pass a complete checkpoint.")
        if len(items) == 1:
            out = self._read(items[0])
        else:
            out = torch.empty(shape, dtype=md.properties.dtype)
            for it in items:
                _narrow(out, it.dest_offsets, it.lengths).copy_(self._read(it))
        self.read.setdefault(key, set()).add(tuple(index))
        return out.reshape(size[len(index):])

    def _read(self, item) -> torch.Tensor:
        """One read item: its saved chunk loaded from its file (as ``FileSystemReader.read_data``), narrowed."""
        info = self.storage[item.storage_index]
        if info.transform_descriptors:
            raise UpcycleError(f"{self.weights} stores {item.storage_index.fqn} transformed "
                               f"({info.transform_descriptors}); re-save the checkpoint without storage transforms.")
        with open(self.weights / info.relative_path, "rb") as f:
            t = torch.load(_Slice(f, info.offset, info.length), map_location="cpu", weights_only=True)
        return _narrow(t, item.storage_offsets, item.lengths)

    def get(self, hf_key: str) -> torch.Tensor:
        """The HF tensor ``hf_key`` (a name of ``formats.mixtral.layout``)."""
        try:
            hit = self.keymap.hf(hf_key)
        except KeyError:
            raise KeyError(f"no Megatron source for {hf_key}") from None
        found = [(k, index) for name in hit.row.megatron for k, index in _stored_candidates(name, hit.layer, hit.expert)
                 if k in self.meta]
        if not found:
            raise UpcycleError(f"the checkpoint has no {stored_location(hit.row.megatron[0])[0]} (for {hf_key}); "
                               "pass a NeMo 2 checkpoint of an upcycled MoE.")
        key, index = found[0]
        if self._last[0] != (key, index):  # q, k, v (and w1, w3) come from one region: read it once
            self._last = ((key, index), hit.row.to_hf(self.region(key, index), self.sizes))
        return self._last[1][hit.part]

    def check_all_used(self) -> None:
        """Every stored model tensor, every layer and expert of it, was read."""
        left = []
        for key, md in self.meta.items():
            done = self.read.get(key)
            if not done:
                left.append(key)
                continue
            axes = len(next(iter(done)))
            want = 1
            for n in md.size[:axes]:
                want *= n
            if len(done) != want:
                left.append(f"{key} ({len(done)} of {want} regions)")
        if left:
            raise RuntimeError(f"export left {len(left)} stored tensors unwritten: {sorted(left)[:4]}")


# ---------------------------------------------------------------------------------------------- the checkpoint


def check_checkpoint(ckpt_dir) -> Path:
    """The checkpoint directory, or one line: missing (a broken link, a symlink loop) or not a NeMo 2 checkpoint."""
    from nemo_upcycle.formats.base import locate

    ckpt = locate(ckpt_dir, "a NeMo 2 checkpoint directory (context/ + weights/)")
    if not (ckpt.is_dir() and (ckpt / "context").is_dir() and (ckpt / "weights").is_dir()):
        raise UpcycleError(f"{ckpt} is not a NeMo 2 checkpoint (no context/ and weights/); pass the checkpoint "
                           "directory, e.g. RUN/run/checkpoints/<name>--step=N-last.")
    return ckpt


def checkpoint_config(ckpt: Path):
    """The model config saved in ``<ckpt>/context`` (NeMo's ``load_context``)."""
    from nemo.lightning.io import load_context

    try:
        return load_context(ckpt / "context", subpath="model.config")
    except Exception as e:  # a broken context raises many different errors
        raise UpcycleError(f"{ckpt}/context cannot be read ({e.__class__.__name__}); "
                           "pass a NeMo 2 checkpoint directory.") from None


def checkpoint_info(ckpt: Path, info: Optional[dict] = None) -> dict:
    step = re.search(r"step=(\d+)", ckpt.name)
    return {"checkpoint": str(ckpt), **({"steps": int(step.group(1))} if step else {}), **(info or {})}


def stream_export(ckpt_dir, out_dir, *, config=None, hf_llama_config: Optional[dict] = None, tokenizer_dir=None,
                  reference=None, dtype: torch.dtype = torch.float32, overwrite: bool = False, progress: bool = True,
                  info: Optional[dict] = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Stream the checkpoint ``ckpt_dir`` into an HF Mixtral directory ``out_dir`` (module docstring).

    ``config``: the model config (default: the checkpoint's context); ``hf_llama_config``: the dense model's
    config.json (default: the one the config implies); ``reference``: (ids, logits, Megatron dtype) computed by the
    caller from the same weights, or None; ``info``: extra facts for config.json's ``trained`` record."""
    from nemo_upcycle.engine.nemo_source import NeMoDenseSource
    from nemo_upcycle.offline.convert import check_output

    ckpt = check_checkpoint(ckpt_dir)
    out = Path(out_dir).expanduser().absolute()
    check_output(out, overwrite, protect=[ckpt])
    config = checkpoint_config(ckpt) if config is None else config
    upcycle_options(config)
    if not getattr(config, "num_moe_experts", None):
        raise UpcycleError(f"{ckpt} holds a dense model (no num_moe_experts); only an upcycled MoE exports to HF "
                           "Mixtral.")
    hf = dict(hf_llama_config or NeMoDenseSource._hf_config(config))
    if reference is not None:  # logits over the padded vocabulary are cut to the HF one
        reference = (reference[0], reference[1][..., :hf["vocab_size"]], reference[2])
    src = CheckpointTensors(ckpt / "weights", config, hf["vocab_size"], export_format(config, hf).keymap)
    check_config_exportable(config, hf, src.padded_vocab)
    trained = {**checkpoint_info(ckpt, info), "exported_from": "megatron-core distributed checkpoint (streamed)",
               "megatron_dtype": str(src.dtype).removeprefix("torch."), "padded_vocab_size": src.padded_vocab}
    return write_export(out, src.get, config=config, hf=hf, trained=trained, dtype=dtype, tokenizer_dir=tokenizer_dir,
                        reference=reference, check_used=src.check_all_used, overwrite=overwrite, progress=progress,
                        max_shard_bytes=max_shard_bytes, protect=[ckpt])
