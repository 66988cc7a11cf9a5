"""NeMo-Run recipes: one module per top-level ``conf/<name>.yaml``, each with ``NAME`` and ``recipe(dir=None,
name=None, num_nodes=None, num_gpus_per_node=None, **overrides) -> run.Partial(llm.train, ...)`` built from the YAML by
``nemo_upcycle.engine.catalog``, and registered as NeMo's own recipes are (``@run.cli.factory(target=llm.train,
name=NAME)``).

Importing this package imports every recipe module, so every recipe is registered. NeMo-Run imports it through the
``nemo_run.cli`` entry point in ``setup.cfg`` (as NeMo's ``llm = nemo.collections.llm``), which is how
``nemo llm train --factory llama3_8x8b_upcycle --dryrun`` finds our recipes.
"""

import importlib

from nemo_upcycle.config.compose import recipe_names

for _name in recipe_names():
    importlib.import_module(f"{__name__}.{_name}")
