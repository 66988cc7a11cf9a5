"""What ``python train.py --config-name=NAME mode=...`` does, on a validated ``RunConfig``.

  plan    anywhere, no GPU: the layout check, parameters (total / active / per rank, equal to the model built
          on the meta device), memory per GPU, FLOPs per token, tokens/s at 46.8% MFU. Writes plan.txt / plan.json.
  verify  convert the dense source to an HF Mixtral under the run directory and prove step-0 equivalence.
  train   NeMo training (the engine); a recipe that needs GPUs stops at once on a machine without them.
Every output goes under the current directory, which Hydra sets to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .conf_schema import RunConfig, upcycle_options
from .errors import UpcycleError
from .plan import GPUS, ModelDims, ParallelLayout, TrainingSetup, format_plan, plan

CPU_RECIPES = ("smollm2_135m_upcycle", "tiny_llama_upcycle")


def model_dims(run: RunConfig) -> ModelDims:
    m, moe = run.model, run.moe
    return ModelDims(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                     num_attention_heads=m.num_attention_heads, vocab_size=m.vocab_size,
                     num_query_groups=m.num_query_groups, kv_channels=m.kv_channels,
                     share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
                     num_moe_experts=moe.num_moe_experts, moe_router_topk=moe.moe_router_topk,
                     moe_ffn_hidden_size=m.ffn_hidden_size // run.upcycle.granularity,
                     moe_layer_freq=moe.moe_layer_freq, moe_expert_capacity_factor=moe.moe_expert_capacity_factor)


def parallel_layout(run: RunConfig) -> ParallelLayout:
    p = run.parallel
    return ParallelLayout(num_nodes=p.num_nodes, gpus_per_node=p.devices,
                          tensor_model_parallel_size=p.tensor_model_parallel_size,
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                          virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                          context_parallel_size=p.context_parallel_size,
                          expert_model_parallel_size=p.expert_model_parallel_size,
                          expert_tensor_parallel_size=p.expert_tensor_parallel_size, sequence_parallel=p.sequence_parallel)


def training_setup(run: RunConfig) -> TrainingSetup:
    return TrainingSetup(seq_length=run.data.seq_length, micro_batch_size=run.data.micro_batch_size,
                         global_batch_size=run.data.global_batch_size, recompute=run.trainer.recompute,
                         bf16=run.trainer.precision.startswith("bf16"),
                         use_distributed_optimizer=run.optim.use_distributed_optimizer,
                         flash_attention=run.parallel.accelerator == "gpu")


def hf_llama_config(run: RunConfig) -> dict:
    """The dense model as an HF Llama config dict (for the meta-device build and the key layout)."""
    m = run.model
    cfg = {"model_type": "llama", "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
           "num_key_value_heads": m.num_query_groups, "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads,
           "vocab_size": m.vocab_size, "rms_norm_eps": m.layernorm_epsilon, "rope_theta": m.rotary_base,
           "max_position_embeddings": m.seq_length, "tie_word_embeddings": m.share_embeddings_and_output_weights}
    return cfg


def meta_parameter_count(run: RunConfig) -> int:
    """Parameters of transformers' MixtralForCausalLM built from this recipe on the meta device (zero memory)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from .hf.mixtral import mixtral_config

    cfg = mixtral_config(hf_llama_config(run), upcycle_options(run), torch.bfloat16)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "upcycling", "torch_dtype")}
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


