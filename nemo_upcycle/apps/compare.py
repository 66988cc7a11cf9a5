"""``nemo-upcycle compare``: upcycled MoEs against dense continuation, method by method, on one recipe.

    nemo-upcycle compare --config-name=smollm2_135m_upcycle --steps 6 --out outputs/compare_smollm2
    nemo-upcycle compare --config-name=tiny_llama_upcycle --variants dense,copy --steps 2 trainer.limit_val_batches=1

Each variant (``VARIANTS``, ``--list-variants``) is one ``python -m nemo_upcycle.apps.train mode=train`` subprocess
with its own run directory ``OUT/<variant>/``, one after the other, all from the same dense source, corpus and seeds:
every run sees the same batches and the MoEs start from the same router draws. The methods: copy upcycling
(Komatsuzaki et al., arXiv 2212.05055) routed top-k then softmax or softmax then top-k, granular upcycling G=2 with
each weight scaling (He et al., arXiv 2410.07524), Drop-Upcycling (Nakamura et al., arXiv 2502.19261), a zero
router, and the data-aware methods (issue 15: importance and clustering splits, kmeans and hidden routers;
``apps.compare_data`` supplies their calibration text and prompts); against the dense model trained for the same tokens
and for the MoE's training FLOPs.

Read from each run: ``step0.json``, ``final_eval.json``, ``metrics.jsonl``, ``eval/eval.json`` (``compare_eval``).
Written to OUT after every variant, by ``compare_out`` (which also says what compare may remove):
``comparison.json``, ``comparison.md``, ``comparison.png``.
A variant that fails is a row with its one-line reason; a finished one with the same settings is skipped, so the same
command continues an interrupted comparison. Training processes die with compare (``run_dir.die_with_parent``).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from nemo_upcycle.apps import run_dir as run_dirs
from nemo_upcycle.apps.compare_data import data_overrides
from nemo_upcycle.apps.compare_eval import read_downstream
from nemo_upcycle.apps.compare_out import (
    MARKER,
    REFERENCE,
    check_not_running,
    check_out,
    claim_out,
    finish_row,
    fmt,
    markdown,  # noqa: F401 -- re-exported: tests and callers use compare.markdown
    remove_run_dir,
    write_outputs,
)
from nemo_upcycle.config.compose import compose
from nemo_upcycle.config.translate import flops_for_run
from nemo_upcycle.data.sources import make_tiny_llama
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system import files

TRAIN_MODULE = "nemo_upcycle.apps.train"  # what `python train.py` runs; works from an installed package
GRANULARITY = 2


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    overrides: tuple[str, ...] = ()
    granular: bool = False  # E and k multiplied by GRANULARITY (same active / total parameters as copy)
    equal_flops: bool = False  # trained for the reference MoE's FLOPs instead of its tokens
    shared: bool = False  # E x G experts, top-(k-1) x G, and a shared expert of G expert sizes: the copy's FLOPs
    calibrated: bool = False  # learns from calibration text (apps.compare_data)
    prompts: bool = False  # needs one prompt file per expert (apps.compare_data)

    @property
    def dense(self) -> bool:
        return "moe=dense" in self.overrides


VARIANTS = (
    Variant("dense", "dense continuation: the dense model trained as it is, same tokens", ("moe=dense",)),
    Variant("copy", "copy upcycling, top-k then softmax (Megatron default), normal router",
            ("upcycle=copy", "moe.moe_router_pre_softmax=false")),
    Variant("dense_flops", "dense continuation for the MoE's training FLOPs (more tokens)", ("moe=dense",),
            equal_flops=True),
    Variant("copy_pre_softmax", "copy upcycling, softmax then top-k (moe_router_pre_softmax=true)",
            ("upcycle=copy", "moe.moe_router_pre_softmax=true")),
    Variant("granular_exact", "granular G=2, virtual-group router, 2E experts top-2k, scaling exact",
            ("upcycle=granular_g2", "upcycle.scaling=exact"), granular=True),
    Variant("granular_megatron", "granular G=2, virtual-group router, 2E experts top-2k, scaling megatron",
            ("upcycle=granular_g2", "upcycle.scaling=megatron"), granular=True),
    Variant("granular_none", "granular G=2, virtual-group router, 2E experts top-2k, no scaling",
            ("upcycle=granular_g2", "upcycle.scaling=none"), granular=True),
    Variant("drop_upcycle", "Drop-Upcycling: copy, 50% of each expert's units re-initialized",
            ("upcycle=drop_upcycle",)),
    Variant("router_zeros", "copy upcycling with a zero router (copy: normal router)",
            ("upcycle=copy", "upcycle.router_init=zeros")),
    Variant("granular_shared", "granular G=2, 2E experts top-2(k-1), plus a shared expert (the dense MLP's size) "
            "behind Megatron's gate: shared and routed each carry half at step 0",
            ("upcycle=granular_g2", "upcycle.scaling=exact", "moe.moe_shared_expert_gate=true"), shared=True),
    Variant("importance_split", "granular G=2, units dealt to the 2 experts of a copy by importance (mean |activation| "
            "on calibration text), virtual-group router, 2E experts top-2k", ("upcycle=importance_g2",), granular=True,
            calibrated=True),
    Variant("clustering_split", "granular G=2, units grouped by co-activation on calibration text (balanced k-means), "
            "virtual-group router, 2E experts top-2k", ("upcycle=clustering_g2",), granular=True, calibrated=True),
    Variant("router_kmeans", "copy upcycling, router rows = k-means centroids of the hidden states entering each MoE "
            "layer on calibration text", ("upcycle=kmeans_router",), calibrated=True),
    Variant("router_hidden", "copy upcycling, router row e = mean hidden state on prompt file e (mergekit hidden; "
            "compare writes one prompt per expert from the calibration text)", ("upcycle=hidden_router",),
            prompts=True),
)
BY_NAME = {v.name: v for v in VARIANTS}


# ---- budget arithmetic (pure) -------------------------------------------------------------------------------
def budget_steps(tokens_per_step: int, tokens: Optional[int] = None, steps: Optional[int] = None,
                 default: int = 1) -> int:
    """Optimizer steps for a token budget (rounded up to whole steps) or a step count."""
    if tokens is not None and steps is not None:
        raise UpcycleError("give --tokens or --steps, not both.")
    if tokens is not None:
        if tokens < 1:
            raise UpcycleError(f"--tokens {tokens} must be positive.")
        return math.ceil(tokens / tokens_per_step)
    n = default if steps is None else steps
    if n < 1:
        raise UpcycleError(f"--steps {n} must be at least 1.")
    return n


def equal_flops_steps(steps: int, flops_ref: float, flops_dense: float) -> int:
    """Whole steps of a model with ``flops_dense`` per token that spend the FLOPs of ``steps`` steps at
    ``flops_ref`` per token (same tokens per step): the nearest whole number, at least ``steps``."""
    return max(steps, round(steps * flops_ref / flops_dense))


def variant_overrides(v: Variant, experts: int, topk: int) -> list[str]:
    """The variant's Hydra overrides on the recipe (``experts``, ``topk``: the recipe's MoE)."""
    out = list(v.overrides)
    if v.granular:
        out += [f"moe.num_moe_experts={experts * GRANULARITY}", f"moe.moe_router_topk={topk * GRANULARITY}"]
    if v.shared:  # k - 1 routed copies' worth plus one shared copy: the same active parameters as copy top-k
        out += [f"moe.num_moe_experts={experts * GRANULARITY}", f"moe.moe_router_topk={(topk - 1) * GRANULARITY}",
                "moe.moe_shared_expert_intermediate_size=${model.ffn_hidden_size}"]
    return out


# ---- reading a run directory --------------------------------------------------------------------------------
def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _finite(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_run(run_dir: Path) -> dict:
    """The numbers the table needs from one finished run directory (missing pieces are None)."""
    from nemo_upcycle.apps.report import read_metrics

    m = read_metrics(run_dir / "metrics.jsonl")
    step0, final = _json(run_dir / "step0.json") or {}, _json(run_dir / "final_eval.json") or {}
    train = m["train"]
    # the fastest step after the first (warm-up): on a shared machine the others measure the neighbours' load
    rates = [r["tokens_per_s"] for r in (train[1:] or train) if _finite(r.get("tokens_per_s"))]
    last = train[-1] if train else {}
    flops = next((r.get("flops_per_token") for r in reversed(m["run"]) if r.get("flops_per_token")), None)
    return {"step0_loss": _finite(step0.get("moe_loss")),
            "step0_max_abs_logit_diff": _finite(step0.get("max_abs_logit_diff")),
            "step0_passed": step0.get("passed"), "final_loss": _finite(final.get("moe_loss")),
            "final_step": final.get("step"), "tokens_per_s": max(rates) if rates else None,
            "load_cv": _finite(last.get("load_cv")), "load_max_over_mean": _finite(last.get("load_max_over_mean")),
            "flops_per_token_logged": flops,
            "val_curve": [[r["tokens"], r["val_loss"]] for r in m["val"] if _finite(r.get("val_loss")) is not None],
            "downstream": read_downstream(run_dir)}


def failure_reason(log_text: str, returncode: Optional[int]) -> str:
    """One line for a failed run: its ``error:`` line, else the last exception line, else the exit status."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ---- running -------------------------------------------------------------------------------------------------
