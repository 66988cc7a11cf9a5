"""``logging.eval_tasks`` at the end of a training run: ``nemo-upcycle eval DENSE RUN/hf_mixtral`` in a process of
its own (the training process still holds NeMo's model and optimizer state; the evaluation loads two fresh HF
models), writing ``RUN/eval/eval.json`` / ``eval.md``; ``report.md`` shows its table (``eval_section``).

The dense source and the export are scored by lm-eval with the run's tokenizer, so their columns are the same
documents and prompts (the task hashes show it). Skipped with a note when the run has no export (``logging.export_hf=
false``, a dense run, mock data without a tokenizer) or no tasks; a failure is a warning, never a failed run.
``check_eval_tasks`` refuses unknown task names before training starts (no lm-eval import for the shipped ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.evals.models import EXPORT_DIR
from nemo_upcycle.evals.shipped import SMOKE_TASKS
from nemo_upcycle.system.launcher import standalone_env

EVAL_DIR = "eval"


def check_eval_tasks(run: RunConfig) -> None:
    """Unknown task names, or a task whose data is not on disk, refused before training (one line)."""
    tasks = list(run.logging.eval_tasks or [])
    if not tasks or all(t in SMOKE_TASKS for t in tasks) or not run.logging.export_hf:
        return
    from nemo_upcycle.evals import harness

    harness.go_offline()
    try:
        harness.check_tasks(harness.task_manager(tasks), tasks)
    except UpcycleError as e:
        raise UpcycleError(f"logging.eval_tasks: {e}".replace("pass --include-path DIR", "run nemo-upcycle eval "
                                                                 "--include-path DIR after training")) from None


def run_end_eval(run: RunConfig, out_dir: Path, source: Path, tokenizer: Optional[str]) -> Optional[Path]:
    """Evaluate the dense source and the export (see the module doc); the eval directory, or None when skipped."""
    tasks = list(run.logging.eval_tasks or [])
    export = out_dir / EXPORT_DIR
    if not tasks:
        return None
    if not (export / "config.json").is_file() or tokenizer is None:
        print(f"note: logging.eval_tasks skipped: {'no tokenizer (mock data)' if tokenizer is None else 'no HF export'}"
              " to evaluate", flush=True)
        return None
    cmd = [sys.executable, "-m", "nemo_upcycle.apps.cli", "eval", str(source), str(export),
           "--tasks", ",".join(tasks), "--names", "dense,moe", "--tokenizer", str(tokenizer),
           "--out", str(out_dir / EVAL_DIR)]
    if run.logging.eval_limit:
        cmd += ["--limit", str(run.logging.eval_limit)]
    print(f"evaluating the dense source and the export: {' '.join(cmd[3:])}", flush=True)
    rc = subprocess.call(cmd, env=standalone_env())
    if rc != 0:
        print(f"warning: the end-of-training evaluation failed (exit {rc}); training's outputs are complete. Run it "
              f"again with: nemo-upcycle {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        return None
    return out_dir / EVAL_DIR


def eval_section(run_dir: Path) -> str:
    """report.md's downstream section from ``RUN/eval/eval.json`` (empty when there is none)."""
    from nemo_upcycle.evals.render import downstream_rows

    f = Path(run_dir) / EVAL_DIR / "eval.json"
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return ""
    if not rec.get("tasks") or not rec.get("models"):
        return ""
    return "\n".join(["", "## Downstream (lm-eval, end of training)", "",
                      f"lm-eval {rec['lm_eval_version']}, tasks {', '.join(rec['tasks'])} (the shipped ones are "
                      "smoke tasks, not benchmarks: README \"Evaluating\"); `dense` is the dense source, `moe` the "
                      f"export; samples and task hashes in `{EVAL_DIR}/eval.md`.", "", *downstream_rows(rec), ""])
