"""``nemo-upcycle compare``'s output directory OUT: what it writes, and what it may remove (``compare.py`` runs
the variants).

Written: the rows' equal-tokens / equal-FLOPs readings, ``comparison.md`` and ``comparison.png`` (validation loss
against tokens and against training FLOPs), pure functions of the ``comparison.json`` dict, each written through a
temporary name and a rename.

Removed: only what compare made. OUT carries the mark of kind ``compare``, each run directory OUT/<variant> the
mark ``compare-run`` (``files``; ``variant.json`` recognises those made before marks existed). Refused in one line,
before any training: an --out that is a file, an OUT or OUT/<variant> holding anything else, an OUT another compare
is writing (its lock) and a run directory that a training process still holds (its lock, ``run_dir``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from nemo_upcycle.apps import run_dir as run_dirs
from nemo_upcycle.apps.compare_eval import downstream_markdown
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system import files

REFERENCE = "copy"  # the MoE whose FLOPs per token set the equal-FLOPs budget
MARKER = "variant.json"  # written by compare into each run directory: settings, status


# ---- rows and the table (pure) ------------------------------------------------------------------------------
def finish_row(row: dict, budget_flops: float) -> dict:
    """Fill the equal-tokens / equal-FLOPs readings of a row from its final loss and training FLOPs."""
    loss = row.get("final_loss")
    row["final_ppl"] = math.exp(min(loss, 50.0)) if loss is not None else None
    train_flops = row.get("train_flops")
    row["flops_ratio"] = train_flops / budget_flops if train_flops and budget_flops else None
    same_flops = row.get("equal_flops") or (row["flops_ratio"] is not None and abs(row["flops_ratio"] - 1) <= 0.01)
    row["loss_equal_tokens"] = None if row.get("equal_flops") else loss
    row["loss_equal_flops"] = loss if same_flops else None
    return row


def fmt(v, spec: str = "{:.4f}") -> str:
    return "–" if v is None else spec.format(v)


def row_note(r: dict) -> str:
    if r["status"] == "failed":
        return f"**failed**: {r.get('reason') or '?'}"
    if r["status"] != "done":
        return r["status"]
    notes = []
    if r.get("equal_flops") and r.get("flops_ratio"):
        notes.append(f"{r['steps']} steps = {r['flops_ratio']:.2f}x the MoE's FLOPs")
    elif r.get("flops_ratio") and abs(r["flops_ratio"] - 1) > 0.01:
        notes.append(f"{r['flops_ratio']:.2f}x the MoE's FLOPs")
    if r.get("dense"):
        notes.append("no experts")
    elif r.get("step0_passed") is True:
        notes.append("step 0 = dense")
    elif r.get("step0_max_abs_logit_diff") is not None:
        notes.append(f"step 0 != dense (max dlogit {r['step0_max_abs_logit_diff']:.2g})")
    return "; ".join(notes)


def markdown(result: dict) -> str:
    """comparison.md from a comparison.json dict."""
    b = result["budget"]
    head = ("| variant | step-0 loss | loss @ equal tokens | ppl | loss @ equal FLOPs | ppl | tokens/s "
            "| load CV | load max/mean | note |")
    lines = [f"# Upcycling comparison: {result['recipe']}", "",
             f"Budget: {b['steps']} steps x {b['tokens_per_step']:,} tokens = {b['tokens']:,} tokens per variant; "
             f"equal FLOPs = {b['flops']:.3e} model FLOPs ({b['flops_per_token']:.4g} per token, the `{REFERENCE}` "
             f"MoE). Seeds: seed {result['seeds']['seed']}, data {result['seeds']['data']}, upcycle "
             f"{result['seeds']['upcycle']} (every variant).", "",
             "Losses: next-token cross entropy on the fixed validation windows (step0.json / final_eval.json) before "
             "and after training; tokens/s: the fastest training step after the first (on a shared machine the "
             "others also measure the neighbours' load); load: the last training window's coefficient of variation "
             "and max/mean of tokens per expert (mean / worst over MoE layers).", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["variants"]:
        lines.append("| " + " | ".join([
            f"`{r['name']}`", fmt(r.get("step0_loss")), fmt(r.get("loss_equal_tokens")),
            fmt(r.get("final_ppl") if r.get("loss_equal_tokens") is not None else None, "{:.2f}"),
            fmt(r.get("loss_equal_flops")),
            fmt(r.get("final_ppl") if r.get("loss_equal_flops") is not None else None, "{:.2f}"),
            fmt(r.get("tokens_per_s"), "{:.1f}"), fmt(r.get("load_cv"), "{:.3f}"),
            fmt(r.get("load_max_over_mean"), "{:.2f}"), row_note(r)]) + " |")
    lines += ["", *downstream_markdown(result), "Variants:", ""]
    lines += [f"- `{r['name']}`: {r['what']} (`{' '.join(r['overrides'])}`)" for r in result["variants"]]
    lines += ["", "![validation loss](comparison.png)", "",
              "Plot: the validation loop (the first `trainer.limit_val_batches` validation batches, the same for "
              "every variant) against training tokens and training FLOPs (tokens x model FLOPs per token).", ""]
    return "\n".join(lines)


def plot_top(curves: list) -> float:
    """Upper y limit: 25% above the best final loss, so that a method far behind (Drop-Upcycling's first steps, an
    unscaled granular MoE) does not flatten the others; curves entirely above it are named in the legend."""
    everything = max(p[1] for c in curves for p in c) if curves else 1.0
    best_final = min(c[-1][1] for c in curves) if curves else 1.0
    return min(everything + 0.02 * abs(everything), best_final + 0.25 * abs(best_final))


def plot(result: dict, path: Path) -> None:
    """comparison.png: validation loss vs tokens (left) and vs training FLOPs (right), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(14, 4.6))
    colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # no grey: grey is dense_flops
    curves = [r for r in result["variants"] if r.get("val_curve")]
    top = plot_top([r["val_curve"] for r in curves])
    for i, r in enumerate(curves):
        x, y = [p[0] for p in r["val_curve"]], [p[1] for p in r["val_curve"]]
        label = r["name"] if min(y) < top else f"{r['name']} (above: {y[-1]:.2f} at the end)"
        style = dict(color="black" if r.get("dense") else colors[i % len(colors)], marker="o", markersize=3,
                     linestyle="--" if r.get("dense") else "-", label=label)
        if r.get("equal_flops"):
            style.update(color="0.45", linestyle=":")
        ax_t.plot(x, y, **style)
        ax_f.plot([t * r["flops_per_token"] for t in x], y, **style)
    if curves:
        low = min(p[1] for r in curves for p in r["val_curve"])
        for ax in (ax_t, ax_f):
            ax.set_ylim(low - 0.04 * (top - low), top)
    ax_t.set_xlabel("training tokens")
    ax_f.set_xlabel("training FLOPs (model FLOPs, fwd + bwd)")
    budget = result["budget"]["flops"]
    ax_f.axvline(budget, color="0.7", linewidth=0.8)
    ax_t.axvline(result["budget"]["tokens"], color="0.7", linewidth=0.8)
    for ax in (ax_t, ax_f):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    handles, labels = ax_t.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7)
    else:
        for ax in (ax_t, ax_f):
            ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{result['recipe']}: validation loss, {result['budget']['tokens']:,} tokens per variant", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    files.atomic_write_json(out / "comparison.json", result)
    files.atomic_write_text(out / "comparison.md", markdown(result))
    plot(result, out / "comparison.png")


