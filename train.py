"""``python train.py [--config-name=NAME] [key=value ...]``: run an upcycling recipe from conf/.

  python train.py                                          # the embedded default: smollm2_135m_upcycle
  python train.py --config-name=llama3_8x8b_upcycle mode=plan   # check the 8x8B layout on any machine
  python train.py --config-name=tiny_llama_upcycle mode=verify
  torchrun --nproc_per_node 2 train.py --config-name=smollm2_135m_upcycle parallel=cpu_2_ep2 mode=train

mode: train | plan | verify (see nemo_upcycle/run.py). Outputs go to Hydra's run directory
(``outputs/<recipe>/<time>``; ``hydra.run.dir=...`` moves it). Bad input: one line ``error: ...``, exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nemo_upcycle.conf_schema import register, validate  # noqa: E402
from nemo_upcycle.errors import UpcycleError  # noqa: E402

register()
EXIT = {"code": 0}


@hydra.main(config_path="conf", config_name="smollm2_135m_upcycle", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.run import dispatch

    try:
        run = validate(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        EXIT["code"] = dispatch(run, HydraConfig.get().job.config_name, out_dir)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        EXIT["code"] = e.exit_code


def precheck(argv: list[str]) -> None:
    """Compose and validate once before Hydra runs, so a bad override or recipe is one line, exit 2, no run dir."""
    from hydra import compose, initialize_config_dir

    name, overrides, run_dir, it = "smollm2_135m_upcycle", [], None, iter(argv)
    for a in it:
        if a.startswith("hydra.run.dir="):
            run_dir = Path(a.split("=", 1)[1])
        elif a.startswith("--config-name=") or a.startswith("-cn="):
            name = a.split("=", 1)[1]
        elif a in ("--config-name", "-cn"):
            name = next(it, name)
        elif not a.startswith("-") and not a.startswith("hydra.") and not a.startswith("hydra/"):
            overrides.append(a)
    try:
        from nemo_upcycle.run import check_run_dir, preflight

        with initialize_config_dir(str(Path(__file__).parent / "conf"), version_base="1.3"):
            run = validate(compose(name, overrides=overrides))
        preflight(run, name)
        if run_dir is not None and run.mode == "train":
            from nemo_upcycle.run_dir import claim

            claim(run_dir)  # refuses a directory another run holds, before Hydra writes its files there
            check_run_dir(run, run_dir)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # Hydra / OmegaConf composition errors: unknown key, wrong type, missing recipe
        cause = f": {' '.join(str(e.__cause__).split()[:40])}" if e.__cause__ else ""
        print(f"error: {' '.join(str(e).split())}{cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from nemo_upcycle.run_dir import die_with_parent_if_asked

    die_with_parent_if_asked()  # started by nemo-upcycle compare: die with it
    precheck(sys.argv[1:])
    main()
    sys.exit(EXIT["code"])
