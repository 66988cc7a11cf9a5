"""NeMo-Run recipes: one module per top-level ``conf/<name>.yaml``, each with ``NAME`` and ``recipe(dir=None,
name=None, num_nodes=None, num_gpus_per_node=None, **overrides) -> run.Partial(llm.train, ...)``, registered like
NeMo's own recipes (``@run.cli.factory(target=llm.train, name=NAME)``) and built by ``nemo_upcycle.engine.catalog`` from
the YAML. ``nemo-upcycle recipes`` lists them. Importing this package does not import NeMo; ``get`` does.

    from nemo_upcycle.engine.recipes import get
    partial = get("llama3_8x8b_upcycle")(dir="/results/8x8b")
"""

from __future__ import annotations

import importlib

from nemo_upcycle.config.compose import check_name, recipe_names


def names() -> list[str]:
    """The recipe names (the top-level YAML files in conf/)."""
    return recipe_names()


def get(name: str):
    """The ``recipe`` function of ``engine/recipes/<name>.py``."""
    check_name(name)
    return importlib.import_module(f"{__name__}.{name}").recipe
