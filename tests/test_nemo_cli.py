"""NeMo's own catalog CLI finds our recipes: ``nemo llm train --factory NAME --dryrun``.

NeMo-Run resolves ``--factory NAME`` of ``llm.train`` in its factory registry (``catalogue``) under the namespace of
``llm.train``, where ``@run.cli.factory(target=llm.train, name=NAME)`` puts each ``engine/recipes/<name>.py``; the
registry holds them only once that module is imported, and NeMo-Run imports the modules named by the ``nemo_run.cli``
entry points of every installed distribution (``nemo_run/cli/api.py``: ``_load_entrypoints``). So:

  * ``setup.cfg`` declares ``nemo_run.cli: upcycle = nemo_upcycle.engine.recipes`` (a package that imports every
    recipe module);
  * slow: a fresh process that sees only that declaration (a distribution made from ``setup.cfg`` in a temporary
    directory: nothing is installed) runs NeMo's CLI in-process for every recipe; the dry run's ``run.Partial`` is
    the recipe's, nothing is written, and an unknown name is "No matching factory found";
  * slow: the installed ``nemo`` command does the same once ``pip install -e .`` has installed this ``setup.cfg``
    (skipped, saying so, while the installed distribution does not declare the entry point yet).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.config.compose import recipe_names

REPO = Path(__file__).resolve().parent.parent
GROUP = "nemo_run.cli"
UNKNOWN = "llama3_8x8b_upcycle_nope"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
ENV["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def setup_cfg_entry_points(group: str) -> dict[str, str]:
    """``[options.entry_points]`` of setup.cfg: name -> value for one group."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg.get("options.entry_points", group, fallback="").strip().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in lines if line.strip())}


def test_setup_cfg_declares_the_recipe_package_for_nemo_run():
    eps = setup_cfg_entry_points(GROUP)
    assert eps == {"upcycle": "nemo_upcycle.engine.recipes"}
    assert importlib.util.find_spec(eps["upcycle"]) is not None
    for name in recipe_names():
        assert importlib.util.find_spec(f"{eps['upcycle']}.{name}") is not None, f"no recipes/{name}.py"
    # negative control: the lookup above does fail on a module that does not exist
    assert importlib.util.find_spec(f"{eps['upcycle']}.{UNKNOWN}") is None
    assert setup_cfg_entry_points("no.such.group") == {}


# Runs in a fresh process: NeMo's CLI (nemo_run.__main__.app, the `nemo` command) for `llm train --factory NAME
# --dryrun`, recording the Partial its dry run prints. nemo_upcycle must not be imported before NeMo-Run loads it.
CLI_SCRIPT = r"""
import importlib, json, sys
out_file, names = sys.argv[1], sys.argv[2:]
sys.argv = ["nemo", "llm", "train"]  # what create_cli reads to build the `llm` commands
assert not [m for m in sys.modules if m.startswith("nemo_upcycle")]
import nemo_run
from nemo_run.__main__ import app

seen, dryrun = {}, nemo_run.dryrun_fn

def record(task, *args, **kwargs):
    seen["task"] = task
    return dryrun(task, *args, **kwargs)

nemo_run.dryrun_fn = record
out = {}
for name in names:
    seen.clear()
    rc = app(["llm", "train", "--factory", name, "--dryrun"], standalone_mode=False)
    task, res = seen.get("task"), {"rc": rc}
    if task is not None:
        recipe = importlib.import_module(f"nemo_upcycle.engine.recipes.{name}").recipe
        res.update(target=f"{task.__fn_or_cls__.__module__}.{task.__fn_or_cls__.__name__}", is_recipe=task == recipe(),
                   experts=task.model.config.num_moe_experts)
    out[name] = res
json.dump(out, open(out_file, "w"))
"""


def run_cli(tmp_path: Path, names: list[str], extra_path: list[Path]) -> tuple[dict, subprocess.CompletedProcess]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out_file = tmp_path / "result.json"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([ENV["PYTHONPATH"], *map(str, extra_path)])}
    for var in ("LLAMA3_8B_PATH", "LLAMA31_8B_PATH", "LLAMA32_1B_PATH"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(out_file), *names], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(cwd.iterdir()) == [], "a dry run wrote files"
    return json.loads(out_file.read_text()), r


@pytest.mark.slow
def test_nemo_cli_resolves_every_recipe_through_the_setup_cfg_entry_point(tmp_path):
    from nemo_upcycle.config.compose import compose

    # a distribution that declares exactly setup.cfg's nemo_run.cli entry points, visible on sys.path
    site = tmp_path / "site"
    dist = site / "nemo_upcycle_setup_cfg-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nemo-upcycle-setup-cfg\nVersion: 0.0\n")
    eps = setup_cfg_entry_points(GROUP)
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))

    names = recipe_names()
    res, r = run_cli(tmp_path, [*names, UNKNOWN], [site])
    for name in names:
        assert res[name] == {"rc": None, "target": "nemo.collections.llm.api.train", "is_recipe": True,
                             "experts": compose(name).moe.num_moe_experts}, (name, res[name])
    assert r.stdout.count("Dry run for train") == len(names)
    # negative control: an unknown name is not found, and nothing was dry-run for it
    assert res[UNKNOWN] == {"rc": 1}
    assert f"No matching factory found for: {UNKNOWN}" in r.stdout + r.stderr


def installed_entry_points() -> dict[str, str]:
    try:
        dist = importlib.metadata.distribution("nemo-upcycle")
    except importlib.metadata.PackageNotFoundError:
        return {}
    return {ep.name: ep.value for ep in dist.entry_points.select(group=GROUP)}


@pytest.mark.slow
def test_installed_nemo_command_finds_a_recipe(tmp_path):
    if installed_entry_points() != setup_cfg_entry_points(GROUP):
        pytest.skip(f"the installed nemo-upcycle declares {GROUP} entry points {installed_entry_points()}, not "
                    f"setup.cfg's {setup_cfg_entry_points(GROUP)}: reinstall it (pip install -e .)")
    nemo = Path(sys.executable).parent / "nemo"
    if not nemo.is_file():
        pytest.skip(f"no `nemo` command next to {sys.executable}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name, ok in (("tiny_llama_upcycle", True), (UNKNOWN, False)):  # the second: negative control
        r = subprocess.run([str(nemo), "llm", "train", "--factory", name, "--dryrun"], cwd=cwd, env=ENV,
                           capture_output=True, text=True, timeout=600)
        found = "Dry run for train" in r.stdout
        assert found == ok and (f"No matching factory found for: {name}" in r.stdout + r.stderr) != ok, r.stdout[-2000:]
        assert r.returncode == (0 if ok else 1)
    assert list(cwd.iterdir()) == [], "a dry run wrote files"
