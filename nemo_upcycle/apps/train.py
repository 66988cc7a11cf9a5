"""The Hydra entry point: ``python train.py [--config-name=NAME] [key=value ...]`` (the repository's ``train.py`` is a
shim) or ``python -m nemo_upcycle.apps.train ...``: run an upcycling recipe from ``nemo_upcycle/conf/``.

  python train.py                                               # the embedded default: smollm2_135m_upcycle
  python train.py --config-name=llama3_8x8b_upcycle mode=plan   # check the 8x8B layout on any machine
  python train.py --config-name=tiny_llama_upcycle mode=verify
  torchrun --nproc_per_node 2 train.py --config-name=smollm2_135m_upcycle parallel=cpu_2_ep2 mode=train

mode: train | plan | verify (``apps.modes``). Outputs go to Hydra's run directory (``outputs/<recipe>/<time>``;
``hydra.run.dir=...`` moves it). Bad input: one line ``error: ...``, exit code 2, printed by rank 0 only under
torchrun / srun; refused before Hydra makes the run directory (``precheck``), or, for what only the build finds
(a corpus too small once tokenized), with the run directory this invocation made removed again.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from nemo_upcycle.apps.modes import dispatch, preflight
from nemo_upcycle.apps.precheck import launcher_overrides
from nemo_upcycle.apps.run_dir import IDENTITY_FILE, check_run_dir, claim, die_with_parent_if_asked
from nemo_upcycle.config.compose import COMPOSE_ERRORS, composition_error, conf_dir
from nemo_upcycle.config.schema import register
from nemo_upcycle.config.validate import KEYS, validate
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system.files import remove_ours, write_mark
from nemo_upcycle.system.launcher import is_rank0, launcher_name, launcher_world, note, refuse

register()
EXIT = {"code": 0}
DEFAULT_RECIPE = "smollm2_135m_upcycle"  # the embedded default: `python train.py`
RUN_DIR: dict = {}  # precheck's record: "checked", "path" (absolute), "made" (its highest ancestor then absent)


@hydra.main(config_path="../conf", config_name=DEFAULT_RECIPE, version_base="1.3")
def main(cfg: DictConfig) -> None:

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    made = cfg.get("mode") == "train" and made_here(out_dir)
    try:
        run = validate(cfg)
        hc = HydraConfig.get()
        EXIT["code"] = dispatch(run, hc.job.config_name, out_dir, prechecked=RUN_DIR.get("checked", False)
                                and hc.mode == RunMode.RUN)
    except UpcycleError as e:
        if made and getattr(e, "before_start", False):
            remove_run_dir(out_dir)
        if is_rank0():
            print(f"error: {e.render(KEYS)}", file=sys.stderr)  # a refusal from below, in the recipe's keys
        EXIT["code"] = e.exit_code


def made_here(out_dir: Path) -> bool:
    """Whether this invocation (one process) made the run directory, which precheck saw absent; if so, mark it."""

    if RUN_DIR.get("made") is None or out_dir.resolve() != RUN_DIR["path"] or (launcher_world() or 1) > 1:
        return False
    write_mark(out_dir, "train-run")
    return True


def remove_run_dir(out_dir: Path) -> None:
    """A run refused before it started (data, source) leaves nothing: the run directory this invocation made (marked,
    no run_identity.json, no checkpoints) is removed, with the empty parents it made."""

    if (out_dir / IDENTITY_FILE).exists() or (out_dir / "run" / "checkpoints").exists():
        return
    remove_ours(out_dir, ("train-run",))
    d, top = out_dir.parent, RUN_DIR["made"]
    while top in (d, *d.parents) and d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        d = d.parent


def _run_dir(cfg, given: Optional[Path]) -> Path:
    """hydra.run.dir as Hydra will make it (a given one, or the recipe's pattern resolved now)."""
    if given is not None:
        return given
    from hydra.core.hydra_config import HydraConfig as HC
    from omegaconf import OmegaConf

    HC.instance().set_config(cfg)
    return Path(OmegaConf.select(cfg, "hydra.run.dir"))


def precheck(argv: list[str]) -> list[str]:
    """Compose and validate once before Hydra runs, so a bad override or recipe, a bad source or corpus, a run too
    big for this machine or a launcher world that is not the recipe's is one line (printed by rank 0 only), exit 2,
    and no run directory. Returns argv with ``hydra.run.dir`` pinned to the directory checked here."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    name, overrides, run_dir, it = DEFAULT_RECIPE, [], None, iter(argv)
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

        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(name, overrides=overrides, return_hydra_config=True)
            world = launcher_overrides(cfg)
            if world:  # the processes the launcher started are the world: take it (logged once)
                note(f"{launcher_name()} started its processes as {' '.join(world)}; the recipe said "
                     f"parallel.num_nodes={cfg.parallel.num_nodes} parallel.devices={cfg.parallel.devices}")
                overrides, argv = overrides + world, [*argv, *world]
                cfg = compose(name, overrides=overrides, return_hydra_config=True)
            pinned = _run_dir(cfg, run_dir)
            with open_dict(cfg):
                del cfg["hydra"]
            run = validate(cfg)
        preflight(run, name)
        if run.mode == "train":

            claim(pinned)  # refuses a directory another run holds, before Hydra writes its files there
            check_run_dir(run, pinned)
        RUN_DIR["checked"] = True
    except UpcycleError as e:
        refuse(e, KEYS)
    except COMPOSE_ERRORS as e:  # unknown key, wrong type, missing recipe, bad override syntax: bad input
        refuse(composition_error(e))
    if "${" not in str(pinned):
        full = Path(os.path.abspath(pinned))  # as Hydra makes it
        absent = [d for d in (full, *full.parents) if not d.exists()]
        RUN_DIR.update(path=pinned.resolve(), made=absent[-1] if absent else None)
        if run_dir is None:
            argv = [*argv, f"hydra.run.dir={_quote(str(pinned))}"]
    return argv


def _quote(value: str) -> str:
    """A Hydra override value: as is when plain, else single-quoted."""
    if all(c.isalnum() or c in "/._-:+" for c in value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def cli_main() -> None:
    """What ``python train.py`` runs: the precheck (before Hydra makes a run directory), then Hydra's app."""

    die_with_parent_if_asked()  # started by nemo-upcycle compare: die with it
    sys.argv[1:] = precheck(sys.argv[1:])
    main()
    sys.exit(EXIT["code"])


if __name__ == "__main__":
    cli_main()
