"""The end-of-run report: ``report.md`` and PNG plots in the run directory, from ``metrics.jsonl``.

    python -m nemo_upcycle.apps.report RUN_DIR     # rebuild from RUN_DIR/metrics.jsonl (+ step0.json or
                                                   # verify.json, summary.json when present)

Input records are ``engine.metrics.MetricsLogger``'s (``kind`` run / train / val; a line without ``kind`` is train
when it has ``loss``, val when it has ``val_loss``). Every field is optional: a run without validation, without MoE
fields or without records still gets a report whose sections say what is missing. Plots: loss.png, expert_load.png
(per-layer load over time, the last window's shares), router.png (aux / z loss, entropy, dropped fraction),
throughput.png (tokens/s, MFU). Written through a temporary name and a rename; matplotlib (Agg), no NeMo.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nemo_upcycle.apps.report_parts import _kv, _num, _step0, _table, precision_line, time_section  # noqa: E402
from nemo_upcycle.system.files import TIMINGS_FILE, atomic_path, atomic_write_text  # noqa: E402


# ---- reading ----------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> dict:
    """{"run": [...], "train": [...], "val": [...], "bad_lines": n} from a JSONL file (missing file: empty)."""
    out = {"run": [], "train": [], "val": [], "bad_lines": 0}
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            out["bad_lines"] += 1
            continue
        if not isinstance(rec, dict):
            out["bad_lines"] += 1
            continue
        kind = rec.get("kind") or ("val" if "val_loss" in rec else "train" if "loss" in rec else None)
        if kind in ("run", "train", "val"):
            out[kind].append(rec)
    for kind in ("train", "val"):  # a resumed run appends again: keep the last record per step
        out[kind] = list({r.get("step"): r for r in out[kind]}.values())
        out[kind].sort(key=lambda r: (r.get("step") is None, r.get("step") or 0))
    return out


def _series(recs: list, key: str) -> tuple[list, list]:
    pts = [(r["step"], _num(r.get(key))) for r in recs
           if _num(r.get("step")) is not None and _num(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]





# ---- plots ------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_loss(m: dict, path: Path, tokens_per_step: Optional[float]) -> Optional[Path]:
    (ts, tl), (vs, vl) = _series(m["train"], "loss"), _series(m["val"], "val_loss")
    if not tl and not vl:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if tl:
        ax.plot(ts, tl, label="train loss", lw=1.2)
    if vl:
        ax.plot(vs, vl, "o-", label="val loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens")
    return _save(fig, path)


def plot_expert_load(m: dict, path: Path) -> Optional[Path]:
    recs = [r for r in m["train"] if r.get("tokens_per_expert") and r.get("moe_layers") is not None]
    if not recs:
        return None
    layers = recs[-1]["moe_layers"]
    steps = [r["step"] for r in recs]
    spread = [[(r.get("load_max_over_mean_layers") or [math.nan] * len(layers))[i]
               if r.get("moe_layers") == layers else math.nan for r in recs] for i in range(len(layers))]
    counts = recs[-1]["tokens_per_expert"]
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]  # (M, E)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(layers) + 2.5),
                                 gridspec_kw={"width_ratios": [3, 2]})
    im = a1.imshow(spread, aspect="auto", cmap="magma_r", interpolation="nearest", vmin=1.0)
    a1.set_title("load spread max/mean per layer (1 = balanced)")
    a1.set_xlabel("step")
    a1.set_ylabel("layer")
    xt = list(range(0, len(steps), max(1, len(steps) // 10)))
    a1.set_xticks(xt, [str(steps[i]) for i in xt])
    yt = list(range(0, len(layers), max(1, len(layers) // 16)))
    a1.set_yticks(yt, [str(layers[i]) for i in yt])
    fig.colorbar(im, ax=a1, fraction=0.04)
    E = len(shares[0]) if shares else 0
    im2 = a2.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    a2.set_title(f"share of routed tokens per expert, step {steps[-1]} (uniform {1 / max(E, 1):.3f})")
    a2.set_xlabel("expert")
    a2.set_yticks(yt, [str(layers[i]) for i in yt])
    if E <= 16 and len(layers) <= 32:
        a2.set_xticks(range(E))
        for i, row in enumerate(shares):
            for e, v in enumerate(row):
                a2.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im2, ax=a2, fraction=0.05)
    return _save(fig, path)


def plot_router(m: dict, path: Path, num_experts: Optional[int]) -> Optional[Path]:
    panels = [(k, t) for k, t in (("aux_loss", "aux loss (before coeff)"), ("z_loss", "z loss (before coeff)"),
                                  ("router_entropy", "router entropy (nats)"), ("dropped_fraction", "dropped fraction"))
              if _series(m["train"], k)[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(*_series(m["train"], key), lw=1.2)
        if key == "router_entropy" and num_experts:
            ax.axhline(math.log(num_experts), ls="--", c="gray", lw=0.8, label=f"ln {num_experts} (uniform)")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput(m: dict, path: Path) -> Optional[Path]:
    (s, tps), (s2, mfu) = _series(m["train"], "tokens_per_s"), _series(m["train"], "mfu")
    if not tps:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(s, tps, lw=1.2, label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    if mfu:
        ax2 = ax.twinx()
        ax2.plot(s2, [100 * x for x in mfu], c="C1", lw=1.0, label="MFU %")
        ax2.set_ylabel("MFU %")
        ax2.legend(loc="lower right")
    ax.legend(loc="lower left")
    return _save(fig, path)


# ---- markdown ---------------------------------------------------------------------------------------------
def _median_skip_first(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    if len(xs) > 2:
        xs = xs[1:]  # the first window holds the warm-up (allocation, first-touch, lazy init)
    return statistics.median(xs) if xs else None


def build_markdown(run_dir: Path, m: dict, step0: Optional[dict], summary: dict, plots: dict,
                   timings: Optional[dict] = None) -> str:
    run = m["run"][-1] if m["run"] else {}
    train, val = m["train"], m["val"]
    L = ["# Training report", "", f"Run directory: `{run_dir}`; written "
         f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.", ""]
    if m["bad_lines"]:
        L += [f"Skipped {m['bad_lines']} unreadable line(s) of metrics.jsonl.", ""]
    L += ["## Step-0 verification", ""] + _step0(step0) + [""]

    L += ["## Validation", ""]
    summary = dict(summary or {})
    final = summary.pop("final_eval", None) or {}
    if step0 and step0.get("moe_loss") is not None:
        rows = [["dense model", 0, _num(step0.get("dense_loss"))], ["MoE at step 0", 0, _num(step0.get("moe_loss"))]]
        if final.get("moe_loss") is not None:
            rows.append(["MoE after training", final.get("step"), _num(final.get("moe_loss"))])
        rows = [r + [math.exp(r[2]) if r[2] is not None else None] for r in rows]
        L += [f"Before / after on the same {step0.get('tokens', '?')} validation tokens (the step-0 check's "
              "windows):", ""]
        L += _table(["", "step", "loss", "ppl"], rows) + [""]
        if final.get("hf_mixtral"):
            L += [f"Exported HF Mixtral: `{final['hf_mixtral']}` (check it: `nemo-upcycle verify <dense> "
                  f"{final['hf_mixtral']}`).", ""]
        L += ["NeMo's validation loop (the first `limit_val_batches` batches of the validation split):", ""]
    if val:
        def row(label, r):
            return [label, r.get("step"), r.get("tokens"), _num(r.get("val_loss")), _num(r.get("val_ppl"))]
        at0 = val[0].get("step") == 0
        rows = [row("before training" if at0 else "first", val[0])]
        if len(val) > 1:
            rows.append(row("after" if at0 else "last", val[-1]))
        L += _table(["", "step", "tokens", "val loss", "val ppl"], rows)
    else:
        L.append("No validation records.")
    L.append("")

    L += ["## Training", ""]
    _, losses = _series(train, "loss")
    if train:
        last = train[-1]
        L += _table(["steps", "tokens", "first loss", "last loss", "train seconds", "last lr", "last grad norm"],
                    [[last.get("step"), last.get("tokens"), losses[0] if losses else None,
                      losses[-1] if losses else None, sum(_num(r.get("seconds")) or 0.0 for r in train),
                      _num(last.get("lr")), _num(last.get("grad_norm"))]])
    else:
        L.append("No training records.")
    L.append("")

    L += ["## Throughput", ""]
    tps = _median_skip_first([_num(r.get("tokens_per_s")) for r in train])
    if tps is not None:
        L += _table(["tokens/s", "TFLOP/s", "MFU", "peak used", "peak FLOP/s per device", "devices", "FLOPs/token"],
                    [[tps, _median_skip_first([_num(r.get("tflops")) for r in train]),
                      (lambda x: f"{100 * x:.2f}%" if x is not None else "–")(
                          _median_skip_first([_num(r.get("mfu")) for r in train])),
                      str(run.get("peak_name") or "–"), _num(run.get("peak_flops")), run.get("devices"),
                      _num(run.get("flops_per_token"))]])
        L += ["", "Medians over the logged windows (the first, with the warm-up, left out when there are 3 or more). "
              "Model FLOPs as Megatron counts them: k routed experts, causal attention, logits; fwd + bwd.", "",
              precision_line(run, summary.get("precision_reason"))]
    else:
        L.append("No throughput records.")
    L.append("")

    moe_keys = [("aux_loss", "aux loss (before coeff)"), ("z_loss", "z loss (before coeff)"),
                ("router_entropy", "router entropy (nats)"), ("load_max_over_mean", "load max/mean (worst layer)"),
                ("load_cv", "load CV (layer mean)"), ("dropped_fraction", "dropped fraction")]
    rows = [[title, *(lambda v: (v[0], v[-1]))(_series(train, k)[1])] for k, title in moe_keys if _series(train, k)[1]]
    L += ["## Router", ""]
    if rows:
        L += _table(["", "first window", "last window"], rows)
        if run.get("num_experts"):
            L += ["", f"Uniform routing over {run['num_experts']} experts has entropy ln {run['num_experts']} = "
                  f"{math.log(run['num_experts']):.4f} nats and load max/mean 1."]
    else:
        L.append("No MoE fields in the records (dense model, or metrics without router hooks).")
    L.append("")

    moe_last = next((r for r in reversed(train) if r.get("tokens_per_expert")), None)
    L += ["## Expert load", ""]
    if moe_last:
        def col(key, i):
            vals = moe_last.get(f"{key}_layers") or []
            return _num(vals[i]) if i < len(vals) else None
        rows = []
        for i, (layer, counts) in enumerate(zip(moe_last.get("moe_layers", []), moe_last["tokens_per_expert"])):
            total = max(sum(counts), 1)
            rows.append([layer, " ".join(f"{100 * c / total:.1f}" for c in counts), col("load_max_over_mean", i),
                         col("load_cv", i), col("router_entropy", i), col("dropped_fraction", i),
                         col("aux_loss", i), col("z_loss", i)])
        L += [f"Last window (step {moe_last.get('step')}, {moe_last.get('steps', '?')} step(s)):", ""]
        L += _table(["layer", "tokens per expert (% of routed)", "max/mean", "CV", "entropy", "dropped", "aux loss",
                     "z loss"], rows)
    else:
        L.append("No per-expert counts in the records.")
    L.append("")

    L += ["## Time", ""] + time_section(timings, _num(summary.get("wall_seconds"))) + [""]
    L += ["## Summary", ""] + _kv(summary) + [""]
    L += ["## Plots", ""]
    L += [f"![{name}]({p.name})" for name, p in plots.items() if p] or ["No plots (no records to draw)."]
    return "\n".join(L) + "\n"


def write_report(run_dir, *, metrics_path=None, step0: Optional[dict] = None, summary: Optional[dict] = None) -> Path:
    """Write ``report.md`` and the PNGs into ``run_dir``; return the report path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    m = read_metrics(Path(metrics_path) if metrics_path else run_dir / "metrics.jsonl")
    run = m["run"][-1] if m["run"] else {}
    tps = _num(run.get("tokens_per_step"))
    if tps is None:
        tps = next((r["tokens"] / r["step"] for r in m["train"] if _num(r.get("tokens")) and _num(r.get("step"))), None)
    plots = {"loss": plot_loss(m, run_dir / "loss.png", tps),
             "expert load": plot_expert_load(m, run_dir / "expert_load.png"),
             "router": plot_router(m, run_dir / "router.png", run.get("num_experts")),
             "throughput": plot_throughput(m, run_dir / "throughput.png")}
    out = run_dir / "report.md"
    timings = _load_json(run_dir / TIMINGS_FILE)
    atomic_write_text(out, build_markdown(run_dir, m, step0, summary or {}, plots, timings))
    return out


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nemo_upcycle.apps.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--metrics", type=Path, help="metrics JSONL (default RUN_DIR/metrics.jsonl)")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory; pass a run directory holding metrics.jsonl.", file=sys.stderr)
        return 2
    step0 = _load_json(args.run_dir / "step0.json") or _load_json(args.run_dir / "verify.json")
    summary = _load_json(args.run_dir / "summary.json") or {}
    summary.setdefault("final_eval", _load_json(args.run_dir / "final_eval.json"))
    path = write_report(args.run_dir, metrics_path=args.metrics, step0=step0, summary=summary)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
