"""What ``nemo-upcycle eval MODEL`` accepts, resolved before anything heavy is imported, and whether it fits.

A MODEL is an HF causal-LM directory (``config.json``: Llama, Mixtral, Qwen2-MoE, ... whatever transformers' Auto
classes load), a ``.gguf`` file (transformers dequantizes it: ``from_pretrained(dir, gguf_file=NAME)``, as lm-eval's
``gguf_file`` model argument does), or a training run directory, meaning its HF export ``RUN/hf_mixtral/``. The
parameter count comes from the files' headers (safetensors JSON header, GGUF tensor infos), never from loading; the
memory needed to evaluate in fp32 on CPU is refused up front when it exceeds what this machine has available.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nemo_upcycle.errors import UpcycleError

EXPORT_DIR = "hf_mixtral"  # engine.export_scale.EXPORT_DIR: where a training run writes its export
GiB = 2**30
OVERHEAD_BYTES = 1 * GiB  # lm-eval, transformers, tokenizer, a batch of logits (fp32)
EVAL_DTYPE_BYTES = 4  # models are evaluated in float32 on the CPU


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate: how it was given, what lm-eval's HF backend loads, its size."""

    label: str  # as given on the command line
    kind: str  # "HF llama", "HF mixtral", "GGUF", "run export (HF mixtral)", ...
    pretrained: str  # the directory HFLM loads (for a GGUF: the file's directory)
    gguf_file: Optional[str]
    parameters: int

    @property
    def need_bytes(self) -> int:
        return self.parameters * EVAL_DTYPE_BYTES + OVERHEAD_BYTES

    def model_args(self, tokenizer: Optional[str] = None) -> dict:
        """lm-eval's ``--model hf --model_args`` for this model (``tokenizer``: a directory, for a GGUF)."""
        args = {"pretrained": self.pretrained, "dtype": "float32", "device": "cpu"}
        if self.gguf_file:
            args["gguf_file"] = self.gguf_file
        if tokenizer:
            args["tokenizer"] = tokenizer
        return args

    def write_tokenizer(self, out_dir: Path) -> Optional[str]:
        """A GGUF's tokenizer as HF files in ``out_dir`` (``formats.gguf``: with its bos / eos / add_bos fixed, the
        tokenizer training used), or None for an HF directory (its own files) or a GGUF that is not a Llama."""
        if not self.gguf_file:
            return None
        from nemo_upcycle.formats.base import open_dense

        try:
            src = open_dense(Path(self.pretrained) / self.gguf_file)
        except UpcycleError:
            return None  # not a Llama GGUF: transformers' own GGUF tokenizer (lm-eval's default)
        src.save_tokenizer(out_dir)
        return str(out_dir)


def _safetensors_numel(d: Path) -> int:
    n = 0
    for f in sorted(d.glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                shape = v["shape"]
                count = 1
                for s in shape:
                    count *= s
                n += count
    return n


def _hf_model(d: Path, label: str, kind_prefix: str = "HF") -> EvalModel:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UpcycleError(f"model {label}: cannot read {d / 'config.json'} ({e.__class__.__name__}); pass an HF "
                           "model directory, a .gguf file or a training run directory.") from None
    n = _safetensors_numel(d)
    if n == 0:
        bins = list(d.glob("*.bin"))
        n = sum(f.stat().st_size for f in bins) // 2  # bf16 / fp16 files; an estimate
        if not bins:
            raise UpcycleError(f"model {label}: {d} holds no weights (*.safetensors or *.bin); pass a complete HF "
                               "model directory.")
    return EvalModel(label, f"{kind_prefix} {cfg.get('model_type', '?')}", str(d.resolve()), None, n)


def _gguf_model(f: Path, label: str) -> EvalModel:
    try:
        from gguf import GGUFReader

        n = sum(int(t.n_elements) for t in GGUFReader(str(f)).tensors)
    except Exception as e:  # gguf raises ValueError, OSError, struct errors on a damaged file
        raise UpcycleError(f"model {label}: cannot read the GGUF file {f} ({e.__class__.__name__}); pass a complete "
                           ".gguf file.") from None
    return EvalModel(label, "GGUF", str(f.resolve().parent), f.name, n)


def resolve_model(arg: str) -> EvalModel:
    """The model a command-line argument names (see the module doc); one-line refusals."""
    p = Path(arg).expanduser()
    if not p.exists():
        raise UpcycleError(f"model {arg} does not exist; pass an HF model directory, a .gguf file or a training run "
                           "directory.")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UpcycleError(f"model {arg} is a file but not a .gguf; pass an HF model directory, a .gguf file or "
                               "a training run directory.")
        return _gguf_model(p, arg)
    if (p / "config.json").is_file():
        return _hf_model(p, arg)
    if (p / EXPORT_DIR / "config.json").is_file():
        return _hf_model(p / EXPORT_DIR, arg, "run export: HF")
    if (p / "run_identity.json").is_file() or (p / "metrics.jsonl").is_file():
        raise UpcycleError(f"model {arg} is a training run directory without an HF export ({EXPORT_DIR}/): the run "
                           "did not finish, ran on several ranks without a complete export, or had "
                           "logging.export_hf=false; evaluate a run that exported its model.")
    raise UpcycleError(f"model {arg} is a directory without config.json; pass an HF model directory, a .gguf file or "
                       "a training run directory (its hf_mixtral/ export).")


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(models: list[EvalModel], available: Optional[int] = None) -> None:
    """Refuse, before any model is loaded, a model whose fp32 weights and overhead exceed the available memory
    (models are evaluated one at a time)."""
    have = available_memory() if available is None else available
    for m in models:
        if m.need_bytes > have:
            raise UpcycleError(f"model {m.label} does not fit in memory: evaluating it needs about "
                               f"{m.need_bytes / GiB:.1f} GiB ({m.parameters:,} parameters in float32 + "
                               f"{OVERHEAD_BYTES / GiB:.0f} GiB) and {have / GiB:.1f} GiB are available; evaluate it "
                               "on a larger machine or free memory.")
