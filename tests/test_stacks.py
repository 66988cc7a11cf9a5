"""The two supported stacks: default (nemo-toolkit 2.7.3 + megatron-core 0.15.3) and ngc-26.02 (2.7.0 + 0.16.0, what
nvcr.io/nvidia/nemo:26.02 ships). Checked here:
  * one table: the versions ``engine/cpu_sites.STACKS`` knows are the ones requirements/ (and setup.cfg's ``nemo``
    extra) install, stack by stack; ``scripts/setup.sh --stack`` refuses an unknown stack in one line, exit 2;
  * where the stacks differ in behaviour (run on the installed one; ``bash scripts/test.sh --stack ngc-26.02`` runs the
    ``stack`` tests on the other): megatron-core 0.16.0's ``get_megatron_optimizer`` refuses the arguments NeMo 2.7
    passes (``engine/compat.py`` lets NeMo's defaults through and refuses anything else in one line), 0.15.3 takes
    them unpatched. The other difference, RoPE's CUDA site, is in tests/test_engine_cpu.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nemo_upcycle.engine import cpu_sites
from nemo_upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parent.parent
REQ = {"default": REPO / "requirements", "ngc-26.02": REPO / "requirements" / "ngc-26.02"}


def _pins(folder: Path) -> dict[str, str]:
    pins = {}
    for name in ("base.txt", "constraints.txt"):
        for line in (folder / name).read_text().splitlines():
            if m := re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line):
                pins.setdefault(m.group(1).lower(), set()).add(m.group(2))
    return pins


def test_every_stack_installs_the_versions_its_sites_were_read_from():
    assert set(REQ) == set(cpu_sites.STACKS)
    assert {p.name for p in (REPO / "requirements").iterdir() if p.is_dir()} == set(REQ) - {"default"}
    for stack, versions in cpu_sites.STACKS.items():
        pins = _pins(REQ[stack])
        for dist, version in versions.items():
            assert pins.get(dist) == {version}, (stack, dist, pins.get(dist))
    # control: the two stacks pin different NeMo / megatron-core, so a mix-up between the folders is seen
    assert _pins(REQ["default"])["megatron-core"] != _pins(REQ["ngc-26.02"])["megatron-core"]
    extra = (REPO / "setup.cfg").read_text().split("nemo =", 1)[1].split("\n#", 1)[0]
    assert all(f"{d}" in extra and f"=={v}" in extra for d, v in cpu_sites.STACKS["default"].items()), extra


def test_setup_refuses_an_unknown_stack_in_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NEMO_UPCYCLE_VENV": str(tmp_path / "venv")}
    r = subprocess.run(["bash", "scripts/setup.sh", "--stack", "ngc-25.11"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unknown stack 'ngc-25.11'" in r.stderr and "ngc-26.02" in r.stderr and "default" in r.stderr
    assert not any(tmp_path.iterdir()), "a refused stack made a directory"


@pytest.mark.slow
@pytest.mark.stack
def test_optimizer_arguments_of_nemo_per_stack():
    import inspect

    import megatron.core.optimizer as mopt

    from nemo_upcycle.engine import compat

    stack = cpu_sites.installed_stack()
    stock = inspect.unwrap(mopt.get_megatron_optimizer)
    takes = set(compat.LEGACY_DEFAULTS) <= set(inspect.signature(stock).parameters)
    compat.accept_nemo_optimizer_arguments()
    if stack == "default":  # megatron-core 0.15.3 takes NeMo's arguments: nothing patched
        assert takes and not compat.needs_optimizer_shim()
        assert not getattr(mopt.get_megatron_optimizer, "accepts_nemo_arguments", False)
        return
    # megatron-core 0.16.0: the stock function refuses what NeMo 2.7's _strategy_lib passes (the break itself) ...
    assert not takes and compat.needs_optimizer_shim()
    with pytest.raises(TypeError, match="no_weight_decay_cond"):
        stock(None, [], no_weight_decay_cond=None)
    # ... the patched one refuses a value other than NeMo's default in one line, before building anything
    assert mopt.get_megatron_optimizer.accepts_nemo_arguments
    with pytest.raises(UpcycleError) as err:
        mopt.get_megatron_optimizer(None, [], no_weight_decay_cond=lambda name, p: True, lr_mult=1.0)
    assert "no_weight_decay_cond=" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UpcycleError, match="lr_mult=2.0"):
        mopt.get_megatron_optimizer(None, [], lr_mult=2.0)
    # NeMo's defaults are dropped and the rest reaches the stock function unchanged: the same outcome as the stock call
    # without them (here its refusal of a process without a data-parallel group)
    config = mopt.OptimizerConfig(optimizer="adam", lr=1e-3)

    def outcome(fn, **kw):
        try:
            return fn(config, [], use_gloo_process_groups=True, **kw)
        except Exception as e:  # noqa: BLE001 -- compared below
            return type(e), str(e)

    assert outcome(mopt.get_megatron_optimizer, **compat.LEGACY_DEFAULTS) == outcome(stock)
    assert outcome(stock, **compat.LEGACY_DEFAULTS)[0] is TypeError  # control: what NeMo's call gets unpatched


# ---- the NGC job's step 1 (examples/ngc_slurm_8x8b.sh): which stack the job trains on -------------------------------
FAKE_PIP = r'''#!/bin/bash
# stands in for pip inside the container: logs its arguments and "installs" name==version pins into the fake site
echo "$*" >> "$FAKE_SITE/pip.log"
for a in "$@"; do
  case "$a" in
    nemo-toolkit==*) echo "__version__ = '${a#*==}'" > "$FAKE_SITE/nemo/package_info.py" ;;
    megatron-core==*) echo "__version__ = '${a#*==}'" > "$FAKE_SITE/megatron/core/package_info.py" ;;
  esac
done
'''


def _job_step1(tmp_path: Path, nemo: str, mcore: str, pin_stack: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run step 1's container-side script of the committed job with a fake pip and fake NeMo / megatron-core
    version modules (the image's versions), this repository as the installed plugin."""
    import os
    import sys

    script = (REPO / "examples" / "ngc_slurm_8x8b.sh").read_text()
    body = script.split("bash -c '", 1)[1].split("' \\\n  _ \"$PIN_STACK\"", 1)[0]
    site, bin_ = tmp_path / "site", tmp_path / "bin"
    for pkg in ("nemo", "megatron", "megatron/core"):
        (site / pkg).mkdir(parents=True, exist_ok=True)
        (site / pkg / "__init__.py").write_text("")
    (site / "nemo" / "package_info.py").write_text(f"__version__ = '{nemo}'\n")
    (site / "megatron" / "core" / "package_info.py").write_text(f"__version__ = '{mcore}'\n")
    bin_.mkdir(exist_ok=True)
    (bin_ / "pip").write_text(FAKE_PIP)
    (bin_ / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "PYTHONPATH": f"{site}:{REPO}", "FAKE_SITE": str(site),
           "PYTHONDONTWRITEBYTECODE": "1",  # the fake pip rewrites a module within the second: no stale bytecode
           "HOME": os.environ.get("HOME", str(tmp_path))}
    r = subprocess.run(["bash", "-c", body, "_", pin_stack], env=env, capture_output=True, text=True, timeout=120)
    return r, (site / "pip.log").read_text()


