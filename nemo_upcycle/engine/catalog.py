"""The NeMo-Run recipe catalog: a recipe (``config.compose``) as the ``run.Partial(llm.train, ...)`` NeMo's own recipes
return, built by ``engine.partial.train_partial`` (what ``train.py mode=train`` runs); ``engine/recipes/<name>.py``
call it, and NeMo's ``nemo llm train --factory NAME`` reaches them through the ``nemo_run.cli`` entry point.

The Partial holds no resolved files: the dense source stays the ``model.source`` string. The keywords ``smollm2``
and ``tiny``, and the tokenizer of text data, are resolved when the Partial is built (``fdl.build`` / ``run.run``),
on the machine that runs it (``dense_source``, ``dense_tokenizer``); a CPU recipe's resolution also turns on the
engine's CPU support, so ``run.run(partial, direct=True)`` works without CUDA.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import nemo_run as run

from nemo_upcycle.config.compose import compose, overrides_from_kwargs
from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.config.validate import check_layout
from nemo_upcycle.data.sources import resolve_source, tokenizer_dir
from nemo_upcycle.engine.cpu import enable_cpu_support
from nemo_upcycle.engine.partial import train_partial
from nemo_upcycle.errors import UpcycleError

KEYWORD_SOURCES = ("smollm2", "tiny")


def dense_source(source: str, out_dir: str, tiny: Optional[dict] = None, seed: int = 1234, cpu: bool = False) -> str:
    """Resolve ``model.source`` when the Partial is built: ``smollm2`` -> the PyPI GGUF, ``tiny`` -> a random tiny
    Llama under ``out_dir/dense_tiny`` (``tiny``: the model group's sizes), anything else unchanged. With ``cpu``
    (a CPU recipe) the engine's CPU support is enabled first, before the trainer is built."""
    if cpu:
        enable_cpu_support()
    if source not in KEYWORD_SOURCES:
        return source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return str(resolve_source(source, out, tiny, seed))


def dense_tokenizer(source: str, out_dir: str) -> str:
    """The tokenizer directory for text data, at build time: the source's own, or one written under ``out_dir``."""
    return tokenizer_dir(Path(source), Path(out_dir))


def _sources(r: RunConfig, out_dir: Path):
    """(upcycle source, tokenizer dir) for ``train_partial``: plain strings, or build-time configs."""
    src: Any = r.model.source
    if not src:
        raise UpcycleError("model.source is not set; "
                           "point it at a dense HF Llama directory, .gguf or NeMo 2 checkpoint.")
    cpu = r.parallel.accelerator == "cpu"
    if src in KEYWORD_SOURCES or cpu:
        tiny = dataclasses.asdict(r.model) if src == "tiny" else None
        src = run.Config(dense_source, source=src, out_dir=str(out_dir), tiny=tiny, seed=r.seed, cpu=cpu)
    tok = None if r.data.kind == "mock" else run.Config(dense_tokenizer, source=src, out_dir=str(out_dir))
    return src, tok


# ---------------------------------------------------------------------------------------------------------- Partials
def partial(name: str, overrides: Sequence[str] = (), out_dir: Optional[str | Path] = None):
    """``conf/<name>.yaml`` (+ Hydra overrides) as NeMo's ``run.Partial(llm.train, ...)``; ``out_dir`` (default
    ``outputs/<name>``, relative to where it runs) holds the logs, checkpoints and metrics. ``mode`` is ignored: a
    Partial always trains."""
    r = compose(name, overrides)
    check_layout(r)
    out = Path(out_dir) if out_dir is not None else Path("outputs") / name
    source, tok = _sources(r, out)
    return train_partial(r, out, source, tok)


def nemo_recipe(recipe_name: str, dir: Optional[str] = None, name: Optional[str] = None,
                num_nodes: Optional[int] = None, num_gpus_per_node: Optional[int] = None, **overrides):
    """The body of every ``recipes/<name>.py``: NeMo's recipe arguments (``dir``, ``name``, ``num_nodes``,
    ``num_gpus_per_node``) plus config overrides as keywords; ``name`` names the NeMo logger's run (default ``run``,
    as in ``train.py``)."""
    p = partial(recipe_name, overrides_from_kwargs(overrides, num_nodes, num_gpus_per_node), out_dir=dir)
    if name is not None:
        p.log.name = name
    return p