# ---- what compare may remove -------------------------------------------------------------------------------
def _legacy_out(out: Path, all_names: Sequence[str]) -> bool:
    """A comparison written before marks existed: its comparison.json or a variant's variant.json."""
    return (out / "comparison.json").is_file() or any((out / n / MARKER).is_file() for n in all_names)


def _legacy_run(d: Path) -> bool:
    return (d / MARKER).is_file()


def check_out(out: Path, names: Sequence[str], all_names: Sequence[str]) -> None:
    """Refuse, before anything is written: an --out that is a file, a non-empty OUT or OUT/<variant> (``names``: the
    variants to run; ``all_names``: every variant) that compare did not write."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UpcycleError(f"--out {out} is a file; choose a directory for the comparison (a new one is made).")
    if not out.is_dir():
        return
    if not (files.is_ours(out, ("compare",)) or _legacy_out(out, all_names) or not any(out.iterdir())):
        raise UpcycleError(f"--out {out} holds files nemo-upcycle compare did not write (no {files.MARK} mark); "
                           "choose a new or empty --out directory.")
    for name in names:
        d = out / name
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise UpcycleError(f"{d} is not a directory compare made; move it away or choose another --out.")
        if d.is_dir() and not (files.is_ours(d, ("compare-run",)) or _legacy_run(d) or not any(d.iterdir())):
            raise UpcycleError(f"{d} holds files nemo-upcycle compare did not write (no {files.MARK} mark); it is "
                               "never removed: move it away or choose another --out.")


def claim_out(out: Path) -> files.FileLock:
    """Make OUT (marked ``compare``) and hold its lock while this comparison runs; another one writing it: refused."""
    out.mkdir(parents=True, exist_ok=True)
    lock = files.FileLock(out / run_dirs.LOCK)
    if not lock.acquire(wait=False):
        raise UpcycleError(f"--out {out} is in use by another nemo-upcycle compare ({run_dirs.describe(lock.holder())}"
                           "); wait for it to finish, or choose another --out.")
    if files.read_mark(out) is None:
        files.write_mark(out, "compare")
    return lock


def _in_use(run_dir: Path, holder: dict) -> UpcycleError:
    return UpcycleError(f"{run_dir} is in use by a running training process ({run_dirs.describe(holder)}), perhaps "
                        "left by a comparison stopped earlier; wait for it or stop it, then run compare again.")


def check_not_running(run_dir: Path) -> None:
    holder = run_dirs.holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)


def remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory compare made (its mark, or ``variant.json`` from before marks), holding its lock so
    that a training process still in it is never pulled out from under (refused instead). An empty one stays."""
    if not [p for p in run_dir.iterdir() if p.name != run_dirs.LOCK]:
        return
    lock = files.FileLock(run_dir / run_dirs.LOCK)
    if not lock.acquire(wait=False):
        raise _in_use(run_dir, lock.holder() or {})
    try:
        files.remove_ours(run_dir, ("compare-run",), legacy=_legacy_run)
    finally:
        lock.release()  # the lock file went with the directory: nothing to remove
