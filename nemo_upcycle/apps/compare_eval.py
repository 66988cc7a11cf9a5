"""``nemo-upcycle compare``'s downstream columns: each variant's ``logging.eval_tasks`` scores (``end_eval``: lm-eval
on its HF export at the end of its run, ``RUN/eval/eval.json``), beside the losses in ``comparison.md``.

Every MoE variant is exported and evaluated when the recipe's ``logging.eval_tasks`` is not empty (compare then
keeps ``logging.export_hf=true``; pass ``logging.eval_tasks=[]`` for the losses alone). Dense runs are not exported
(``engine.export_scale``: no Mixtral to write), so the dense variants' downstream cells are empty; the dense source
itself, evaluated in every run's ``eval.json``, is the ``dense source (step 0)`` row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from nemo_upcycle.apps.end_eval import EVAL_DIR


def read_downstream(run_dir: Path) -> Optional[dict]:
    """{"moe": {"task/metric": [value, stderr]}, "dense": {...}, "tasks": [...]} from RUN/eval/eval.json, or None."""
    try:
        rec = json.loads((Path(run_dir) / EVAL_DIR / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    out = {"tasks": rec.get("tasks", []), "lm_eval_version": rec.get("lm_eval_version")}
    for m in rec.get("models", []):
        out[m["name"]] = {f"{t}/{k}": v for t, row in (m.get("metrics") or {}).items() for k, v in row.items()}
    return out


def downstream_markdown(result: dict) -> list[str]:
    """The downstream table (one row per variant, one column per task/metric), or nothing when no run has one."""
    rows = [(r["name"], (r.get("downstream") or {}).get("moe"), r) for r in result["variants"]]
    dense_src = next((r["downstream"]["dense"] for r in result["variants"] if (r.get("downstream") or {}).get("dense")),
                     None)
    if dense_src is None and not any(m for _, m, _ in rows):
        return []
    keys = list(dense_src or next(m for _, m, _ in rows if m))
    version = next(r["downstream"].get("lm_eval_version") for r in result["variants"] if r.get("downstream"))

    def cell(d, k):
        v = (d or {}).get(k)
        return f"{v[0]:.4f}" if v and v[0] is not None else "–"

    lines = ["## Downstream (lm-eval at the end of each run)", "",
             f"lm-eval {version}, `logging.eval_tasks` on each MoE's HF export (`<variant>/eval/eval.md`); the shipped "
             "tasks are smoke tasks, not benchmarks (README \"Evaluating\"). Dense runs have no HF export: their "
             "cells are empty; `dense source (step 0)` is the dense model before training.", "",
             "| variant | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    if dense_src:
        lines.append("| dense source (step 0) | " + " | ".join(cell(dense_src, k) for k in keys) + " |")
    for name, m, _ in rows:
        lines.append(f"| `{name}` | " + " | ".join(cell(m, k) for k in keys) + " |")
    return lines + [""]
