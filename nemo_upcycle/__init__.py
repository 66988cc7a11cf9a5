"""nemo-upcycle: turn a dense Llama checkpoint into a Mixture-of-Experts and keep training it with NeMo 2.

Sub-packages, bottom to top; each imports only those below it (``tests/test_architecture.py``): ``errors``,
``system``, ``core`` (the upcycling math), ``formats`` (checkpoint readers and writers), ``offline`` (convert,
verify), ``planning``, ``data``, ``config``, ``engine`` (the only one that imports NeMo / Megatron-core), ``apps``.
The CLI is ``nemo-upcycle`` (``nemo_upcycle.apps.cli``); ``python train.py`` runs ``nemo_upcycle.apps.train``.
"""

__version__ = "0.1.0"
