"""Offline import == online start, and a NeMo 2 dense checkpoint as the source (real NeMo trainers, CPU).

Runs ``tests/engine_import_script.py`` in a fresh process (it owns the process group) and checks its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("engine_import")
    script = Path(__file__).with_name("engine_import_script.py")
    r = subprocess.run([sys.executable, str(script), str(work)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_offline_import_equals_online_start(results):
    assert results["offline_vs_online"] == 0.0
    assert results["embedding_vs_dense"] == 0.0
    assert results["offline_vs_other_seed"] > 1e-3  # negative control: the comparison sees a router change
    assert any("experts" in k for k in results["expert_keys"])


def test_nemo_dense_checkpoint_source(results):
    assert results["nemo_source_class"] == "NeMoDenseSource"
    assert results["nemo_source_vs_hf"] == 0.0 and results["nemo_source_config_equal"]
    assert results["from_nemo_vs_offline"] == 0.0
