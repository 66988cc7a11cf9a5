"""Small Lightning data modules for NeMo's Megatron trainer: text tokenized with the dense model's tokenizer,
and deterministic mock tokens.

Each batch is the dict NeMo's ``gpt_forward_step`` expects (tokens, labels, loss_mask, position_ids and an
explicit causal attention_mask, True = masked: without Transformer Engine, Megatron's local attention needs
one). ``MegatronDataSampler`` cuts global batches into micro-batches per data-parallel rank, as in NeMo.
Text: all files are tokenized once, concatenated with EOS between documents, cut into seq_length + 1
windows; the last ``validation_fraction`` of windows is the validation split (same order on every run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from nemo import lightning as nl
from torch.utils.data import DataLoader, Dataset

from ..errors import UpcycleError


class _Windows(Dataset):
    def __init__(self, tokens: torch.Tensor, seq_length: int):
        self.tokens, self.seq = tokens, seq_length
        self.causal = torch.ones(1, seq_length, seq_length, dtype=torch.bool).triu(1)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq

    def __getitem__(self, i: int) -> dict:
        t = self.tokens[i * self.seq: (i + 1) * self.seq + 1]
        return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(self.seq), position_ids=torch.arange(self.seq),
                    attention_mask=self.causal)


class _Base(pl.LightningDataModule):
    def __init__(self, seq_length: int, micro_batch_size: int, global_batch_size: int):
        super().__init__()
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_length, micro_batch_size, global_batch_size
        self.data_sampler = nl.MegatronDataSampler(seq_len=seq_length, micro_batch_size=micro_batch_size,
                                                   global_batch_size=global_batch_size)
        self.train_ds: Optional[Dataset] = None
        self.val_ds: Optional[Dataset] = None

    def train_dataloader(self):
        return DataLoader(self.train_ds, num_workers=0, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_ds, num_workers=0, shuffle=False)


class TextTokens(_Base):
    """Plain-text / jsonl files (``{"text": ...}`` per line) tokenized with an HF tokenizer directory."""

    def __init__(self, paths: Sequence[str], tokenizer_dir: str, seq_length: int = 256, micro_batch_size: int = 1,
                 global_batch_size: int = 8, validation_fraction: float = 0.05):
        super().__init__(seq_length, micro_batch_size, global_batch_size)
        self.paths, self.tokenizer_dir, self.validation_fraction = list(paths), tokenizer_dir, validation_fraction

    def setup(self, stage: str = "") -> None:
        if self.train_ds is not None:
            return
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        ids: list[int] = []
        for p in self.paths:
            for doc in read_documents(Path(p)):
                ids += tok(doc, add_special_tokens=False).input_ids + [tok.eos_token_id or 0]
        tokens = torch.tensor(ids, dtype=torch.long)
        windows = (len(tokens) - 1) // self.seq_length
        n_val = max(1, int(windows * self.validation_fraction))
        if windows - n_val < 1:
            raise UpcycleError(f"the corpus has {len(tokens)} tokens: too few for one training and one validation "
                               f"window of {self.seq_length}; add text or lower data.seq_length.")
        cut = (windows - n_val) * self.seq_length
        self.train_ds = _Windows(tokens[: cut + 1], self.seq_length)
        self.val_ds = _Windows(tokens[cut:], self.seq_length)


def read_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise UpcycleError(f"corpus file {path} does not exist; pass existing text or jsonl files in data.paths.")
    text = path.read_text(errors="replace")
    if path.suffix == ".jsonl":
        import json

        docs = [json.loads(line).get("text", "") for line in text.splitlines() if line.strip()]
    else:
        docs = [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UpcycleError(f"corpus file {path} is empty; pass a file with text in it.")
    return docs


class MockTokens(_Base):
    """Deterministic learnable sequences (an arithmetic progression mod vocab per sample): throughput and tests."""

    def __init__(self, vocab_size: int, seq_length: int = 32, micro_batch_size: int = 2, global_batch_size: int = 4,
                 num_train: int = 4096, num_val: int = 64, seed: int = 1234):
        super().__init__(seq_length, micro_batch_size, global_batch_size)
        self.vocab_size, self.num_train, self.num_val, self.seed = vocab_size, num_train, num_val, seed

    def _make(self, n: int, offset: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + offset)
        start = torch.randint(0, self.vocab_size, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        return ((start + stride * torch.arange(self.seq_length + 1)) % self.vocab_size).reshape(-1)

    def setup(self, stage: str = "") -> None:
        if self.train_ds is None:
            self.train_ds = _Strided(self._make(self.num_train, 0), self.seq_length)
            self.val_ds = _Strided(self._make(self.num_val, 1), self.seq_length)


class _Strided(_Windows):
    """Independent samples of seq_length + 1 tokens each (no overlap between consecutive windows)."""

    def __len__(self) -> int:
        return len(self.tokens) // (self.seq + 1)

    def __getitem__(self, i: int) -> dict:
        t = self.tokens[i * (self.seq + 1): (i + 1) * (self.seq + 1)]
        return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(self.seq), position_ids=torch.arange(self.seq),
                    attention_mask=self.causal)
