"""Experts and routers from data: the calibration inputs, their refusals, and the pass that makes the ``UpcyclePlan``.

Inputs (``CalibrationSpec``): calibration text (``--calibration FILE``; for recipes the training corpus, of which the
first ``upcycle.calibration_tokens`` tokens are used), tokenized with the dense model's own tokenizer (or
``data.tokenizer``), cut in segments of ``SEGMENT_TOKENS``; for ``router_init=hidden`` a directory of prompt files,
one per copy (per expert at G = 1), taken in name order (mergekit-moe's one prompt set per expert).

Refused up front, in one line each, before anything heavy is imported (``check_spec``): text missing, a directory,
empty or not text (``data.text``); a split or kmeans router without calibration text; a prompt directory missing,
holding the wrong number of files, or a prompt file that is empty or not text. After tokenizing: fewer than
``MIN_CALIBRATION_TOKENS`` tokens (a unit's mean |activation| and a k-means need a few hundred samples), kmeans with
fewer tokens than experts, a prompt that tokenizes to nothing, ids outside the model's vocabulary.

``calibrate`` runs the dense model layer by layer (``data.dense_pass``) and, for each MoE layer, computes from the
MLP's intermediate activations the importance or clustering split (``core.split``) and from the router's input the
kmeans / hidden / clustered router (``core.router_init``); it records what it measured and its cost (tokens,
seconds, peak memory of the process) in ``plan.record`` (written under ``upcycling.calibration``).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers
from nemo_upcycle.data.text import NOT_TEXT_LIMIT, not_text_bytes
from nemo_upcycle.errors import UpcycleError

MIN_CALIBRATION_TOKENS = 256  # fewer: per-unit statistics and k-means rest on too few samples to mean anything
DEFAULT_CALIBRATION_TOKENS = 4096
SEGMENT_TOKENS = 256  # calibration tokens per causal sequence (or the model's max positions, if fewer)
CLUSTER_TOKENS = 1024  # tokens whose activations describe a unit for the clustering split
ACT_CHUNK = 1024  # tokens per chunk when the [tokens, F] activations are reduced


@dataclass
class CalibrationSpec:
    files: list = field(default_factory=list)  # text (.txt: one document) or jsonl ({"text": ...} per line)
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS
    prompts: Optional[Path] = None  # router_init=hidden: a directory of prompt files, one per copy
    tokenizer: Optional[Path] = None  # default: the dense source's own
    flag: str = "--calibration"  # how messages name the text
    prompts_flag: str = "--router-prompts"
    tokens_flag: str = "--calibration-tokens"

    def to_record(self) -> dict:
        return {"files": [str(f) for f in self.files], "max_tokens": self.max_tokens,
                "prompts": None if self.prompts is None else str(self.prompts)}


def check_text_file(path: Path, what: str) -> None:
    """Refuse a text input that is missing, a directory, empty, unreadable or not UTF-8 text (first 4 MiB)."""
    if path.is_dir():
        raise UpcycleError(f"{what} {path} is a directory, not a file; pass a text file.")
    if not path.is_file():
        raise UpcycleError(f"{what} {path} does not exist; pass an existing text file.")
    size = path.stat().st_size
    if size == 0:
        raise UpcycleError(f"{what} {path} is empty; pass a file with text in it.")
    try:
        with path.open("rb") as f:
            head = f.read(4 << 20)
    except OSError as e:
        raise UpcycleError(f"cannot read {what} {path} ({e.strerror}); make it readable.") from None
    bad = not_text_bytes(head, final=len(head) == size)
    if bad > NOT_TEXT_LIMIT * len(head):
        raise UpcycleError(f"{what} {path} is not text: {bad / len(head):.1%} of its first {len(head)} bytes are not "
                           "UTF-8 (undecodable or NUL); pass a UTF-8 text file.")


def prompt_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def check_spec(spec: CalibrationSpec, opts: UpcycleOptions) -> None:
    """The cheap refusals (module docstring): no model is read, nothing imported but the standard library."""
    needs_text = opts.needs_calibration
    hidden = opts.router_init_resolved == "hidden"
    if spec.files and not (needs_text or hidden) and spec.flag.startswith("--"):
        raise UpcycleError(f"{spec.flag} is read only by --split importance|clustering and --router-init "
                           "kmeans|hidden; drop it or pick one of them.")
    if spec.prompts is not None and not hidden:
        raise UpcycleError(f"{spec.prompts_flag} is read only by router_init hidden; drop it or use "
                           "router_init hidden.")
    if needs_text and not spec.files:
        why = (f"the {opts.expert_split} split" if opts.expert_split in ("importance", "clustering")
               else "the kmeans router")
        raise UpcycleError(f"{why} needs calibration text; pass {spec.flag} FILE (a UTF-8 text file).")
    if needs_text and spec.max_tokens < MIN_CALIBRATION_TOKENS:
        raise UpcycleError(f"{spec.tokens_flag} {spec.max_tokens} is below the minimum of {MIN_CALIBRATION_TOKENS} "
                           "calibration tokens; raise it.")
    if spec.files and (needs_text or hidden):
        for f in spec.files:
            check_text_file(Path(f), f"calibration text ({spec.flag})")
    if hidden:
        d = spec.prompts
        want = opts.copies
        per = "expert" if opts.granularity == 1 else f"copy (E / G = {want})"
        if d is None:
            raise UpcycleError(f"router_init hidden needs one prompt file per {per}; pass {spec.prompts_flag} DIR "
                               f"holding {want} text files.")
        d = Path(d)
        if not d.is_dir():
            raise UpcycleError(f"{spec.prompts_flag} {d} is not a directory; pass a directory of {want} prompt files.")
        files = prompt_files(d)
        if len(files) != want:
            raise UpcycleError(f"{spec.prompts_flag} {d} holds {len(files)} files, but router_init hidden needs one "
                               f"per {per}: {want}; add or remove prompt files.")
        for f in files:
            check_text_file(f, f"prompt file ({spec.prompts_flag})")


def read_documents(path: Path, max_chars: int) -> Iterator[str]:
    """The documents of a text (.txt: the whole file) or jsonl file, up to about ``max_chars`` characters."""
    import json

    with Path(path).open(encoding="utf-8", errors="replace") as f:
        if Path(path).suffix != ".jsonl":
            yield f.read(max_chars)
            return
        n = 0
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise UpcycleError(f"{path} line {i} is not a JSON object with a \"text\" field; fix the jsonl "
                                   "file.") from None
            yield text
            n += len(text)
            if n >= max_chars:
                return


def load_tokenizer(src, tokenizer: Optional[Path]):
    """``tokenizer`` (an HF tokenizer directory), else the dense source's own (``save_tokenizer`` into a temp dir)."""
    import tempfile

    from transformers import AutoTokenizer

    try:
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        with tempfile.TemporaryDirectory() as tmp:
            if not src.save_tokenizer(Path(tmp)):
                raise UpcycleError(f"the dense source {src.path} has no tokenizer to tokenize the calibration text; "
                                   "add its tokenizer files (tokenizer.json) or pass a tokenizer directory.")
            return AutoTokenizer.from_pretrained(tmp)
    except UpcycleError:
        raise
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise UpcycleError(f"cannot load the tokenizer for the calibration text ({e.__class__.__name__}); pass the "
                           "dense model's tokenizer directory.") from None


