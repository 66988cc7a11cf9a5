"""``python train.py [--config-name=NAME] [key=value ...]``: the Hydra entry point of nemo-upcycle, kept at the
repository root for the README's commands and cluster scripts; the code is ``nemo_upcycle/apps/train.py`` (also
``python -m nemo_upcycle.apps.train``). The guard matters: distributed-checkpoint workers re-import ``__main__``."""

from nemo_upcycle.apps.train import cli_main

if __name__ == "__main__":
    cli_main()
