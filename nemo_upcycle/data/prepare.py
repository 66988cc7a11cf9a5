"""Text corpus -> Megatron indexed datasets (``.bin`` / ``.idx``): a train and a validation split, cached by content.

``prepare_corpus`` reads plain-text files (one document per file) and jsonl (one ``{"text": ...}`` per line),
tokenizes each document with an HF tokenizer directory (no special tokens, EOS appended) and writes one entry per
document with the ``write`` it is given (the engine's: Megatron-core's ``IndexedDatasetBuilder``,
``engine.indexed``). The split is by token position: the last ``validation_fraction`` of the concatenated tokens
(at least one window of ``seq_length + 1``) is validation, the document across the cut split in two; together the
splits are exactly the tokenized corpus. The token ids are held in memory (2 bytes each under 65,500 ids, else 4).

Cache entry ``out_dir/<key>/`` (key: the corpus files' paths, sizes and mtimes, the tokenizer files' contents,
seq_length, validation_fraction, the format version): both splits and ``corpus.json``, which alone is read on a hit.
An entry is built in a temporary directory, renamed into place and marked (``system.files``, kind ``data-cache``);
a lock per key makes concurrent ranks wait for the first. A damaged entry is replaced if marked, else moved aside.
Bad input (``data.text`` checks the files) raises ``UpcycleError`` before anything is written. No NeMo import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from nemo_upcycle.data.text import NOT_TEXT_LIMIT, check_path, not_text_bytes, not_text_error
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system.files import (
    MARK,
    FileLock,
    is_ours,
    remove_ours,
    signals_as_exceptions,
    sweep_stale,
    write_errors,
    write_mark,
)

FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")
SPLITS = ("train", "validation")
BATCH_DOCS, BATCH_CHARS = 1024, 8_000_000  # per batched tokenizer call (each .txt file is one document)
SUMMARY = "corpus.json"
# writes one split: (prefix, documents, token dtype) -> prefix.bin / prefix.idx; the engine passes Megatron-core's
# IndexedDatasetBuilder (engine/indexed.py), so this module imports no Megatron
Writer = Callable[[Path, list, type], None]


@dataclass(frozen=True)
class PreparedCorpus:
    """A prepared corpus: Megatron prefixes (``prefix + ".bin"/".idx"``) and what they hold."""

    dir: str
    train_prefix: str
    validation_prefix: str
    train_tokens: int
    validation_tokens: int
    train_documents: int
    validation_documents: int
    tokenizer_size: int
    max_token_id: int
    eos_id: int
    key: str
    reused: bool = False  # True when read from the cache

    def windows(self, seq_length: int) -> tuple[int, int]:
        """(train, validation) samples of seq_length that one epoch of GPTDataset gives (one extra token each)."""
        return (self.train_tokens - 1) // seq_length, (self.validation_tokens - 1) // seq_length


# -------------------------------------------------------------------------------------------- reading


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one corpus file: the whole text of a .txt file, the "text" of each jsonl line.
    Refuses a file with more than ``NOT_TEXT_LIMIT`` of its bytes undecodable or NUL once it has read it."""
    if path.suffix != ".jsonl":
        data = path.read_bytes()
        bad = not_text_bytes(data)
        if bad > NOT_TEXT_LIMIT * len(data):
            raise not_text_error(path, bad, len(data))
        yield data.decode("utf-8", errors="replace")
        return
    bad = size = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line_bad = not_text_bytes(raw)
            bad, size = bad + line_bad, size + len(raw)
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                if line_bad > NOT_TEXT_LIMIT * len(raw):
                    raise not_text_error(path, line_bad, len(raw), f"line {n}'s") from None
                raise UpcycleError(f"corpus file {path} line {n} is not a JSON object; write one "
                                   '{"text": ...} object per line.') from None
            if text is not None and not isinstance(text, str):
                raise UpcycleError(f'corpus file {path} line {n}: "text" is a {type(text).__name__}, not a string; '
                                   'write one {"text": "..."} object per line.')
            if text:
                yield text
    if bad > NOT_TEXT_LIMIT * size:
        raise not_text_error(path, bad, size)