def tokenize(tok, texts: Sequence[str], vocab_size: int, limit: int):
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            break
    out = torch.tensor(ids[:limit], dtype=torch.long)
    if out.numel() and int(out.max()) >= vocab_size:
        raise UpcycleError(f"the tokenizer gives token id {int(out.max())}, outside the model's vocabulary of "
                           f"{vocab_size}; pass the dense model's own tokenizer.")
    return out


def calibration_ids(spec: CalibrationSpec, tok, vocab_size: int, opts: UpcycleOptions):
    """The first ``spec.max_tokens`` tokens of the calibration text, refused if fewer than the minimum (or than
    the experts, for kmeans)."""
    texts = (doc for f in spec.files for doc in read_documents(Path(f), spec.max_tokens * 64))
    ids = tokenize(tok, texts, vocab_size, spec.max_tokens)
    n, names = ids.numel(), ", ".join(str(f) for f in spec.files)
    if n < MIN_CALIBRATION_TOKENS:
        raise UpcycleError(f"the calibration text ({names}) has {n} tokens, below the minimum of "
                           f"{MIN_CALIBRATION_TOKENS}; pass a longer text with {spec.flag}.")
    if opts.router_init_resolved == "kmeans" and n < opts.copies:
        raise UpcycleError(f"the kmeans router needs at least one calibration token per cluster ({opts.copies}), the "
                           f"text has {n}; pass a longer text with {spec.flag}.")
    return ids


