"""``nemo-upcycle``: convert a dense Llama into an HF MoE (Mixtral, Qwen2-MoE), verify it, list the recipes, compare.

  nemo-upcycle convert SRC OUT --num-experts E --topk K [--granularity G] [--router-init ...]
                       [--scaling exact|megatron] [--pre-softmax] [--drop-ratio R] [--noise-std S]
                       [--moe-layers all|every:N|i,j,..] [--shared-experts S [--shared-expert-gate]]
                       [--format auto|mixtral|qwen2_moe] [--seed N] [--dtype auto|float32|bfloat16|float16]
                       [--split contiguous|random|importance|clustering] [--calibration FILE] [--calibration-tokens N]
                       [--router-prompts DIR] [--expert-sources A,B,..] [--non-expert base|average]
  nemo-upcycle verify DENSE MOE [--text FILE] [--atol A] [--min-top1 F]
      MOE from convert: transformers' Mixtral against the dense Llama (step 0: the same function, up to --atol);
      a trained export (holds nemo_reference.safetensors): against the logits NeMo recorded at export.
  nemo-upcycle recipes                    # conf/<name>.yaml = engine/recipes/<name>.py: mode, GPUs, description
  nemo-upcycle compare --config-name=NAME [--variants a,b] [--tokens N | --steps N] [--out DIR] [key=value ...]
      dense continuation against each upcycling method (``apps.compare``); --list-variants prints them.
  nemo-upcycle eval MODEL [MODEL ...] [--tasks T1,T2] [--include-path DIR] [--limit N] [--batch-size B]
                    [--text FILE] [--out DIR]
      lm-evaluation-harness (its HF backend), perplexity and greedy samples per model, side by side (``evals``):
      MODEL is an HF directory, a .gguf file or a training run directory (its hf_mixtral/ export).

Exit codes: 0 success, 1 verification failed, 2 bad input (one line on stderr naming the fix, usage errors
included), 130 / 143 interrupted by SIGINT / SIGTERM (a convert's temporary output is removed).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

# torch.cuda imports the deprecated pynvml on every start; its FutureWarning would break the one-line errors.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from nemo_upcycle.config.compose import compose, describe, recipe_names
from nemo_upcycle.core.options import CHOICES, UpcycleOptions
from nemo_upcycle.data.calibration import (
    DEFAULT_CALIBRATION_TOKENS,
    MIN_CALIBRATION_TOKENS,
    CalibrationSpec,
    check_spec,
)
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.evals.text import PROMPTS
from nemo_upcycle.formats.base import is_nemo_checkpoint
from nemo_upcycle.formats.hf_moe import FORMAT_CHOICES
from nemo_upcycle.offline.convert import convert
from nemo_upcycle.offline.verify import (
    STEP0_ATOL,
    TrainedVerifyResult,
    verify,
)
from nemo_upcycle.system.files import Terminated


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: ``error: <problem>; <fix>`` and exit 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} -h.", file=sys.stderr)
        sys.exit(2)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="upcycle a dense Llama (HF directory or .gguf) into an HF Mixtral directory")
    p.add_argument("src", help="dense HF Llama directory or .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--num-experts", "-E", type=int, required=True, help="E, number of experts")
    p.add_argument("--topk", "-k", type=int, required=True, help="experts per token")
    p.add_argument("--granularity", "-G", type=int, default=1, help="dense FFN / expert FFN (default 1: whole copies)")
    p.add_argument("--router-init", choices=CHOICES["router_init"], default=None,
                   help="default: virtual_group when G > 1, else normal")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--split", choices=CHOICES["expert_split"], default="contiguous",
                   help="how a copy's units are dealt to its G experts (G > 1): contiguous | random | importance "
                        "(mean |activation| on --calibration) | clustering (co-activation on --calibration)")
    p.add_argument("--expert-sources", default=None, type=lambda v: tuple(x for x in v.split(",") if x),
                   help="A,B,...: dense models of the base's architecture (e.g. fine-tuned copies); copy i of every "
                        "MoE layer from source i mod n (Branch-Train-MiX). Not function-preserving")
    p.add_argument("--non-expert", choices=CHOICES["non_expert"], default="base",
                   help="with --expert-sources: attention, norms and embeddings from the base or the sources' average")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration text (UTF-8) for --split importance|clustering and --router-init kmeans")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   help=f"tokens of --calibration used (default {DEFAULT_CALIBRATION_TOKENS}, minimum "
                        f"{MIN_CALIBRATION_TOKENS})")
    p.add_argument("--router-prompts", type=Path, default=None,
                   help="--router-init hidden: a directory of prompt files, one per expert (per copy when G > 1)")
    p.add_argument("--scaling", choices=CHOICES["scaling"], default="exact",
                   help="granular weight scaling: exact (factor on down_proj) or megatron (s^(1/3) on each matrix)")
    p.add_argument("--pre-softmax", action="store_true", help="softmax then top-k (Megatron moe_router_pre_softmax)")
    p.add_argument("--norm-topk-prob", action=argparse.BooleanOptionalAction, default=None,
                   help="renormalize the top-k weights (default: yes unless --pre-softmax)")
    p.add_argument("--score-function", choices=CHOICES["moe_router_score_function"], default="softmax")
    p.add_argument("--capacity-factor", type=float, default=None, help="recorded for training; default dropless")
    p.add_argument("--drop-policy", choices=CHOICES["moe_token_drop_policy"], default="probs")
    p.add_argument("--drop-ratio", type=float, default=0.0, help="Drop-Upcycling: fraction of units re-initialized")
    p.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise added to every expert weight")
    p.add_argument("--moe-layers", default="all", help="all | every:N | comma list of layer indices")
    p.add_argument("--aux-loss-coeff", type=float, default=1e-2)
    p.add_argument("--shared-experts", type=int, default=0, metavar="S",
                   help="a shared expert of S x the routed expert size, from the dense MLP (default 0: none)")
    p.add_argument("--shared-expert-gate", action="store_true",
                   help="Megatron's sigmoid gate on the shared expert (zero at step 0: it passes exactly 1/2)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help="HF output: mixtral, qwen2_moe (shared experts, dense layers, q/k/v biases) or auto: Mixtral "
                        "when it can hold the model, else Qwen2-MoE")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", default="auto", help="auto (the source's) | float32 | bfloat16 | float16")
    p.add_argument("--shard-size-mb", type=int, default=2048)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check that the MoE computes the dense model's logits at step 0, or that a "
                                      "trained export reproduces NeMo's logits")
    p.add_argument("dense", help="dense HF Llama directory or .gguf file")
    p.add_argument("moe", help="upcycled HF Mixtral directory (from convert, or a trained export)")
    p.add_argument("--text", type=Path, default=None,
                   help="a text file to run (default: a built-in paragraph; a trained export uses its recorded tokens)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--atol", type=float, default=STEP0_ATOL, help="largest accepted |logit difference| (fp32)")
    p.add_argument("--min-top1", type=float, default=1.0, help="smallest accepted top-1 agreement")


def _add_recipes(sub) -> None:
    sub.add_parser("recipes", help="list the recipes (conf/<name>.yaml = recipes/<name>.py): mode, GPUs, description")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train dense continuation and every upcycling method on one recipe; "
                                       "write comparison.md / .png / .json (Hydra overrides key=value may follow)")
    p.add_argument("--config-name", "-cn", default="smollm2_135m_upcycle", help="the recipe (conf/<name>.yaml)")
    p.add_argument("--variants", default=None, help="comma list (default: all; --list-variants shows them)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None, help="training tokens per variant (rounded up to steps)")
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the recipe's)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default outputs/compare_<recipe>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                   help="an override for one variant only (repeatable)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: none)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant before it counts as failed")
    p.add_argument("--list-variants", action="store_true", help="print the variants and exit")


def _add_eval(sub) -> None:
    from nemo_upcycle.evals.shipped import SMOKE_TASKS

    p = sub.add_parser("eval", help="lm-eval tasks, perplexity and greedy samples for each model, side by side; "
                                    "writes eval.md / eval.json")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF model directory (Llama, Mixtral, Qwen2-MoE, ...), .gguf file, or training run directory")
    p.add_argument("--tasks", default=",".join(SMOKE_TASKS),
                   help=f"comma list of lm-eval tasks (default: the shipped smoke tasks {','.join(SMOKE_TASKS)}; "
                        "'none': no tasks)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable), e.g. your local MMLU copy")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text", default=None, metavar="FILE", help="held-out text file for perplexity")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--stride", type=int, default=256, help="perplexity stride in tokens")
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity: at most this many tokens of --text")
    p.add_argument("--no-samples", action="store_true", help="skip the greedy samples")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a tokenizer directory for every model (default: each model's own)")
    p.add_argument("--names", default=None, help="comma list of column names, one per model (default: from paths)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default outputs/eval_<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nemo-upcycle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_verify(sub)
    _add_recipes(sub)
    _add_compare(sub)
    _add_eval(sub)
    return parser


# the flag of every UpcycleOptions field the CLI sets: options are built from it, and the core's errors name fields
# by it (``--topk 9``)
OPTION_FLAGS = {"num_moe_experts": "--num-experts", "moe_router_topk": "--topk", "granularity": "--granularity",
                "scaling": "--scaling", "router_init": "--router-init", "router_std": "--router-std",
                "noise_std": "--noise-std", "drop_ratio": "--drop-ratio", "moe_layers": "--moe-layers",
                "seed": "--seed",
                "moe_router_score_function": "--score-function", "moe_router_pre_softmax": "--pre-softmax",
                "norm_topk_prob": "--norm-topk-prob", "moe_expert_capacity_factor": "--capacity-factor",
                "moe_token_drop_policy": "--drop-policy", "moe_aux_loss_coeff": "--aux-loss-coeff",
                "shared_experts": "--shared-experts", "moe_shared_expert_gate": "--shared-expert-gate",
                "expert_split": "--split", "expert_sources": "--expert-sources", "non_expert": "--non-expert"}


def upcycle_options(a: argparse.Namespace):
    """The core's ``UpcycleOptions`` from the convert flags (``OPTION_FLAGS``), validated."""
    values = {f: getattr(a, flag[2:].replace("-", "_")) for f, flag in OPTION_FLAGS.items()}
    return UpcycleOptions(**{**values, "expert_sources": values["expert_sources"] or ()}).validate()


