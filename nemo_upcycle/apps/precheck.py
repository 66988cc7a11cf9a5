"""What ``python train.py`` refuses before NeMo is imported and before a run directory exists, beyond the config's own
ranges (``config.validate``) and the Megatron layout (``planning.plan.check_layout``); each is one ``UpcycleError``:

  check_launcher  under torchrun / srun, the processes started equal parallel.num_nodes x parallel.devices
  check_source    a dense source given as a path opens as a dense Llama (``formats.base.open_dense``: headers only),
                  its sizes are the recipe's, and data.seq_length fits its max_position_embeddings
  check_data      every corpus file exists and is text (a bounded prefix of each, ``data.text``), the corpus can hold
                  one training and one validation batch (a bound: a token is at least one byte); an explicit
                  tokenizer fits the vocabulary, else the source has a tokenizer of its own
  check_memory    a CPU run's estimated peak memory (``cpu_training_memory``) fits this machine

The keyword sources (``smollm2``, ``tiny``) and NeMo 2 checkpoints (opening one imports NeMo) are not opened here;
the engine checks them when training starts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from nemo_upcycle.config.schema import RunConfig
from nemo_upcycle.config.translate import corpus_paths, model_dims, parallel_layout, training_setup
from nemo_upcycle.data.prepare import _check_vocab, _load_tokenizer, _tokenizer_files
from nemo_upcycle.data.text import check_corpus_file
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import open_dense
from nemo_upcycle.formats.keymap import SHAPE_FIELDS, has_qkv_bias, hf_values, mismatches, model_values
from nemo_upcycle.planning.plan import (
    GiB,
    ModelDims,
    ParallelLayout,
    TrainingSetup,
    in_flight_layers,
    layer_activation_bytes,
    rank_parameters,
)
from nemo_upcycle.system.launcher import launcher_name, launcher_nodes, launcher_world

KEYWORD_SOURCES = ("smollm2", "tiny")


# ---- launcher ----------------------------------------------------------------------------------------------------
def launcher_overrides(run) -> list[str]:
    """Under torchrun / srun the processes started are the world: the ``parallel.num_nodes`` / ``parallel.devices``
    overrides that make the recipe's world theirs (none when they agree or without a launcher). ``run``: a RunConfig
    or the composed DictConfig (``run.parallel.num_nodes`` / ``devices``)."""

    started, p = launcher_nodes(), run.parallel
    if started is None or started == (p.num_nodes, p.devices):
        return []
    nodes, per_node = started
    return [f"parallel.{k}={v}" for k, v, was in (("num_nodes", nodes, p.num_nodes), ("devices", per_node, p.devices))
            if v != was]


def check_launcher(run: RunConfig) -> None:
    """Refuse a launcher world other than the recipe's (train.py takes the launcher's first: this guards the rest)."""

    world, p = launcher_world(), run.parallel
    want = p.num_nodes * p.devices
    if world is None or world == want:
        return
    fix = " ".join(launcher_overrides(run))
    raise UpcycleError(f"{launcher_name()} started {world} processes but the recipe's world is parallel.num_nodes x "
                       f"parallel.devices = {p.num_nodes} x {p.devices} = {want}; add {fix} (or start {want} "
                       f"process{'es' if want > 1 else ''}).")


# ---- the dense source --------------------------------------------------------------------------------------------
def check_source(run: RunConfig) -> Optional[dict]:
    """Open a path source (headers only) and compare it with the recipe; return its config (None: not opened)."""
    src, m = run.model.source, run.model
    if not src:
        raise UpcycleError("model.source is not set; point it at a dense HF Llama directory, .gguf or NeMo 2 "
                           "checkpoint.")
    if src in KEYWORD_SOURCES:
        return None
    p = Path(src).expanduser()
    if p.is_symlink() and not p.exists():
        raise UpcycleError(f"model.source {p} is a symbolic link that leads nowhere (broken, or a loop); point "
                           "model.source at the dense checkpoint itself.")
    if p.is_dir() and (p / "context").is_dir() and (p / "weights").is_dir():
        return None  # a NeMo 2 checkpoint: reading it needs NeMo; the engine checks it when training starts

    dense = open_dense(p)
    c = dense.config
    for key, ours, theirs in mismatches(model_values(m), hf_values(c), SHAPE_FIELDS)[:1]:
        raise UpcycleError(f"the dense source {p} has {key}={theirs} but the recipe says model.{key}={ours}; "
                           f"choose the model group of that checkpoint, or set model.{key}={theirs}.")
    if m.add_qkv_bias != has_qkv_bias(c):
        raise UpcycleError(f"the dense source {p} {'has' if has_qkv_bias(c) else 'has no'} q/k/v biases but the recipe "
                           f"says model.add_qkv_bias={m.add_qkv_bias}; use model=auto (reads the source's config) or "
                           f"set model.add_qkv_bias={has_qkv_bias(c)}.")
    if m.vocab_size < c["vocab_size"]:
        raise UpcycleError(f"the dense source {p} has a vocabulary of {c['vocab_size']} but model.vocab_size="
                           f"{m.vocab_size}; set model.vocab_size={c['vocab_size']}.")
    limit = c.get("max_position_embeddings")
    if isinstance(limit, int) and run.data.seq_length > limit:
        raise UpcycleError(f"data.seq_length={run.data.seq_length} is above the dense source's maximum positions "
                           f"({p}: max_position_embeddings={limit}; RoPE extension is not done here); lower "
                           f"data.seq_length to at most {limit}.")
    return c


# ---- calibration (issue 15) --------------------------------------------------------------------------------------
def check_calibration(run: RunConfig) -> None:
    """The calibration text and router prompts of a data-aware split or router (``data.calibration.check_spec``:
    missing, empty, not text, prompt count); the token minimum is checked when the engine tokenizes them."""
    from nemo_upcycle.config.translate import calibration_spec, upcycle_options
    from nemo_upcycle.data.calibration import check_spec

    if run.moe.num_moe_experts is None or run.mode != "train":
        return
    opts = upcycle_options(run)
    check_spec(calibration_spec(run), opts)
    if opts.reads_text and run.model.source == "tiny" and not run.data.tokenizer:
        raise UpcycleError(f"upcycle.expert_split={opts.expert_split} / upcycle.router_init={opts.router_init} reads "
                           "calibration text, but model.source=tiny is a random model made by the run, without a "
                           "tokenizer; set data.tokenizer=DIR (an HF tokenizer whose ids fit model.vocab_size).")


def check_expert_sources(run: RunConfig) -> None:
    """``model.expert_sources``: each opens as a dense Llama of the base's architecture and tokenizer
    (``formats.sources``); a keyword base (``tiny``, ``smollm2``) is checked when training starts."""
    from nemo_upcycle.formats.sources import open_expert_sources

    if not run.model.expert_sources or run.mode != "train":
        return
    if run.model.source in KEYWORD_SOURCES or run.model.source is None:
        return
    open_expert_sources(open_dense(run.model.source), run.model.expert_sources)


# ---- the corpus --------------------------------------------------------------------------------------------------
def check_data(run: RunConfig) -> None:
    """The corpus files (each one's first ``data.text.PREFIX_BYTES`` decoded), a bound on their tokens against one
    training window and one validation batch, and the tokenizer (``data.tokenizer``, or the source's)."""

    d = run.data
    if d.kind == "mock":
        return
    if d.kind == "files" and not d.paths:
        raise UpcycleError("data.kind=files needs data.paths=[file,...]: text (.txt) or jsonl ({\"text\": ...}) files.")
    most = sum(check_corpus_file(Path(p)) for p in corpus_paths(run))
    window = d.seq_length + 1  # data.prepare.split_position: the last fraction of the tokens, at least one window each
    val = max(math.ceil(most * d.validation_fraction), window)
    if most - val < window or (val - 1) // d.seq_length < d.global_batch_size:
        raise UpcycleError(f"the corpus holds at most {most} tokens (one per byte): too few for training and one "
                           f"validation batch of data.global_batch_size={d.global_batch_size} windows of "
                           f"data.seq_length={d.seq_length} tokens (data.validation_fraction={d.validation_fraction}); "
                           "add text, or lower data.seq_length or data.global_batch_size.")
    if not d.tokenizer:
        _source_has_a_tokenizer(run)
    else:

        tok_dir = Path(d.tokenizer)
        _tokenizer_files(tok_dir)
        tok = _load_tokenizer(tok_dir)
        ids = tok.get_vocab().values()
        _check_vocab(tok_dir, len(tok), max(ids) if ids else 0, run.model.vocab_size)


def _source_has_a_tokenizer(run: RunConfig) -> None:
    """Text data without data.tokenizer is tokenized with the source's own: the tiny model made by the run has none,
    an HF directory needs tokenizer.json or tokenizer.model (a GGUF carries its own)."""
    src = run.model.source
    fix = "set data.tokenizer=DIR (an HF tokenizer directory whose ids fit model.vocab_size), or use data=mock"
    if not src:
        return  # check_source refuses it
    if src == "tiny":
        raise UpcycleError(f"model.source=tiny is a random model made by the run, without a tokenizer, and data.kind="
                           f"{run.data.kind} needs one; {fix}.")
    p = Path(src).expanduser()
    if p.is_dir() and not (p / "context").is_dir() and not any((p / f).is_file() for f in ("tokenizer.json",
                                                                                           "tokenizer.model")):
        raise UpcycleError(f"the dense source {p} has no tokenizer (tokenizer.json or tokenizer.model) to tokenize "
                           f"the corpus with; {fix}.")


# ---- memory ------------------------------------------------------------------------------------------------------
CPU_BASELINE = int(0.8 * GiB)  # RSS of a training process before its model: Python, torch, NeMo, Megatron (measured)
MOCK_SAMPLES = 4096 + 64  # engine.data.MockTokens: num_train + num_val sequences of seq_length + 1 int64 tokens


def cpu_training_memory(m: ModelDims, par: ParallelLayout, tr: TrainingSetup, checkpoints: bool = True,
                        mock_data: bool = False) -> dict:
    """Peak bytes of one CPU training process (fp32, Megatron's local attention: no flash), by part.

    state: fp32 weights 4, Megatron's fp32 main-grad buffer 4, Adam m and v 8 bytes per parameter of this rank;
    transient: torch Adam's foreach temporaries (4 per parameter), or a checkpoint being written (8: its copies);
    activations: ``plan.layer_activation_bytes`` in fp32 (x2) for the layers in flight, plus per layer the softmax
    of the s x s scores kept for backward (4 b a s^2 / t), once the scores buffer and the softmax backward's
    temporaries (12 b a s^2 / t), the boolean causal masks (2 b s^2), the logits with the loss's softmax and
    gradient (12 b s V / t) and, for mock data, its token table; baseline: ``CPU_BASELINE``.
    """
    sp = max(rank_parameters(m, par), key=lambda s: s["dense"] + s["expert"])
    n = sp["dense"] + sp["expert"]
    t, b = par.tensor_model_parallel_size, tr.micro_batch_size
    s_loc, s = tr.seq_length / par.context_parallel_size, tr.seq_length
    flash = dataclasses.replace(tr, flash_attention=True)  # the scores are counted here, in fp32
    pattern = m.moe_pattern()
    per_layer = [2 * layer_activation_bytes(m, par, flash, pattern[i]) for i in sp["layers"]]
    held = in_flight_layers(m.num_layers, par, tr.num_microbatches(par), sp["stage"])
    scores = b * m.num_attention_heads / t * s_loc * s
    logits = b * s_loc * m.padded_vocab(t) / t
    act = (held * (sum(per_layer) / len(per_layer) + 4 * scores) + 12 * scores + 2 * b * s * s + 12 * logits
           + 4 * b * s_loc * m.hidden_size)
    if mock_data:
        act += 8 * MOCK_SAMPLES * (s + 1)
    parts = {"state": 16 * n, "transient": (8 if checkpoints else 4) * n, "activations": round(act),
             "baseline": CPU_BASELINE}
    return {**parts, "total": sum(parts.values()), "parameters": n}


def machine_memory() -> int:
    """Physical memory of this machine, or the cgroup's limit when lower (a container)."""
    import psutil

    total = psutil.virtual_memory().total
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_memory(run: RunConfig) -> dict:
    """Refuse a CPU run whose estimated peak (all its processes on this node) exceeds this machine's memory."""

    est = cpu_training_memory(model_dims(run), parallel_layout(run), training_setup(run),
                              checkpoints=run.trainer.checkpoint_every_n_steps > 0, mock_data=run.data.kind == "mock")
    procs = run.parallel.devices
    need, have = est["total"] * procs, machine_memory()
    if need > have:
        big = "activations" if est["activations"] > est["state"] else "state"
        fix = ("lower data.seq_length or data.micro_batch_size (attention keeps micro_batch x heads x seq^2 fp32 "
               "scores per layer)" if big == "activations" else
               "use fewer experts (moe.num_moe_experts) or a smaller model, or spread the experts over more processes")
        each = f"{procs} processes x " if procs > 1 else ""
        raise UpcycleError(f"this CPU run needs about {_size(need)} of memory ({each}weights, gradients and Adam "
                           f"{_size(est['state'])}, activations {_size(est['activations'])}, transient "
                           f"{_size(est['transient'])}, process {_size(est['baseline'])}) and this machine has "
                           f"{_size(have)}; {fix}.")
    return est


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.05 * GiB else f"{n / 2**20:.0f} MiB"