def _check_sources(paths: Sequence) -> list[Path]:
    files = [Path(p) for p in paths]
    if not files:
        raise UpcycleError("no corpus files given; pass text or jsonl files in data.paths.")
    for f in files:
        check_path(f)
    return [f.resolve() for f in files]


def _tokenizer_files(tokenizer_dir: Path) -> dict[str, str]:
    """name -> sha256 of the tokenizer files in the directory (the part of the cache key for the tokenizer)."""
    if not tokenizer_dir.is_dir():
        raise UpcycleError(f"tokenizer directory {tokenizer_dir} does not exist; pass the dense model's tokenizer "
                           "directory (the one holding tokenizer.json).")
    found = {}
    for name in TOKENIZER_FILES:
        f = tokenizer_dir / name
        if f.is_file():
            try:
                found[name] = hashlib.sha256(f.read_bytes()).hexdigest()
            except OSError as e:
                raise UpcycleError(f"cannot read {f} ({e.strerror}); make the tokenizer files readable.") from None
    if not found:
        raise UpcycleError(f"tokenizer directory {tokenizer_dir} holds no tokenizer files "
                           f"({', '.join(TOKENIZER_FILES[:4])}); pass the dense model's tokenizer directory.")
    return found


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        msg = " ".join(str(e).split())[:200]
        raise UpcycleError(f"cannot load the tokenizer in {tokenizer_dir} ({e.__class__.__name__}: {msg}); pass the "
                           "dense model's tokenizer directory (tokenizer.json).") from None


def _check_vocab(tokenizer_dir: Path, size: int, max_id: int, vocab_size: Optional[int]) -> None:
    if vocab_size is not None and (size > vocab_size or max_id >= vocab_size):
        raise UpcycleError(f"tokenizer {tokenizer_dir} has {max(size, max_id + 1)} tokens but the model's vocabulary "
                           f"is {vocab_size}; use the dense model's own tokenizer.")


