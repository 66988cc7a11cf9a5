"""What ``python train.py --config-name=NAME mode=...`` does, on a validated ``RunConfig``.

  plan    anywhere, no GPU: the layout check, parameters (total / active / per rank, equal to the model built
          on the meta device), memory per GPU, FLOPs per token, tokens/s at 46.8% MFU. Writes plan.txt / plan.json.
  verify  convert the dense source to an HF Mixtral under the run directory and prove step-0 equivalence.
  train   NeMo training (the engine); a recipe that needs GPUs stops at once on a machine without them.
Every output goes under the current directory, which Hydra sets to the run directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from nemo_upcycle.apps.end_eval import check_eval_tasks
from nemo_upcycle.apps.precheck import (
    check_calibration,
    check_data,
    check_expert_sources,
    check_launcher,
    check_memory,
    check_source,
)
from nemo_upcycle.apps.run_dir import check_run_dir, claim
from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.config.translate import hf_llama_config, model_dims, parallel_layout, training_setup, upcycle_options
from nemo_upcycle.config.validate import check_layout
from nemo_upcycle.data.sources import resolve_source
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.mixtral import mixtral_config
from nemo_upcycle.offline.convert import convert
from nemo_upcycle.offline.verify import STEP0_ATOL, verify
from nemo_upcycle.planning.flops import GPUS
from nemo_upcycle.planning.plan import format_plan, plan
from nemo_upcycle.system.files import atomic_write_json, atomic_write_text

CPU_RECIPES = ("smollm2_135m_upcycle", "tiny_llama_upcycle")


def meta_parameter_count(run: RunConfig) -> int:
    """Parameters of transformers' MixtralForCausalLM built from this recipe on the meta device (zero memory)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = mixtral_config(hf_llama_config(run), upcycle_options(run), torch.bfloat16)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "upcycling", "torch_dtype")}
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


def run_plan(run: RunConfig, out_dir: Path) -> str:
    pl = plan(model_dims(run), parallel_layout(run), training_setup(run), gpu=run.parallel.gpu)
    lines = [format_plan(pl)]
    if run.moe.moe_layer_freq == 1 and run.moe.num_moe_experts and not run.moe.moe_shared_expert_intermediate_size:
        n = meta_parameter_count(run)
        same = "equal" if n == pl.counts["total"] else f"DIFFERENT from the plan's {pl.counts['total']:,}"
        lines.append(f"meta     MixtralForCausalLM built on the meta device: {n:,} parameters ({same})")
    if not pl.fits:
        lines.append("memory   does NOT fit: raise PP / TP / EP, or trainer.recompute=full, or a smaller micro batch")
    text = "\n".join(lines)
    atomic_write_text(out_dir / "plan.txt", text + "\n")
    record = {"counts": pl.counts, "fits": pl.fits, "peak_bytes": pl.peak["total"],
              "flops_per_token": pl.flops_per_token,
              "tokens_per_s_per_gpu": pl.tokens_per_s_per_gpu, "world_size": pl.parallel.world_size,
              "gpu": run.parallel.gpu, "gpu_memory_bytes": GPUS[run.parallel.gpu].memory_bytes, "warnings": pl.warnings}
    atomic_write_json(out_dir / "plan.json", record)
    return text


def run_verify(run: RunConfig, out_dir: Path) -> int:

    src = resolve_source(run.model.source, out_dir, run.model, run.seed)
    res = convert(src, out_dir / "hf_moe", upcycle_options(run), dtype="float32", overwrite=True)
    rec = res.config["upcycling"]
    print(f"step-0 equivalent by construction: {'yes' if rec['step0_equivalent'] else 'no'} ({rec['step0_note']})")
    r = verify(src, res.out_dir)
    ok = r.passed(STEP0_ATOL, 1.0)
    summary = {"max_abs_logit_diff": r.max_abs, "mean_abs_logit_diff": r.mean_abs, "top1_agreement": r.top1,
               "tokens": r.tokens, "passed": ok, "source": str(src), "moe_dir": str(res.out_dir)}
    atomic_write_json(out_dir / "verify.json", summary)
    print(f"verify: max |dlogit| {r.max_abs:.3e}, mean {r.mean_abs:.3e}, top-1 agreement {r.top1:.4f}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def check_gpu(run: RunConfig, config_name: str) -> None:
    """What only a GPU runs, refused in one line on a machine without one (training only; plan mode runs anywhere)."""
    if (run.requires_gpu or run.parallel.accelerator == "gpu") and not torch.cuda.is_available():
        raise UpcycleError(f"recipe {config_name} needs {run.parallel.num_nodes * run.parallel.devices} GPUs and this "
                           f"machine has none; check it here with mode=plan, or run a CPU recipe: "
                           f"{', '.join(CPU_RECIPES)}.")
    te = importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()
    if run.parallel.context_parallel_size > 1 and not te:
        raise UpcycleError(f"parallel.context_parallel_size={run.parallel.context_parallel_size} needs Transformer "
                           "Engine's attention (TEDotProductAttention, Megatron's only context-parallel attention) on "
                           "CUDA GPUs, which this machine lacks; set parallel.context_parallel_size=1 here (check a "
                           "CP layout with mode=plan).")


def preflight(run: RunConfig, config_name: str) -> None:
    """Everything that can be refused before a run directory or a model exists: for mode=train the launcher's world
    first (its fix explains a layout error that follows from it), the layout, GPUs, the dense source, the corpus and
    the memory of a CPU run (``precheck``); plan and verify: the layout."""

    if run.mode == "train":
        check_launcher(run)
    check_layout(run)
    if run.mode == "train":
        check_gpu(run, config_name)
        check_source(run)
        check_data(run)
        check_calibration(run)
        check_expert_sources(run)
        check_memory(run)
        check_eval_tasks(run)


def dispatch(run: RunConfig, config_name: str, out_dir: Path, prechecked: bool = False) -> int:
    """Run ``run.mode`` into ``out_dir``; ``prechecked``: train.py's precheck already ran ``preflight`` on this very
    config (it opens the source and reads the corpus: not twice)."""
    if not prechecked:
        preflight(run, config_name)
    if run.mode == "train":

        claim(out_dir)  # this run's lock on its directory, held until exit (the mark comes when training starts)
        check_run_dir(run, out_dir)
    atomic_write_json(out_dir / "resolved_config.json", dataclasses.asdict(run))
    if run.mode == "plan":
        print(run_plan(run, out_dir))
        return 0
    if run.mode == "verify":
        return run_verify(run, out_dir)
    from nemo_upcycle.apps.training import train

    return train(run, out_dir)
