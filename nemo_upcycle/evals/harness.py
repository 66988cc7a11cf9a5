"""Running EleutherAI's lm-evaluation-harness (PyPI ``lm-eval`` 0.4.x) on one model at a time, offline.

Scoring is lm-eval's own: ``lm_eval.simple_evaluate`` with its HF backend (``lm_eval.models.huggingface.HFLM``,
the ``--model hf`` of ``lm-eval run``) on the model arguments ``models.EvalModel.model_args`` gives; this module
only gathers the numbers. Tasks are found by lm-eval's ``TaskManager`` in its built-in task folder, the smoke
tasks shipped here (``evals/tasks``) and the user's ``--include-path`` folders, and are loaded (their data read)
once before any model, so that a task whose data is not on disk fails in one line. Nothing is fetched: the hub and
``datasets`` are switched offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) before lm-eval is imported.
Task hashes are lm-eval's (``loggers.evaluation_tracker``: sha256 over the samples' doc, prompt and target hashes).
"""

from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import version
from typing import Optional, Sequence

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.evals.models import EvalModel
from nemo_upcycle.evals.shipped import TASKS_DIR

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for stderr of non-mean aggregations (perplexity); its default is 1e5


def go_offline() -> None:
    os.environ.update(OFFLINE)
    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lm_eval_version() -> str:
    return version("lm-eval")


def task_manager(tasks: Sequence[str], include_paths: Sequence[str] = ()):
    """lm-eval's task index over the shipped tasks and ``include_paths``; with its ~15k built-in tasks too (~15 s to
    index) only when some task is in neither."""
    paths = (str(TASKS_DIR), *map(str, include_paths))
    tm = _index(paths, False)
    return tm if all(t in tm.all_tasks for t in tasks) else _index(paths, True)


@functools.lru_cache(maxsize=4)
def _index(paths: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def check_tasks(tm, tasks: Sequence[str]) -> None:
    """Every task known and its data on disk (loading a task reads its data: lm-eval's ``TaskManager.load``)."""
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UpcycleError(f"task(s) {', '.join(unknown)} unknown to lm-eval {lm_eval_version()} here (its built-in "
                           "tasks, the shipped smoke tasks and the --include-path folders); pass --include-path DIR "
                           "with their YAML files.")
    for t in tasks:
        try:
            tm.load([t])
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            msg = " ".join(str(e).split())[:160]
            raise UpcycleError(f"task {t} needs data that is not on disk here ({e.__class__.__name__}: {msg}); "
                               "nothing is downloaded: put the data in your HF datasets cache, or pass --include-path "
                               "DIR with a YAML task that reads local files.") from None


def load_lm(m: EvalModel, batch_size: int, tokenizer: Optional[str] = None):
    """lm-eval's HF backend on this model (fp32, CPU)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(**m.model_args(tokenizer), batch_size=batch_size)


def evaluate_lm(lm, tm, tasks: Sequence[str], limit: Optional[int]) -> dict:
    """lm-eval's ``simple_evaluate`` (samples logged: the task hashes come from them)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=True,
                                   bootstrap_iters=BOOTSTRAP_ITERS)


def task_hashes(results: dict) -> dict[str, str]:
    """lm-eval's task hash per task (what ``EvaluationTracker.save_results_aggregated`` writes)."""
    from lm_eval.utils import hash_string

    return {t: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))
            for t, samples in (results.get("samples") or {}).items()}


def metrics(results: dict) -> dict[str, dict[str, list]]:
    """{task: {metric[,filter]: [value, stderr or None]}} from lm-eval's results (groups included)."""
    out: dict[str, dict[str, list]] = {}
    for section in ("results", "groups"):
        for task, rec in (results.get(section) or {}).items():
            row = out.setdefault(task, {})
            for key, value in rec.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                name, flt = key.split(",", 1)
                label = name if flt == "none" else key
                err = rec.get(f"{name}_stderr,{flt}")
                row[label] = [float(value), float(err) if isinstance(err, (int, float)) else None]
    return out


def summary(results: dict) -> dict:
    """What eval.json keeps of one model's lm-eval results."""
    return {"metrics": metrics(results), "task_hashes": task_hashes(results),
            "n_samples": results.get("n-samples", {}), "versions": results.get("versions", {}),
            "n_shot": results.get("n-shot", {})}