def test_ngc_job_trains_on_the_container_stack_when_it_is_tested(tmp_path):
    r, pip = _job_step1(tmp_path, "2.7.0", "0.16.0", "0")
    assert r.returncode == 0, r.stderr
    assert "stack ngc-26.02: nemo-toolkit==2.7.0 + megatron-core==0.16.0 (tested)" in r.stdout
    assert "nemo-toolkit==" not in pip and "-e /workspace/nemo-upcycle" in pip  # the plugin only, no pins


def test_ngc_job_installs_the_pins_with_the_reason_when_the_image_is_not_tested(tmp_path):
    pins = " ".join(f"{d}=={v}" for d, v in cpu_sites.STACKS["default"].items())
    r, pip = _job_step1(tmp_path, "2.8.0", "0.17.0", "0")  # e.g. IMAGE=nvcr.io/nvidia/nemo:26.04
    assert r.returncode == 0, r.stderr
    assert "found nemo-toolkit==2.8.0 + megatron-core==0.17.0" in r.stderr and "PIN_STACK=1" in r.stdout
    assert pins in pip and "stack default: " in r.stdout
    r, pip = _job_step1(tmp_path / "asked", "2.7.0", "0.16.0", "1")  # PIN_STACK=1: the pins whatever the image has
    assert r.returncode == 0 and pins in pip and "stack default: " in r.stdout, r.stderr
