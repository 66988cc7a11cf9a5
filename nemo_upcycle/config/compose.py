"""The recipes: every top-level ``conf/<name>.yaml`` (shipped inside the package) composed with Hydra's compose API
and validated into a ``RunConfig``, the one source of truth for ``train.py``, the NeMo-Run recipes
(``engine.catalog``), ``nemo-upcycle recipes`` and ``compare``.

  compose(name, overrides=())         -> RunConfig (Hydra overrides ``group.key=value``; bad input: UpcycleError
                                         naming the key)
  recipe_names()                      -> the top-level YAML names in conf/
  describe(name)                      -> the YAML's first comment line
  overrides_from_kwargs(kwargs, ...)  -> Hydra overrides from Python keywords (NeMo recipe arguments)

``conf/`` ships inside the package; ``$NEMO_UPCYCLE_CONF`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from nemo_upcycle.config.schema import RunConfig, register
from nemo_upcycle.config.validate import validate
from nemo_upcycle.errors import UpcycleError

CONF_ENV = "NEMO_UPCYCLE_CONF"
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)  # what bad overrides or a missing recipe raise in compose


def composition_error(e: Exception) -> UpcycleError:
    """A Hydra / OmegaConf composition error as one line (its cause's first words appended)."""
    cause = f": {' '.join(str(e.__cause__).split()[:40])}" if e.__cause__ else ""
    return UpcycleError(f"{' '.join(str(e).split())}{cause}")


def conf_dir() -> Path:
    """The Hydra config directory: ``conf/`` at the repository root next to this package, else
    ``$NEMO_UPCYCLE_CONF``."""
    here = Path(__file__).resolve().parent.parent / "conf"  # nemo_upcycle/conf
    if here.is_dir():
        return here
    env = os.environ.get(CONF_ENV)
    if env and Path(env).is_dir():
        return Path(env).resolve()
    raise UpcycleError(f"no recipe directory: {here} does not exist and {CONF_ENV} is "
                       f"{'unset' if not env else repr(env) + ', not a directory'}; "
                       f"set {CONF_ENV} to the repository's conf/.")


def recipe_names() -> list[str]:
    """The recipes: the top-level ``conf/*.yaml`` files, sorted."""
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))


def check_name(name: str) -> None:
    names = recipe_names()
    if name not in names:
        raise UpcycleError(f"unknown recipe {name!r}; choose one of: {', '.join(names)}.")


def describe(name: str) -> str:
    """The YAML's first comment line, cut before a parenthesis it leaves open (the one-line description)."""
    check_name(name)
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

    check_name(name)
    register()
    outer = Singleton._instances.pop(GlobalHydra, None)  # inside a Hydra app (train.py): compose beside it
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    except COMPOSE_ERRORS as e:  # unknown key, wrong type, bad override syntax: bad input, not a bug
        raise composition_error(e) from None
    finally:
        if outer is not None:
            Singleton._instances[GlobalHydra] = outer
    return validate(cfg)


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
    raise UpcycleError(f"cannot pass a {type(v).__name__} as a recipe override; "
                       "use a number, string, bool, None or list.")


def overrides_from_kwargs(kwargs: dict, num_nodes: Optional[int] = None,
                          num_gpus_per_node: Optional[int] = None) -> list[str]:
    """Python keywords -> Hydra overrides: ``trainer__max_steps=10`` or ``**{"trainer.max_steps": 10}``;
    ``num_nodes`` / ``num_gpus_per_node`` (NeMo's recipe arguments) set ``parallel.num_nodes`` /
    ``parallel.devices``."""
    out = [f"{k.replace('__', '.')}={_override_value(v)}" for k, v in kwargs.items()]
    if num_nodes is not None:
        out.append(f"parallel.num_nodes={int(num_nodes)}")
    if num_gpus_per_node is not None:
        out.append(f"parallel.devices={int(num_gpus_per_node)}")
    return out