def _tokenize(files: list[Path], tok, dtype, progress: bool) -> tuple[list[np.ndarray], list[dict]]:
    """Every document of every file as token ids + EOS, in order; per-file counts for the summary.

    Documents of several files go into one batched call (the fast tokenizer spreads a batch over the cores).
    """
    from tqdm.auto import tqdm

    eos = tok.eos_token_id
    docs: list[np.ndarray] = []
    counts = [dict(path=str(f), bytes=f.stat().st_size, documents=0, tokens=0) for f in files]
    bar = tqdm(total=sum(c["bytes"] for c in counts), unit="B", unit_scale=True, desc="tokenizing corpus",
               disable=not progress)
    batch: list[tuple[int, str]] = []  # (file index, text)
    chars = 0

    def flush():
        nonlocal chars
        for (i, _), ids in zip(batch, tok([t for _, t in batch], add_special_tokens=False)["input_ids"]):
            docs.append(np.asarray(ids + [eos], dtype=dtype))
            counts[i]["documents"] += 1
            counts[i]["tokens"] += len(ids) + 1
        bar.update(sum(len(t.encode("utf-8")) for _, t in batch))
        batch.clear()
        chars = 0

    for i, f in enumerate(files):
        n = 0
        for text in read_documents(f):
            if text.strip():
                batch.append((i, text))
                n, chars = n + 1, chars + len(text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                flush()
        if n == 0:
            raise UpcycleError(f"corpus file {f} has no text" + (' (no non-empty "text" field in any line)'
                                                                 if f.suffix == ".jsonl" else "")
                               + "; pass files with text in them.")
    if batch:
        flush()
    bar.close()
    return docs, counts


# -------------------------------------------------------------------------------------------- splitting


def split_position(total_tokens: int, seq_length: int, validation_fraction: float) -> int:
    """Token position where validation starts: the last fraction of the tokens, at least one window each."""
    window = seq_length + 1  # GPTDataset draws seq_length + 1 tokens per sample
    n_val = max(math.ceil(total_tokens * validation_fraction), window)
    if total_tokens - n_val < window:
        raise UpcycleError(f"the corpus has {total_tokens} tokens: too few for one training and one validation window "
                           f"of seq_length {seq_length} (needs at least {max(2 * window, n_val + window)}); add text, "
                           "lower data.seq_length or data.validation_fraction.")
    return total_tokens - n_val


def split_documents(docs: list[np.ndarray], cut: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Documents before token position ``cut`` (train) and from it on (validation); the straddler is split."""
    train, val, pos = [], [], 0
    for d in docs:
        if pos + len(d) <= cut:
            train.append(d)
        elif pos >= cut:
            val.append(d)
        else:
            train.append(d[: cut - pos])
            val.append(d[cut - pos:])
        pos += len(d)
    return train, val


def optimal_dtype(num_ids: int):
    """Token dtype for ``num_ids`` ids: uint16 below 65,500, else int32 (Megatron-core's ``DType.optimal_dtype``,
    what its ``tools/preprocess_data.py`` writes and ``GPTDataset`` reads)."""
    return np.uint16 if num_ids < 65500 else np.int32


# -------------------------------------------------------------------------------------------- cache


def cache_key(files: list[Path], tokenizer_files: dict[str, str], seq_length: int, validation_fraction: float) -> str:
    """Hash of what the prepared data depends on (corpus files by path, size and mtime; tokenizer by contents)."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps(dict(format=FORMAT, sources=stats, tokenizer=tokenizer_files, seq_length=seq_length,
                           validation_fraction=validation_fraction), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _load_cached(entry: Path, key: str) -> Optional[PreparedCorpus]:
    """The summary of a complete cache entry, or None (absent, or files not as recorded)."""
    try:
        s = json.loads((entry / SUMMARY).read_text())
        for split in SPLITS:
            for ext in ("bin", "idx"):
                if (entry / f"{split}.{ext}").stat().st_size != s[split][f"{ext}_bytes"]:
                    return None
    except (OSError, ValueError, KeyError):
        return None
    return _corpus(entry, s, key, reused=True)


def _corpus(entry: Path, s: dict, key: str, reused: bool) -> PreparedCorpus:
    t, v = s["train"], s["validation"]
    return PreparedCorpus(dir=str(entry), train_prefix=str(entry / "train"),
                          validation_prefix=str(entry / "validation"), train_tokens=t["tokens"],
                          validation_tokens=v["tokens"], train_documents=t["documents"],
                          validation_documents=v["documents"], tokenizer_size=s["tokenizer"]["size"],
                          max_token_id=s["tokenizer"]["max_id"], eos_id=s["tokenizer"]["eos_id"], key=key,
                          reused=reused)


@contextmanager
def _key_lock(key: str):
    """Exclusive lock on <tmp>/nemo-upcycle-data-<key>.lock (``files.FileLock``), held while one process prepares that
    entry; removed when released (a killed holder's flock goes with it, its file is reused by the next one).

    The lock lives in the node's temp directory, not in the cache (bad input leaves the cache untouched).
    """

    lock = FileLock(Path(tempfile.gettempdir()) / f"nemo-upcycle-data-{key}.lock")
    try:
        lock.acquire()
    except (ImportError, OSError):
        pass  # no flock or no writable temp directory here: the rename in _build still keeps the entry whole
    try:
        yield
    finally:
        lock.release()


def _set_aside(entry: Path) -> None:
    """A damaged cache entry: removed if nemo-upcycle made it (its mark), else moved aside (never deleted)."""

    if is_ours(entry, ("data-cache",)):
        remove_ours(entry, ("data-cache",))
        return
    aside = entry.with_name(f"{entry.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.rename(entry, aside)
    print(f"warning: cache entry {entry} is damaged and carries no {MARK} mark; moved it to {aside} (not "
          "deleted: remove it yourself) and prepared the corpus again", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- entry point


def prepare_corpus(paths: Sequence, tokenizer_dir, out_dir, *, seq_length: int, validation_fraction: float,
                   vocab_size: Optional[int], write: Writer, progress: bool = True) -> PreparedCorpus:
    """Tokenize ``paths`` into ``out_dir/<key>/{train,validation}.{bin,idx}`` (or reuse them); see the module doc.

    ``vocab_size``: the model's vocabulary; every tokenizer id must be below it (None skips the check).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise UpcycleError(f"validation_fraction is {validation_fraction}; use a value between 0 and 1 (e.g. 0.05).")
    if seq_length < 1:
        raise UpcycleError(f"seq_length is {seq_length}; use a positive sequence length.")
    files = _check_sources(paths)
    tokenizer_dir = Path(tokenizer_dir)
    tok_files = _tokenizer_files(tokenizer_dir)
    key = cache_key(files, tok_files, seq_length, validation_fraction)
    entry = Path(out_dir) / key
    with _key_lock(key):
        if entry.parent.is_dir():

            sweep_stale(entry)  # temporary entries of killed processes
        hit = _load_cached(entry, key)  # also when another rank finished it while we waited for the lock
        if hit is None:
            return _build(files, tokenizer_dir, tok_files, entry, seq_length, validation_fraction, vocab_size,
                          write, progress)
    _check_vocab(tokenizer_dir, hit.tokenizer_size, hit.max_token_id, vocab_size)
    return hit


def _build(files: list[Path], tokenizer_dir: Path, tok_files: dict, entry: Path, seq_length: int,
           validation_fraction: float, vocab_size: Optional[int], write: "Writer", progress: bool) -> PreparedCorpus:
    # 1. tokenize in memory and check, so that bad input leaves nothing behind
    tok = _load_tokenizer(tokenizer_dir)
    size, max_id = len(tok), int(max(tok.get_vocab().values()))
    _check_vocab(tokenizer_dir, size, max_id, vocab_size)
    if tok.eos_token_id is None:
        raise UpcycleError(f"tokenizer {tokenizer_dir} has no EOS token to end documents with; use the dense model's "
                           "own tokenizer (with eos_token in tokenizer_config.json).")
    dtype = optimal_dtype(max_id + 1)
    docs, sources = _tokenize(files, tok, dtype, progress)
    total = sum(len(d) for d in docs)
    cut = split_position(total, seq_length, validation_fraction)
    parts = dict(zip(SPLITS, split_documents(docs, cut)))

    # 2. write a marked temporary directory next to the entry and rename it into place

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-", dir=entry.parent))
    summary = dict(format=FORMAT, key=entry.name, sources=sources, seq_length=seq_length,
                   validation_fraction=validation_fraction, dtype=np.dtype(dtype).name,
                   split=f"token position {cut} of {total}: the documents in order, the last {total - cut} tokens "
                         "are validation",
                   tokenizer=dict(dir=str(tokenizer_dir.resolve()), size=size, max_id=max_id,
                                  eos_id=int(tok.eos_token_id), files=tok_files))
    try:
        with signals_as_exceptions(), write_errors(entry.parent, total * np.dtype(dtype).itemsize):
            write_mark(tmp, "staging", target=str(entry))  # swept by a later run if this process is killed
            for split, split_docs in parts.items():
                write(tmp / split, split_docs, dtype)
                summary[split] = dict(prefix=split, tokens=int(sum(len(d) for d in split_docs)),
                                      documents=len(split_docs), bin_bytes=(tmp / f"{split}.bin").stat().st_size,
                                      idx_bytes=(tmp / f"{split}.idx").stat().st_size)
            (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
            write_mark(tmp, "data-cache", key=entry.name)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            if entry.exists() and _load_cached(entry, entry.name) is None:  # damaged (not as recorded)
                _set_aside(entry)
            os.rename(tmp, entry)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # made above by mkdtemp: this process's own
        # without flock (another node, some network file systems) another process may have renamed its copy first
        hit = _load_cached(entry, entry.name) if isinstance(e, OSError) else None
        if hit is None:
            raise
        return hit
    return _corpus(entry, summary, entry.name, reused=False)


def describe(c: PreparedCorpus) -> str:
    """One line for logs."""
    return (f"corpus {c.key}: train {c.train_tokens} tokens / {c.train_documents} documents, validation "
            f"{c.validation_tokens} tokens / {c.validation_documents} documents{' (cached)' if c.reused else ''} "
            f"in {c.dir}")
