"""Sections of ``report.md`` besides the training curves: markdown tables, the step-0 check, precision and time.

Used by ``apps.report`` (the run report); no NeMo, no plotting. The step-0 sections read ``step0.json``
(``engine.lifecycle`` / ``engine.step0``), the time section ``timings.json`` (``engine.timing``).
"""

from __future__ import annotations

import json
import math
from typing import Optional


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|")


def _table(header: list, rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]


def _kv(d: dict) -> list[str]:
    rows = [[str(k), v if not isinstance(v, (dict, list)) else json.dumps(v)] for k, v in d.items()]
    return _table(["key", "value"], rows) if rows else ["(none)"]


def _step0(step0: Optional[dict]) -> list[str]:
    if not step0:
        return ["Not given (no step0.json / verify.json)."]
    layers = step0.get("layers") if isinstance(step0.get("layers"), dict) else None
    lines = _kv({k: v for k, v in step0.items() if k not in ("passed", "layers")})
    if "passed" in step0:
        lines = [f"**{'PASS' if step0['passed'] else 'FAIL'}**", ""] + lines
    return lines + ([""] + _step0_layers(layers) if layers else [])


def _step0_layers(s: dict) -> list[str]:
    """The per-layer table of the step-0 check (``engine.step0``): every MoE layer on the ranks that hold it."""
    if s.get("skipped"):
        return [f"Per-layer check: skipped ({s['skipped']})."]
    rows = s.get("rows") or []
    L = [f"Per-layer check: each MoE layer's own forward (router, expert-parallel exchange, experts) on "
         f"{s.get('tokens_per_layer', '?')} seeded hidden states against the dense MLP of the source, the router "
         "and each expert (on the tokens routed to it; an idle one on "
         f"{s.get('expert_tokens', '?')} tokens) against what upcycling builds; pass: max abs "
         f"difference <= rtol {_fmt(s.get('rtol'))} x max abs reference ({s.get('dtype', '?')}); {s.get('ranks', '?')} "
         f"rank{'' if s.get('ranks') == 1 else 's'}, "
         f"{_fmt(s.get('seconds'))} s: **{'PASS' if s.get('passed') else 'FAIL'}**", ""]
    if not s.get("equivalent_by_construction", True):
        L += [f"Not function-preserving by construction: {s.get('reason')}", ""]
    L += _table(["layer", "ranks", "tokens", "max abs diff", "max abs dense", "rel", "router diff", "experts",
                 "worst expert diff", "result"],
                [[r.get("layer"), ",".join(str(x) for x in r.get("ranks", [])), r.get("tokens"),
                  _num(r.get("max_abs_diff")), _num(r.get("max_abs_dense")),
                  (_num(r.get("max_abs_diff")) / r["max_abs_dense"]) if _num(r.get("max_abs_diff")) is not None
                  and _num(r.get("max_abs_dense")) else None, _num(r.get("router_max_abs_diff")),
                  f"{r.get('experts')}" + (f" ({len(r['idle_experts'])} idle)" if r.get("idle_experts") else ""),
                  f"{_fmt(_num(r.get('expert_max_abs_diff')))} (e{r.get('worst_expert')})",
                  "PASS" if r.get("passed") else "FAIL"] for r in rows])
    bad = s.get("mismatches") or []
    if bad:
        L += ["", "Mismatches (beyond the tolerance):", ""]
        L += _table(["what", "layer", "expert", "rank", "max abs diff", "tolerance"],
                    [[m.get("what"), m.get("layer"), m.get("expert"), m.get("rank"), _num(m.get("max_abs_diff")),
                      _num(m.get("tol"))] for m in bad])
    if s.get("calibration"):  # upcycling from data (issue 15): what the calibration pass measured and cost
        from nemo_upcycle.data.calibration import describe

        L += ["", f"Upcycling from data: {describe(s['calibration'])}."]
    return L


PRECISIONS = {"bf16-mixed": "bf16 weights and activations, fp32 main parameters and gradient reduction",
              "16-mixed": "fp16 weights and activations, fp32 main parameters", "32-true": "fp32", "32": "fp32"}


def precision_line(run: dict, reason: Optional[str] = None) -> str:
    """The report's precision line: what trained (the trainer's precision), why (``trainer.precision_reason``) and
    the peak its MFU is over."""
    p = run.get("precision")
    what = f"**{p}** ({PRECISIONS[p]})" if p in PRECISIONS else f"**{p}**" if p else "not recorded"
    why = f" Why: {reason}." if reason else ""
    return f"Precision: {what}; MFU over the peak of that precision: {run.get('peak_name') or 'none'}.{why}"


TIME_ROWS = (("startup", "start-up: process start -> first training step"),
             ("recipe", "  imports, config, corpus, tokenizer"),
             ("trainer", "  NeMo trainer, strategy, process groups"),
             ("upcycle", "  model built and upcycled online"),
             ("optimizer", "  DDP, optimizer (a resumed checkpoint's load)"),
             ("data", "  data loaders"),
             ("step0", "  step-0 check, peak probe"),
             ("steps", "training steps"))


def time_section(t: Optional[dict], wall: Optional[float] = None) -> list[str]:
    """Where the run's wall time went (``timings.json``): start-up phases, steps, each checkpoint save."""
    if not t:
        return ["No timings.json (written by training runs since the timing callback exists)."]
    rows = [[label, _num(t.get(key))] for key, label in TIME_ROWS if _num(t.get(key)) is not None]
    saves = [s for s in t.get("saves") or [] if _num(s.get("seconds")) is not None]
    rows += [[f"checkpoint save at step {s.get('step')}", s["seconds"]] for s in saves]
    if _num(t.get("to_train_end")) is not None:
        rows.append(["process start -> end of training", t["to_train_end"]])
    if wall is not None:
        rows.append(["whole run (incl. final evaluation, export, report)", wall])
    return _table(["phase", "seconds"], rows)