def run_convert(a: argparse.Namespace) -> int:

    if a.shard_size_mb < 1:
        raise UpcycleError(f"--shard-size-mb {a.shard_size_mb} must be at least 1.")
    if is_nemo_checkpoint(Path(a.src).expanduser()):
        from nemo_upcycle.engine import nemo_source  # noqa: F401 -- its reader (NeMo: a slow import, only here)
    opts = upcycle_options(a)
    spec = CalibrationSpec(files=[a.calibration] if a.calibration is not None else [],
                           max_tokens=a.calibration_tokens, prompts=a.router_prompts)
    check_spec(spec, opts)
    make_plan = None
    if opts.reads_text:
        def make_plan(src):
            from nemo_upcycle.data.calibration import calibrate, describe

            plan = calibrate(src, opts, spec, progress=not a.no_progress)
            print(describe(plan.record))
            return plan
    res = convert(a.src, a.out, opts, dtype=a.dtype, overwrite=a.overwrite,
                  max_shard_bytes=a.shard_size_mb << 20, progress=not a.no_progress, fmt=a.format,
                  make_plan=make_plan)
    rec = res.config["upcycling"]
    shared = f" shared={opts.shared_experts}{'+gate' if opts.moe_shared_expert_gate else ''}" if opts.shared_experts \
        else ""
    print(f"wrote {res.out_dir} ({res.config['architectures'][0]}): {res.num_tensors} tensors, "
          f"{res.bytes_written / 2**20:.1f} MiB, E={opts.num_moe_experts} top-{opts.moe_router_topk} "
          f"G={opts.granularity}{shared}")
    print(f"step-0 equivalent: {'yes' if rec['step0_equivalent'] else 'no'} ({rec['step0_note']})")
    return 0


