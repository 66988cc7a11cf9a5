"""Several dense sources for one MoE (``core.sources``): opened, checked against the base up front, and read.

``open_expert_sources(base, paths)`` opens each path (``formats.base.open_dense``) and refuses, in one line naming the
source, one whose architecture or sizes differ from the base's (every shape field of the key table, the vocabulary,
tied embeddings, RoPE base and scaling, norm epsilon) or whose tokenizer differs (the tokenizer files' contents; a
source without tokenizer files cannot be checked and is refused when the base has them). ``SourceSet`` gives
``get(key)`` for the tensors outside the experts (the base's, or the mean of the expert sources') and one
``read_dense_mlp`` per expert source.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

from nemo_upcycle.core.sources import average
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import SIZE_KEYS, DenseSource, open_dense, read_dense_mlp

CHECKED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what defines the ids (not special-token maps)
OTHER_KEYS = ("vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "rope_scaling")


def tokenizer_digest(src: DenseSource) -> dict:
    """name -> sha256 of the tokenizer files that define the ids (a GGUF: its tokens, by the saved tokenizer.json)."""
    import tempfile

    d = src.path if src.path.is_dir() else None
    if d is None:  # a GGUF: the tokenizer transformers builds from it
        with tempfile.TemporaryDirectory() as tmp:
            src.save_tokenizer(Path(tmp))
            return {n: hashlib.sha256((Path(tmp) / n).read_bytes()).hexdigest()
                    for n in CHECKED_TOKENIZER_FILES if (Path(tmp) / n).is_file()}
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in CHECKED_TOKENIZER_FILES if (d / n).is_file()}


def check_same_model(base: DenseSource, other: DenseSource) -> None:
    a, b = base.config, other.config
    for k in SIZE_KEYS:
        x, y = (base.head_dim, other.head_dim) if k == "head_dim" else (a.get(k), b.get(k))
        if k == "num_key_value_heads":
            x, y = x or a["num_attention_heads"], y or b["num_attention_heads"]
        if x != y and k != "max_position_embeddings":
            raise UpcycleError(f"expert source {other.path} has {k}={y} but the base {base.path} has {x}; every "
                               "expert source must have the base's architecture and sizes.")
    for k in OTHER_KEYS:
        x, y = base.config.get(k), other.config.get(k)
        same = math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) and isinstance(y, float) else x == y
        if not same:
            raise UpcycleError(f"expert source {other.path} has {k}={y} but the base {base.path} has {x}; every "
                               "expert source must be the base's architecture (fine-tuned copies of one model).")


def check_same_tokenizer(base: DenseSource, other: DenseSource, base_digest: dict) -> None:
    theirs = tokenizer_digest(other)
    if base_digest and theirs != base_digest:
        what = "has no tokenizer files" if not theirs else "has another tokenizer"
        raise UpcycleError(f"expert source {other.path} {what} than the base {base.path} "
                           f"({', '.join(sorted(base_digest))} differ); the sources must share one tokenizer.")


def open_expert_sources(base: DenseSource, paths: Sequence) -> list[DenseSource]:
    """Open and check every expert source against the base (module docstring)."""
    if not paths:
        return []
    digest = tokenizer_digest(base)
    out = []
    for p in paths:
        src = base if Path(p).expanduser().resolve() == base.path.resolve() else open_dense(p)
        check_same_model(base, src)
        if src is not base:
            check_same_tokenizer(base, src, digest)
        out.append(src)
    return out


class SourceSet:
    """The base and its expert sources: ``get`` for the non-expert tensors, ``mlp_readers`` for the experts."""

    def __init__(self, base: DenseSource, experts: Sequence[DenseSource], non_expert: str = "base"):
        self.base, self.experts, self.non_expert = base, list(experts), non_expert

    def get(self, key: str):
        if self.non_expert == "average" and self.experts:
            return average([s.get(key) for s in self.experts])
        return self.base.get(key)

    def mlp_readers(self) -> list:
        return [(lambda layer, s=s: read_dense_mlp(s.get, layer)) for s in (self.experts or [self.base])]

    def record(self) -> dict:
        return {"base": str(self.base.path), "expert_sources": [str(s.path) for s in self.experts],
                "non_expert": self.non_expert}
