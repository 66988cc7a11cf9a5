"""Is a corpus file text? One check for train.py's precheck (a bounded prefix of each file, before anything is built)
and ``data.prepare`` (the whole file, while tokenizing): a path that is missing, a directory, a dangling link, empty
or unreadable is refused, and so is a file with more than ``NOT_TEXT_LIMIT`` of its bytes undecodable as UTF-8 or
NUL (binary data read as text would be tokenized as replacement characters). The bytes are decoded with
``surrogateescape`` (an undecodable byte becomes one lone surrogate), and the surrogates and NULs counted.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from nemo_upcycle.errors import UpcycleError

NOT_TEXT_LIMIT = 0.01  # a corpus file with more than 1% of its bytes undecodable as UTF-8 or NUL is not text
PREFIX_BYTES = 4 << 20  # what check_corpus_file decodes of each file
_NOT_TEXT = re.compile("[\\x00\\udc80-\\udcff]")  # NUL, and each byte surrogateescape could not decode


def not_text_bytes(data: bytes, final: bool = True) -> int:
    """How many bytes of ``data`` are not UTF-8 text: undecodable ones and NUL (``final=False``: a prefix, whose
    last character may be cut)."""
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(data, final=final)
    return sum(1 for _ in _NOT_TEXT.finditer(text))


def not_text_error(path: Path, bad: int, size: int, of: str = "its") -> UpcycleError:
    """``of``: which bytes were judged ("its", "its first", "line 7's")."""
    return UpcycleError(f"corpus file {path} is not text: {bad / size:.1%} of {of} {size} bytes are not UTF-8 "
                        f"(undecodable or NUL; at most {NOT_TEXT_LIMIT:.0%} are accepted); pass text (.txt) or jsonl "
                        "files in UTF-8 (convert with iconv -t UTF-8).")


def check_corpus_file(path: Path, prefix_bytes: int = PREFIX_BYTES) -> int:
    """Refuse a corpus file that is missing, a directory, empty, unreadable or not text (judged on its first
    ``prefix_bytes``); return an upper bound of its tokens (a token covers at least one byte; + EOS and a prefix)."""
    check_path(path)
    size = path.stat().st_size
    if size == 0:
        raise UpcycleError(f"corpus file {path} is empty; pass a file with text in it.")
    try:
        with path.open("rb") as f:
            head = f.read(prefix_bytes)
    except OSError as e:
        raise UpcycleError(f"cannot read corpus file {path} ({e.strerror}); make it readable.") from None
    bad = not_text_bytes(head, final=len(head) == size)
    if bad > NOT_TEXT_LIMIT * len(head):
        raise not_text_error(path, bad, len(head), "its first" if len(head) < size else "its")
    return size + 2


def check_path(path: Path) -> None:
    if path.is_dir():
        raise UpcycleError(f"corpus file {path} is a directory, not a file; pass the files in it (text or jsonl).")
    if path.is_symlink() and not path.exists():
        raise UpcycleError(f"corpus file {path} is a symbolic link that leads nowhere (broken, or a loop); pass the "
                           "file itself.")
    if not path.is_file():
        raise UpcycleError(f"corpus file {path} does not exist; pass existing text or jsonl files in data.paths.")