def run_verify(a: argparse.Namespace) -> int:

    if a.max_tokens < 1:
        raise UpcycleError(f"--max-tokens {a.max_tokens} must be at least 1.")
    if not (math.isfinite(a.atol) and a.atol >= 0):
        raise UpcycleError(f"--atol {a.atol} must be a finite number >= 0.")
    if not 0.0 <= a.min_top1 <= 1.0:  # NaN fails this too
        raise UpcycleError(f"--min-top1 {a.min_top1} must be a fraction in [0, 1].")
    text = None
    if a.text is not None:
        try:
            text = a.text.read_text()
        except OSError as e:
            raise UpcycleError(f"cannot read --text {a.text}: {e.strerror}; pass a readable text file.") from None
    r = verify(a.dense, a.moe, text, a.max_tokens)
    ok = r.passed(a.atol, a.min_top1)
    if isinstance(r, TrainedVerifyResult):
        return _print_trained(r, a, ok)
    print(f"tokens            {r.tokens} ({r.token_source})")
    print(f"max |dlogit|      {r.max_abs:.3e}   (tolerance {a.atol:g})")
    print(f"mean |dlogit|     {r.mean_abs:.3e}")
    print(f"top-1 agreement   {r.top1:.4f}   (minimum {a.min_top1:g})")
    print(f"upcycling record  {r.note}")
    if r.sources:  # several dense sources: no dense function to preserve; how close to each source instead
        for s in r.sources:
            print(f"source {s['index']}          {s['source']}: routed to its experts, max |dlogit| "
                  f"{s['max_abs']:.3e}, "
                  f"mean {s['mean_abs']:.3e}, top-1 agreement {s['top1']:.4f}")
        print("INFO: experts from several dense sources are not function-preserving; the lines above say how close "
              "the MoE is to each source (nothing to pass or fail)")
        return 0
    print("PASS: the MoE computes the dense function at step 0" if ok else "FAIL: the MoE differs from the dense model")
    return 0 if ok else 1


