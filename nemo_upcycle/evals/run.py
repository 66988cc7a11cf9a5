"""``nemo-upcycle eval``: lm-eval tasks, perplexity and greedy samples for each model, side by side.

``check_request`` refuses bad input in one line before lm-eval, transformers or any model is loaded and before
the output directory is made (models that do not exist or do not fit in memory, include paths, the text file,
numbers, an output directory that holds someone else's files); ``evaluate`` then indexes and loads the tasks (a task
whose data is not on disk fails here, naming ``--include-path``), and runs each model in turn: lm-eval's HF backend
(``harness``), then on the same loaded model the perplexity and samples (``text``). ``eval.json`` (every number, the
lm-eval version, task hashes, per-model seconds) and ``eval.md`` (``render``) are written through temporary names.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.evals import render
from nemo_upcycle.evals.models import EXPORT_DIR, EvalModel, check_fits, resolve_model
from nemo_upcycle.evals.text import NEW_TOKENS, PROMPTS
from nemo_upcycle.system.files import (
    MARK,
    atomic_write_json,
    atomic_write_text,
    check_not_protected,
    is_ours,
    write_mark,
)

OUT_KIND = "eval"


@dataclass
class EvalRequest:
    models: Sequence[str]
    tasks: Sequence[str] = ()
    include_paths: Sequence[str] = ()
    limit: Optional[int] = None
    batch_size: int = 8
    text: Optional[str] = None  # held-out text file for perplexity
    window: int = 512
    stride: int = 256
    max_tokens: Optional[int] = 8192
    prompts: Sequence[str] = PROMPTS
    new_tokens: int = NEW_TOKENS
    names: Optional[Sequence[str]] = None  # column names (default: from the paths)
    tokenizer: Optional[str] = None  # one tokenizer directory for every model (default: each model's own)
    resolved: list = field(default_factory=list)


def model_name(m: EvalModel) -> str:
    p = Path(m.label.rstrip("/"))
    if m.kind.startswith("run export"):
        return p.name
    return p.stem if m.gguf_file else (p.parent.name + "/" + p.name if p.name == EXPORT_DIR else p.name)


def check_request(r: EvalRequest) -> EvalRequest:
    """Every refusal that needs no heavy import (see the module doc)."""
    if not r.models:
        raise UpcycleError("no model given; pass one or more HF model directories, .gguf files or run directories.")
    for flag, v, low in (("--limit", r.limit, 1), ("--batch-size", r.batch_size, 1), ("--window", r.window, 2),
                         ("--stride", r.stride, 1), ("--max-tokens", r.max_tokens, 2)):
        if v is not None and v < low:
            raise UpcycleError(f"{flag} {v} must be at least {low}.")
    if r.stride > r.window:
        raise UpcycleError(f"--stride {r.stride} is larger than --window {r.window}: tokens would go unscored; use a "
                           "stride of at most the window.")
    for d in r.include_paths:
        if not Path(d).is_dir():
            raise UpcycleError(f"--include-path {d} is not a directory; pass a folder holding lm-eval task YAML files.")
    if r.text is not None and (not Path(r.text).is_file() or Path(r.text).stat().st_size == 0):
        what = "is empty" if Path(r.text).is_file() else "does not exist or is not a file"
        raise UpcycleError(f"--text {r.text} {what}; pass a held-out text file for the perplexity.")
    if not r.tasks and r.text is None and not r.prompts:
        raise UpcycleError("nothing to evaluate: pass --tasks, --text or leave the samples on.")
    if r.names is not None and len(r.names) != len(r.models):
        raise UpcycleError(f"--names gives {len(r.names)} names for {len(r.models)} models; give one per model.")
    if r.tokenizer is not None and not Path(r.tokenizer).is_dir():
        raise UpcycleError(f"--tokenizer {r.tokenizer} is not a directory; pass an HF tokenizer directory.")
    r.resolved = [resolve_model(m) for m in r.models]
    check_fits(r.resolved)
    return r


def check_out(out: Path) -> None:
    """The output directory: new, empty, or an earlier eval output (its mark); never a user's folder."""
    out = Path(out).expanduser()
    check_not_protected(out, (), "--out")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise UpcycleError(f"--out {out} exists and is not a directory; choose a directory for eval.md / .json.")
        if any(out.iterdir()) and not is_ours(out, (OUT_KIND,)):
            raise UpcycleError(f"--out {out} holds files nemo-upcycle did not write (no {MARK} mark); choose a new or "
                               "empty directory.")


def evaluate(r: EvalRequest, out: Optional[Path] = None, progress: bool = True) -> dict:
    """Run the request (``check_request`` first) and write ``out/eval.json`` and ``out/eval.md`` when ``out``."""
    from nemo_upcycle.evals import harness

    harness.go_offline()
    tm = None
    if r.tasks:
        tm = harness.task_manager(r.tasks, r.include_paths)
        harness.check_tasks(tm, r.tasks)
    names = list(r.names or [model_name(m) for m in r.resolved])
    names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
    record = {"lm_eval_version": harness.lm_eval_version(), "tasks": list(r.tasks), "limit": r.limit,
              "batch_size": r.batch_size, "include_paths": [str(Path(p).resolve()) for p in r.include_paths],
              "text": r.text, "prompts": list(r.prompts), "new_tokens": r.new_tokens,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "models": []}
    text = Path(r.text).read_text(errors="replace") if r.text else None
    for i, (m, name) in enumerate(zip(r.resolved, names)):
        print(f"[{i + 1}/{len(names)}] {name}: {m.kind}, {m.parameters:,} parameters", flush=True)
        t0 = time.perf_counter()
        rec = {"name": name, "path": m.label, "kind": m.kind, "parameters": m.parameters,
               "model_args": m.model_args(r.tokenizer)}
        with tempfile.TemporaryDirectory(prefix="nemo-upcycle-eval-tok-") as tok_dir:
            lm = harness.load_lm(m, r.batch_size, r.tokenizer or m.write_tokenizer(Path(tok_dir)))
            if r.tasks:
                rec.update(harness.summary(harness.evaluate_lm(lm, tm, r.tasks, r.limit)))
            from nemo_upcycle.evals.text import perplexity, samples

            if text is not None:
                rec["perplexity"] = perplexity(lm.model, lm.tokenizer, text, r.window, r.stride, r.max_tokens,
                                               progress)
            if r.prompts:
                rec["samples"] = samples(lm.model, lm.tokenizer, r.prompts, r.new_tokens)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        record["models"].append(rec)
        del lm
        gc.collect()
    if out is not None:
        write_outputs(record, Path(out))
    return record


def write_outputs(record: dict, out: Path, mark: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if mark and not any(out.iterdir()):
        write_mark(out, OUT_KIND)
    atomic_write_json(out / "eval.json", record)
    atomic_write_text(out / "eval.md", render.markdown(record))
