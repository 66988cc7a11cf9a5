"""NeMo-Run recipe: SmolLM2-135M -> 8 experts, top-2, on Shakespeare: the CPU recipe.

The ``run.Partial(llm.train, ...)`` that NeMo's own recipes return, built from ``conf/smollm2_135m_upcycle.yaml`` by
``nemo_upcycle.engine.catalog`` (one source of truth with ``python train.py --config-name=smollm2_135m_upcycle``)::

    import nemo_run as run
    from nemo_upcycle.engine.recipes.smollm2_135m_upcycle import recipe

    partial = recipe(dir="outputs/smollm2", trainer__max_steps=5)
    run.run(partial, executor=run.LocalExecutor())      # or run.SlurmExecutor(...): examples/nemo_run_8x8b.py

Keyword overrides are Hydra keys: ``trainer__max_steps=100`` or ``**{"trainer.max_steps": 100}``.
"""

from typing import Optional

import nemo_run as run
from nemo.collections import llm

from nemo_upcycle.engine import catalog

NAME = "smollm2_135m_upcycle"


@run.cli.factory(target=llm.train, name=NAME)
def recipe(dir: Optional[str] = None, name: Optional[str] = None, num_nodes: Optional[int] = None,
           num_gpus_per_node: Optional[int] = None, **overrides) -> run.Partial:
    """``conf/smollm2_135m_upcycle.yaml`` as ``run.Partial(llm.train, ...)``: ``dir`` holds logs and checkpoints
    (default ``outputs/smollm2_135m_upcycle``), ``name`` the logger's run name, ``num_nodes`` / ``num_gpus_per_node``
    replace ``parallel.num_nodes`` / ``parallel.devices``; the layout is re-checked."""
    return catalog.nemo_recipe(NAME, dir=dir, name=name, num_nodes=num_nodes, num_gpus_per_node=num_gpus_per_node,
                               **overrides)