def _per_variant_sets(sets: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in sets:
        name, sep, override = s.partition(":")
        if not sep or "=" not in override:
            raise UpcycleError(f"--set {s!r} is not VARIANT:KEY=VALUE.")
        if name not in names:
            raise UpcycleError(f"--set {s!r} names variant {name!r}, which is not compared; "
                               f"choose among {', '.join(names)}.")
        out.setdefault(name, []).append(override)
    return out


def parse_variants(spec: Optional[str]) -> list[Variant]:
    if not spec:
        return list(VARIANTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad or not names:
        raise UpcycleError(f"unknown variant(s) {', '.join(bad) or '(none given)'}; choose among {', '.join(BY_NAME)}.")
    return [BY_NAME[n] for n in dict.fromkeys(names)]


def compare(config_name: str, overrides: Sequence[str] = (), variants: Optional[str] = None,
            tokens: Optional[int] = None, steps: Optional[int] = None, out: Optional[Path] = None,
            sets: Sequence[str] = (), keep_checkpoints: bool = False, timeout: Optional[float] = None) -> dict:
    """Train every variant in turn (skipping finished ones) and write the outputs; returns comparison.json's dict."""

    chosen = parse_variants(variants)
    per_variant = _per_variant_sets(sets, [v.name for v in chosen])
    out = Path(out or Path("outputs") / f"compare_{config_name}").resolve()
    check_out(out, [v.name for v in chosen], [v.name for v in VARIANTS])
    overrides = list(overrides)
    base = compose(config_name, overrides)
    if base.moe.num_moe_experts is None:
        raise UpcycleError(f"recipe {config_name} has no experts (moe=dense); compare needs an MoE recipe.")
    tps = base.data.global_batch_size * base.data.seq_length
    n_steps = budget_steps(tps, tokens, steps, default=base.trainer.max_steps)
    E, k = base.moe.num_moe_experts, base.moe.moe_router_topk
    f_ref = flops_for_run(compose(config_name, overrides + variant_overrides(BY_NAME[REFERENCE], E, k)))
    f_dense = flops_for_run(compose(config_name, overrides + ["moe=dense"]))
    result = {"recipe": config_name, "overrides": overrides, "out": str(out),
              "seeds": {"seed": base.seed, "data": base.data.seed, "upcycle": base.upcycle.seed},
              "budget": {"steps": n_steps, "tokens_per_step": tps, "tokens": n_steps * tps, "flops_per_token": f_ref,
                         "flops": n_steps * tps * f_ref, "dense_flops_per_token": f_dense,
                         "dense_flops_steps": equal_flops_steps(n_steps, f_ref, f_dense)},
              "variants": []}
    lock = claim_out(out)
    try:
        return _run_all(config_name, overrides, base, chosen, per_variant, result, out, keep_checkpoints, timeout)
    finally:
        lock.release()


def _run_all(config_name: str, overrides: list, base, chosen: list, per_variant: dict, result: dict, out: Path,
             keep_checkpoints: bool, timeout: Optional[float]) -> dict:

    n_steps, tps = result["budget"]["steps"], result["budget"]["tokens_per_step"]
    E, k = base.moe.num_moe_experts, base.moe.moe_router_topk
    (out / "logs").mkdir(exist_ok=True)
    source = _shared_source(base, out)
    common = [f"model.source={source}"] if source else []
    plans = []
    for v in chosen:  # settle every variant's command first: a stale run directory stops before any training
        s = result["budget"]["dense_flops_steps"] if v.equal_flops else n_steps
        args = _variant_args(v, E, k, s, max(1, n_steps // 3), common + data_overrides(v, base, out), overrides,
                             per_variant.get(v.name, []), keep_checkpoints,
                             export=bool(base.logging.eval_tasks) and not v.dense and base.data.kind != "mock")
        _check_stale(out / v.name, args)
        check_not_running(out / v.name)
        plans.append((v, s, args))
    for i, (v, s, args) in enumerate(plans, 1):
        row = {"name": v.name, "what": v.what, "overrides": variant_overrides(v, E, k) + per_variant.get(v.name, []),
               "dense": v.dense, "equal_flops": v.equal_flops, "steps": s, "tokens": s * tps,
               "run_dir": str(out / v.name), "log": str(out / "logs" / f"{v.name}.log")}
        try:
            row["flops_per_token"] = flops_for_run(compose(config_name, args))
        except UpcycleError as e:
            row.update(status="failed", reason=str(e))
            print(f"[{i}/{len(plans)}] {v.name}: FAILED before training: {e}", flush=True)
        else:
            row["train_flops"] = row["flops_per_token"] * row["tokens"]
            _run_variant(v, i, len(plans), args, out, row, config_name, timeout)
        result["variants"].append(finish_row(row, result["budget"]["flops"]))
        write_outputs(result, out)
    print(f"comparison: {out / 'comparison.md'}, {out / 'comparison.png'}", flush=True)
    return result


def _shared_source(base, out: Path) -> Optional[str]:
    """``tiny``: one random dense model for every variant (written once under OUT); others resolve alike."""
    if base.model.source != "tiny":
        return None

    return str(make_tiny_llama(base.model, out / "dense_tiny", base.seed))


def _variant_args(v: Variant, E: int, k: int, steps: int, val_every: int, common: list, overrides: list,
                  extra: list, keep_checkpoints: bool = False, export: bool = False) -> list[str]:
    """train.py's Hydra overrides for one variant, in precedence order (the last wins): compare's defaults (validation
    at the same token counts in every variant; no checkpoints -- a SmolLM2 E8 one is ~8 GB and ~30 s at every
    validation --, HF export unless ``export`` (for logging.eval_tasks: ``compare_eval``) or per-run report), the
    user's overrides, the variant's, its --set ones, the budget."""
    defaults = [f"trainer.val_check_interval={val_every}",
                f"trainer.checkpoint_every_n_steps={steps if keep_checkpoints else 0}",
                f"logging.export_hf={'true' if export else 'false'}", "logging.report=false"]
    return ["mode=train", *common, *defaults, *overrides, *variant_overrides(v, E, k), *extra,
            f"trainer.max_steps={steps}"]


def _settings(args: Sequence[str]) -> list[str]:
    """The arguments that change a variant's numbers (not whether it keeps checkpoints)."""
    return [a for a in args if not a.startswith("trainer.checkpoint_every_n_steps=")]


def _check_stale(run_dir: Path, args: list[str]) -> None:
    marker = _json(run_dir / MARKER)
    old = _settings(marker.get("args") or []) if marker is not None else None
    if old is not None and old != _settings(args):
        there = [a for a in old if a not in args] or ["(same, in another order)"]
        here = [a for a in _settings(args) if a not in old]
        raise UpcycleError(f"{run_dir} holds a run of this variant with other settings (there: {' '.join(there)}; "
                           f"here: {' '.join(here) or '-'}); choose a new --out, or delete that directory to train "
                           "it again.")


def _run_variant(v: Variant, i: int, n: int, args: list[str], out: Path, row: dict, config_name: str,
                 timeout: Optional[float]) -> None:
    run_dir, log = out / v.name, out / "logs" / f"{v.name}.log"
    marker = _json(run_dir / MARKER) or {}
    if marker.get("status") == "done" and (run_dir / "final_eval.json").is_file():
        print(f"[{i}/{n}] {v.name}: finished earlier, skipped", flush=True)
        row.update(status="done", seconds=marker.get("seconds"), **read_run(run_dir))
        return
    ckpts = run_dir / "run" / "checkpoints"
    if run_dir.is_dir() and not (ckpts.is_dir() and any(ckpts.iterdir())):
        try:  # an unfinished start without a checkpoint: start over (with one: train.py resumes)
            remove_run_dir(run_dir)
        except UpcycleError as e:
            row.update(status="failed", reason=str(e))
            print(f"[{i}/{n}] {v.name}: FAILED before training: {e}", flush=True)
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    if files.read_mark(run_dir) is None:
        files.write_mark(run_dir, "compare-run", variant=v.name)
    files.atomic_write_json(run_dir / MARKER, {"args": args, "status": "running"})
    cmd = [sys.executable, "-m", TRAIN_MODULE, f"--config-name={config_name}", f"hydra.run.dir={run_dir}", *args]
    print(f"[{i}/{n}] {v.name}: training {row['steps']} steps ({row['tokens']:,} tokens), log {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = _train(cmd, f, timeout)
    seconds = time.perf_counter() - t0
    done = rc == 0 and (run_dir / "final_eval.json").is_file()
    if not done:
        reason = f"timed out after {timeout:g} s" if rc is None else failure_reason(log.read_text(errors="replace"), rc)
        if rc == 0:
            reason = "exited 0 without final_eval.json"
        row.update(status="failed", reason=reason, seconds=seconds)
        files.atomic_write_json(run_dir / MARKER, {"args": args, "status": "failed", "reason": reason})
        print(f"[{i}/{n}] {v.name}: FAILED after {seconds:.0f} s: {reason}", flush=True)
        return
    files.atomic_write_json(run_dir / MARKER, {"args": args, "status": "done", "seconds": seconds})
    row.update(status="done", seconds=seconds, **read_run(run_dir))
    print(f"[{i}/{n}] {v.name}: done in {seconds:.0f} s, loss {fmt(row.get('step0_loss'))} -> "
          f"{fmt(row.get('final_loss'))}", flush=True)


def _train(cmd: list[str], log, timeout: Optional[float]) -> Optional[int]:
    """Run one training process (its own process group, killed with compare); its exit code, None on timeout."""
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_dirs.child_env(),
                         start_new_session=True, preexec_fn=run_dirs.child_preexec())
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run_dirs.stop(p)
        return None
    except BaseException:  # Ctrl-C, SIGTERM as an exception: the training goes with compare
        run_dirs.stop(p)
        raise
