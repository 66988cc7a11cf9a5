"""What ``compare``'s data-aware variants need beyond their Hydra overrides (issue 15).

  calibrated  (importance / clustering splits, kmeans router): the recipe's corpus is the calibration text by default
              (``upcycle.calibration`` null); a recipe on mock data gets the first Shakespeare text of the
              ``shakespeare`` package as calibration text (training data unchanged).
  prompts     (hidden router, mergekit-moe's ``gate_mode: hidden``): one prompt file per expert, written once under
              ``OUT/router_prompts_<E>/``: expert i gets 2000 characters of calibration text file i mod n, from offset
              (i div n) x 20000 -- different plays for different experts with the Shakespeare corpus.
A user override (``upcycle.calibration=...``, ``upcycle.router_prompts=...``) comes later on the command line and wins.
"""

from __future__ import annotations

from pathlib import Path

from nemo_upcycle.config.translate import corpus_paths
from nemo_upcycle.data.resources import shakespeare_texts

PROMPT_CHARS, PROMPT_STRIDE = 2000, 20000


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


def data_overrides(v, base, out: Path) -> list[str]:
    """The overrides a data-aware variant needs on this recipe (module docstring); none for the others."""
    extra = calibration_overrides(base) if v.calibrated else []
    if v.prompts:
        extra.append(f"upcycle.router_prompts={write_prompts(base, out, base.moe.num_moe_experts)}")
    return extra
