"""``eval.md`` from the ``eval.json`` record (a pure function of it): models, the side-by-side lm-eval table (value
+- stderr per model, difference to the first model), perplexities and greedy samples. Also the short table that
``report.md`` and ``comparison.md`` embed (``downstream_rows``)."""

from __future__ import annotations

import math
from typing import Optional


def _val(v: Optional[list]) -> str:
    if not v or v[0] is None:
        return "–"
    value, err = v
    s = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return s + (f" ± {err:.4f}" if err is not None and math.isfinite(err) and abs(value) < 1e4 else "")


def _diff(v: Optional[list], ref: Optional[list]) -> str:
    if not v or not ref or v[0] is None or ref[0] is None:
        return "–"
    return f"{v[0] - ref[0]:+.4f}"


def metric_keys(record: dict) -> list[tuple[str, str]]:
    """(task, metric) rows in task order (the requested ones, then any subtask / group lm-eval added)."""
    keys: list[tuple[str, str]] = []
    for m in record["models"]:
        for task, row in (m.get("metrics") or {}).items():
            for metric in row:
                if (task, metric) not in keys:
                    keys.append((task, metric))
    order = {t: i for i, t in enumerate(record.get("tasks", []))}
    return sorted(keys, key=lambda k: order.get(k[0], len(order)))


def downstream_rows(record: dict) -> list[str]:
    """The markdown table: task | metric | each model | each model minus the first."""
    ms = record["models"]
    names = [m["name"] for m in ms]
    head = ["task", "metric", *names, *[f"{n} − {names[0]}" for n in names[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, metric in metric_keys(record):
        vals = [(m.get("metrics") or {}).get(task, {}).get(metric) for m in ms]
        cells = [task, metric, *[_val(v) for v in vals], *[_diff(v, vals[0]) for v in vals[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(record: dict) -> str:
    ms = record["models"]
    out = ["# Evaluation", "",
           f"lm-eval {record['lm_eval_version']} (its HF backend, float32 on CPU, offline); tasks: "
           f"{', '.join(record['tasks']) or '–'}; limit: {record.get('limit') or 'none'}; "
           f"batch size {record.get('batch_size')}; {record.get('date', '')}", "",
           "## Models", "", "| name | model | kind | parameters | seconds |", "|---|---|---|---|---|"]
    for m in ms:
        out.append(f"| {m['name']} | `{m['path']}` | {m['kind']} | {m['parameters']:,} | {m.get('seconds', '–')} |")
    if record["tasks"]:
        out += ["", "## Downstream (lm-eval)", "", *downstream_rows(record), ""]
        hashes = {t: {m["task_hashes"].get(t) for m in ms} for t in record["tasks"]}
        differ = [t for t, h in hashes.items() if len(h) > 1]
        out.append("Task hashes (lm-eval's, over the samples' documents, prompts and targets): " + (
            "the same for every model." if not differ else
            f"differ between models for {', '.join(differ)} (the models' prompts differ: not the same evaluation)."))
        out += [f"- `{t}`: `{next(iter(h))}`" for t, h in hashes.items() if len(h) == 1 and None not in h]
        out.append("acc: the share of items whose gold choice has the highest log-likelihood; acc_norm: the same "
                   "with each log-likelihood divided by the choice's length in bytes; ± is lm-eval's standard error.")
    ppl = [m.get("perplexity") for m in ms]
    if any(ppl):
        p0 = next(p for p in ppl if p)
        out += ["", f"## Perplexity on `{record.get('text')}`", "",
                f"Sliding window of {p0['window']} tokens, stride {p0['stride']}, token-weighted; each model's own "
                "tokenizer (comparable between models that share it).", "",
                "| model | tokens scored | perplexity | − first |", "|---|---|---|---|"]
        for m, p in zip(ms, ppl):
            if p:
                d = f"{p['ppl'] - ppl[0]['ppl']:+.3f}" if ppl[0] and p is not ppl[0] else "–"
                out.append(f"| {m['name']} | {p['tokens']:,} | {p['ppl']:.3f} | {d} |")
    if record.get("prompts"):
        out += ["", f"## Samples (greedy, {record.get('new_tokens')} new tokens)", ""]
        for i, prompt in enumerate(record["prompts"]):
            out += [f"**Prompt {i + 1}:**", "", "```", prompt.rstrip("\n"), "```", ""]
            for m in ms:
                s = (m.get("samples") or [None] * len(record["prompts"]))[i]
                out += [f"*{m['name']}:*", "", "```", (s or "–").strip("\n"), "```", ""]
    return "\n".join(out).rstrip() + "\n"