def _print_trained(r, a: argparse.Namespace, ok: bool) -> int:
    t = r.trained or {}
    facts = ", ".join(f"{k} {t[k]}" for k in ("steps", "tokens") if k in t)
    print(f"trained export    {a.moe} ({facts + ', ' if facts else ''}Megatron {r.reference_dtype})")
    if a.text is not None:
        print("note              --text is not used: a trained export is checked on the tokens recorded at export")
    print(f"tokens            {r.tokens} ({r.token_source})")
    print(f"max |dlogit|      {r.max_abs:.3e}   (tolerance {a.atol:g}; transformers vs NeMo's recorded logits)")
    print(f"mean |dlogit|     {r.mean_abs:.3e}")
    print(f"top-1 agreement   {r.top1:.4f}   (minimum {a.min_top1:g})")
    mx, mean, top1 = r.drift
    print(f"vs dense model    max |dlogit| {mx:.3e}, mean {mean:.3e}, top-1 agreement {top1:.4f}   "
          "(how far training moved the MoE; information, not checked)")
    if not ok and r.reference_dtype != "float32":
        print(f"hint              NeMo computed the reference in {r.reference_dtype}; pass a looser --atol for it")
    print("PASS: transformers' Mixtral reproduces the trained NeMo model's logits" if ok
          else "FAIL: transformers' Mixtral does not reproduce the logits NeMo recorded at export")
    return 0 if ok else 1


def run_recipes(a: argparse.Namespace) -> int:

    rows = []
    for name in recipe_names():
        r = compose(name)
        p = r.parallel
        if p.accelerator == "gpu":
            nodes = f"{p.num_nodes} node{'s' if p.num_nodes > 1 else ''}"
            where = f"{p.num_nodes * p.devices} x {p.gpu} ({nodes} x {p.devices})"
        else:
            where = f"CPU, {p.num_nodes * p.devices} process{'es' if p.num_nodes * p.devices > 1 else ''}"
        rows.append((name, r.mode, where, describe(name)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    print("run: python train.py --config-name=NAME [mode=plan|verify|train] [key=value ...]; "
          "NeMo-Run: from nemo_upcycle.engine.recipes.NAME import recipe")
    return 0


def run_compare(a: argparse.Namespace) -> int:
    from nemo_upcycle.apps.compare import VARIANTS, compare

    if a.list_variants:
        for v in VARIANTS:
            print(f"{v.name:18s} {v.what}")
        return 0
    bad = [x for x in a.overrides if x.startswith("-") or "=" not in x]
    if bad:
        raise UpcycleError(f"unrecognized argument(s) {' '.join(bad)}; overrides are key=value "
                           "(see nemo-upcycle compare -h).")
    result = compare(a.config_name, a.overrides, variants=a.variants, tokens=a.tokens, steps=a.steps, out=a.out,
                     sets=a.sets, keep_checkpoints=a.keep_checkpoints, timeout=a.timeout)
    failed = [r["name"] for r in result["variants"] if r["status"] != "done"]
    if failed:
        print(f"failed variants (reasons in the table): {', '.join(failed)}")
    return 0


def run_eval(a: argparse.Namespace) -> int:
    import time

    from nemo_upcycle.evals.run import EvalRequest, check_out, check_request, evaluate

    tasks = [] if a.tasks.strip().lower() in ("", "none") else [t.strip() for t in a.tasks.split(",") if t.strip()]
    req = EvalRequest(models=a.models, tasks=tasks, include_paths=a.include_path, limit=a.limit,
                      batch_size=a.batch_size, text=a.text, window=a.window, stride=a.stride,
                      max_tokens=a.max_tokens, prompts=() if a.no_samples else PROMPTS, tokenizer=a.tokenizer,
                      names=a.names.split(",") if a.names else None)
    out = a.out or Path("outputs") / f"eval_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    check_request(req)
    check_out(out)
    record = evaluate(req, out)
    from nemo_upcycle.evals.render import downstream_rows

    if record["tasks"]:
        print("\n".join(downstream_rows(record)))
    for m in record["models"]:
        if m.get("perplexity"):
            print(f"perplexity {m['name']}: {m['perplexity']['ppl']:.3f} ({m['perplexity']['tokens']:,} tokens)")
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare":
        args.overrides = extra  # Hydra overrides (key=value) may sit anywhere among the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"convert": run_convert, "verify": run_verify, "recipes": run_recipes,
                "compare": run_compare, "eval": run_eval}[args.command](args)
    except UpcycleError as e:
        print(f"error: {e.render(OPTION_FLAGS, ' ')}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a convert's staging directory is already removed (files.staging)
        print("error: interrupted by SIGINT.", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as e:  # SIGTERM / SIGHUP during a write, after its cleanup ran; exits 128 + signal
        print(f"error: interrupted by {signal.Signals(e.code - 128).name}.", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
