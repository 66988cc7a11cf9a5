"""NeMo-Run recipe: Llama 3.2 1B -> 8x1B MoE, top-2, on one node of 8 H100 (EP8).

The ``run.Partial(llm.train, ...)`` that NeMo's own recipes return, built from ``conf/llama3_2_8x1b_upcycle.yaml`` by
``nemo_upcycle.engine.catalog`` (one source of truth with ``python train.py --config-name=llama3_2_8x1b_upcycle``)::

    import nemo_run as run
    from nemo_upcycle.engine.recipes.llama3_2_8x1b_upcycle import recipe

    partial = recipe(dir="/results/8x1b", **{
        "model.source": "/models/Llama-3.2-1B", "data.paths": ["/data/train.jsonl"]})
    run.run(partial, executor=run.LocalExecutor())      # or run.SlurmExecutor(...): examples/nemo_run_8x8b.py

Keyword overrides are Hydra keys: ``trainer__max_steps=100`` or ``**{"trainer.max_steps": 100}``.
"""

from typing import Optional

import nemo_run as run
from nemo.collections import llm

from nemo_upcycle.engine import catalog

NAME = "llama3_2_8x1b_upcycle"


@run.cli.factory(target=llm.train, name=NAME)
def recipe(dir: Optional[str] = None, name: Optional[str] = None, num_nodes: Optional[int] = None,
           num_gpus_per_node: Optional[int] = None, **overrides) -> run.Partial:
    """``conf/llama3_2_8x1b_upcycle.yaml`` as ``run.Partial(llm.train, ...)``: ``dir`` holds logs and checkpoints
    (default ``outputs/llama3_2_8x1b_upcycle``), ``name`` the logger's run name, ``num_nodes`` / ``num_gpus_per_node``
    replace ``parallel.num_nodes`` / ``parallel.devices``; the layout is re-checked."""
    return catalog.nemo_recipe(NAME, dir=dir, name=name, num_nodes=num_nodes, num_gpus_per_node=num_gpus_per_node,
                               **overrides)
