"""Megatron indexed datasets (``.bin`` / ``.idx``) written with Megatron-core's own ``IndexedDatasetBuilder``: the
``write`` that ``data.prepare.prepare_corpus`` takes (the format ``tools/preprocess_data.py`` writes and ``GPTDataset``
reads; megatron/core/datasets/indexed_dataset.py). One entry per document.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def write_indexed(prefix: Path, docs: list, dtype) -> None:
    """Write ``prefix.bin`` / ``prefix.idx`` holding ``docs`` (1-D token arrays of ``dtype``), one entry each."""
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(prefix) + ".idx")