def prompt_ids(spec: CalibrationSpec, tok, vocab_size: int) -> list:
    out = []
    for f in prompt_files(Path(spec.prompts)):
        ids = tokenize(tok, [f.read_text(encoding="utf-8", errors="replace")], vocab_size, SEGMENT_TOKENS * 16)
        if ids.numel() == 0:
            raise UpcycleError(f"prompt file {f} tokenizes to nothing; put some text in it.")
        out.append(ids)
    return out


def segments_of(ids, seg: int) -> list:
    return [ids[i:i + seg] for i in range(0, ids.numel(), seg)]


def peak_rss_gib() -> float:
    """The process's peak resident memory (Linux ``ru_maxrss``, KiB), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def calibrate(src, opts: UpcycleOptions, spec: CalibrationSpec, progress: bool = True):
    """The ``UpcyclePlan`` of every MoE layer from the dense model on the calibration inputs (module docstring)."""
    from nemo_upcycle.core.plan import UpcyclePlan
    from nemo_upcycle.data.plan_stats import layer_plan

    t0 = time.perf_counter()
    check_spec(spec, opts)
    cfg = src.config
    tok = load_tokenizer(src, spec.tokenizer)
    seg = min(SEGMENT_TOKENS, cfg.get("max_position_embeddings") or SEGMENT_TOKENS)
    cal = calibration_ids(spec, tok, cfg["vocab_size"], opts) if spec.files else None
    prompts = prompt_ids(spec, tok, cfg["vocab_size"]) if opts.router_init_resolved == "hidden" else []
    segments = (segments_of(cal, seg) if cal is not None else [])
    counts = [s.numel() for s in segments]
    for p in prompts:
        segments += segments_of(p, seg)
        counts.append(-sum(min(seg, p.numel() - i) for i in range(0, p.numel(), seg)))  # negative: a prompt
    from nemo_upcycle.data.dense_pass import layer_inputs

    plan = UpcyclePlan()
    layers = resolve_moe_layers(opts.moe_layers, cfg["num_hidden_layers"])
    n_cal = sum(c for c in counts if c > 0)
    prompt_sizes = [-c for c in counts if c < 0]
    for li in layer_inputs(src, segments, layers, progress):
        perm, router, rec = layer_plan(li, opts, n_cal, prompt_sizes, CLUSTER_TOKENS, ACT_CHUNK)
        if perm is not None:
            plan.perms[li.layer] = perm
        if router is not None:
            plan.routers[li.layer] = router
        plan.record.setdefault("layers", {})[str(li.layer)] = rec
    plan.record.update(spec.to_record(), tokens=n_cal, prompt_tokens=sum(prompt_sizes),
                       seconds=round(time.perf_counter() - t0, 3), peak_rss_gib=round(peak_rss_gib(), 3),
                       split=opts.expert_split, router_init=opts.router_init_resolved)
    plan.record["summary"] = summarize(plan.record["layers"])
    return plan


def summarize(layers: dict) -> dict:
    """Means over layers of each per-layer statistic (what the report and compare show)."""
    keys = sorted({k for r in layers.values() for k, v in r.items() if isinstance(v, (int, float))})
    return {k: round(sum(r[k] for r in layers.values() if k in r) / max(1, sum(k in r for r in layers.values())), 4)
            for k in keys}


def describe(record: dict) -> str:
    """One line: what the calibration pass measured and cost."""
    s = record.get("summary", {})
    parts = [f"calibration: {record.get('tokens', 0)} tokens"
             + (f" + {record['prompt_tokens']} prompt tokens" if record.get("prompt_tokens") else ""),
             f"{record.get('seconds', 0):.1f} s", f"peak memory {record.get('peak_rss_gib', 0):.2f} GiB"]
    if "load_imbalance" in s:
        parts.append(f"first-step expert load max/mean {s['load_imbalance']:.2f} (normal router "
                     f"{s['load_imbalance_normal']:.2f})")
    if "importance_balance" in s:
        parts.append(f"importance max/min over experts {s['importance_balance']:.3f} (contiguous "
                     f"{s['importance_balance_contiguous']:.3f})")
    if "coactivation" in s:
        parts.append(f"co-activation within - across experts {s['coactivation']:.4f} (contiguous "
                     f"{s['coactivation_contiguous']:.4f})")
    return "; ".join(parts)