def run_plan(run: RunConfig, out_dir: Path) -> str:
    pl = plan(model_dims(run), parallel_layout(run), training_setup(run), gpu=run.parallel.gpu)
    lines = [format_plan(pl)]
    if run.moe.moe_layer_freq == 1 and run.moe.num_moe_experts:  # a Mixtral needs experts
        n = meta_parameter_count(run)
        same = "equal" if n == pl.counts["total"] else f"DIFFERENT from the plan's {pl.counts['total']:,}"
        lines.append(f"meta     MixtralForCausalLM built on the meta device: {n:,} parameters ({same})")
    if not pl.fits:
        lines.append("memory   does NOT fit: raise PP / TP / EP, or trainer.recompute=full, or a smaller micro batch")
    text = "\n".join(lines)
    (out_dir / "plan.txt").write_text(text + "\n")
    record = {"counts": pl.counts, "fits": pl.fits, "peak_bytes": pl.peak["total"], "flops_per_token": pl.flops_per_token,
              "tokens_per_s_per_gpu": pl.tokens_per_s_per_gpu, "world_size": pl.parallel.world_size,
              "gpu": run.parallel.gpu, "gpu_memory_bytes": GPUS[run.parallel.gpu].memory_bytes, "warnings": pl.warnings}
    (out_dir / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
    return text


def resolve_source(run: RunConfig, out_dir: Path) -> Path:
    """The dense source path: ``smollm2`` -> the PyPI GGUF, ``tiny`` -> a random tiny Llama made here."""
    src = run.model.source
    if src == "smollm2":
        from .resources import smollm2_gguf

        return smollm2_gguf()
    if src == "tiny":
        return make_tiny_llama(run, out_dir / "dense_tiny")
    if not src:
        raise UpcycleError("model.source is not set; point it at a dense HF Llama directory, .gguf or NeMo 2 checkpoint.")
    return Path(src)


def make_tiny_llama(run: RunConfig, path: Path) -> Path:
    """A random dense Llama of the recipe's sizes at ``path``, written through a staging directory (a run killed
    while writing it leaves no half model); when several ranks write it, the first one's stays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .files import publish, staging

    if (path / "config.json").is_file():
        return path
    m = run.model
    torch.manual_seed(run.seed)
    cfg = LlamaConfig(hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                      num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                      head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
                      vocab_size=m.vocab_size, max_position_embeddings=m.seq_length, rms_norm_eps=m.layernorm_epsilon,
                      rope_theta=m.rotary_base, tie_word_embeddings=m.share_embeddings_and_output_weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging(path) as tmp:
            LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
            if (path / "config.json").is_file():
                raise FileExistsError(path)  # another rank was first: drop this copy (the staging cleanup)
            publish(tmp, path, "tiny-dense")
    except OSError:
        if not (path / "config.json").is_file():
            raise
    return path


def run_verify(run: RunConfig, out_dir: Path) -> int:
    from .convert import convert
    from .verify import verify

    src = resolve_source(run, out_dir)
    res = convert(src, out_dir / "hf_moe", upcycle_options(run), dtype="float32", overwrite=True)
    rec = res.config["upcycling"]
    print(f"step-0 equivalent by construction: {'yes' if rec['step0_equivalent'] else 'no'} ({rec['step0_note']})")
    r = verify(src, res.out_dir)
    ok = r.passed(1e-3, 1.0)
    summary = {"max_abs_logit_diff": r.max_abs, "mean_abs_logit_diff": r.mean_abs, "top1_agreement": r.top1,
               "tokens": r.tokens, "passed": ok, "source": str(src), "moe_dir": str(res.out_dir)}
    (out_dir / "verify.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"verify: max |dlogit| {r.max_abs:.3e}, mean {r.mean_abs:.3e}, top-1 agreement {r.top1:.4f}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def check_gpu(run: RunConfig, config_name: str) -> None:
    if (run.requires_gpu or run.parallel.accelerator == "gpu") and not torch.cuda.is_available():
        raise UpcycleError(f"recipe {config_name} needs {run.parallel.num_nodes * run.parallel.devices} GPUs and this machine "
                           f"has none; check it here with mode=plan, or run a CPU recipe: {', '.join(CPU_RECIPES)}.")


def preflight(run: RunConfig, config_name: str) -> None:
    """Everything that can be refused before a run directory or a model exists: for mode=train the launcher's world
    first (its fix explains a layout error that follows from it), the layout, GPUs, the dense source, the corpus and
    the memory of a CPU run (``precheck``); plan and verify: the layout."""
    from .plan import check_layout
    from .precheck import check_data, check_launcher, check_memory, check_source

    if run.mode == "train":
        check_launcher(run)
    check_layout(model_dims(run), parallel_layout(run), training_setup(run))
    if run.mode == "train":
        check_gpu(run, config_name)
        check_source(run)
        check_data(run)
        check_memory(run)


IDENTITY_FILE = "run_identity.json"
IDENTITY_GROUPS = ("model", "moe", "upcycle", "data", "parallel")


def run_identity(run: RunConfig) -> dict:
    """What makes a run's checkpoints this run's: the model, MoE, upcycling, data and layout (dotted keys).
    Trainer, optimizer and logging keys may change between restarts (e.g. more steps)."""
    flat = {"seed": run.seed}
    for group in IDENTITY_GROUPS:
        for k, v in dataclasses.asdict(getattr(run, group)).items():
            flat[f"{group}.{k}"] = v
    return json.loads(json.dumps(flat, default=str))


def check_run_dir(run: RunConfig, out_dir: Path) -> None:
    """Refuse, before training and with nothing there touched: a directory nemo-upcycle did not write, one holding
    another run's checkpoints, one whose checkpoints are all damaged, one whose ``hf_mixtral/`` the export at the end
    would replace but is not ours (``run_dir``)."""
    from .run_dir import check_contents, check_export_target, resume_checkpoint

    check_contents(out_dir)
    if run.logging.export_hf and run.moe.num_moe_experts:
        check_export_target(out_dir)
    ckpts = out_dir / "run" / "checkpoints"
    if not (ckpts.is_dir() and any(ckpts.iterdir())):
        return
    ident = out_dir / IDENTITY_FILE
    fix = "choose a new hydra.run.dir, or delete that directory to start over"
    if not ident.is_file():
        raise UpcycleError(f"run directory {out_dir} holds checkpoints of an unknown run (no {IDENTITY_FILE}); {fix}.")
    try:
        old = json.loads(ident.read_text())
    except (OSError, json.JSONDecodeError):
        raise UpcycleError(f"{ident} is unreadable, so the checkpoints in {out_dir} cannot be matched to this run; {fix}.") from None
    new = run_identity(run)
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in diff[:3])
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UpcycleError(f"run directory {out_dir} holds checkpoints of another run ({shown}{more}); {fix}.")
    resume_checkpoint(out_dir)  # refuses when no checkpoint is complete (the warning comes when training starts)


def write_run_identity(run: RunConfig, out_dir: Path) -> None:
    from .files import atomic_write_json

    atomic_write_json(out_dir / IDENTITY_FILE, run_identity(run))


def dispatch(run: RunConfig, config_name: str, out_dir: Path, prechecked: bool = False) -> int:
    """Run ``run.mode`` into ``out_dir``; ``prechecked``: train.py's precheck already ran ``preflight`` on this very
    config (it opens the source and reads the corpus: not twice)."""
    if not prechecked:
        preflight(run, config_name)
    if run.mode == "train":
        from .run_dir import start

        start(out_dir)  # this run's lock on its directory (held until exit) and its mark
        check_run_dir(run, out_dir)
    (out_dir / "resolved_config.json").write_text(json.dumps(dataclasses.asdict(run), indent=2, default=str) + "\n")
    if run.mode == "plan":
        print(run_plan(run, out_dir))
        return 0
    if run.mode == "verify":
        return run_verify(run, out_dir)
    from .engine.train import train

    return train(run, out_dir)
