"""Data modules for NeMo's Megatron trainer: a text corpus through NeMo's ``PreTrainingDataModule``, and mock tokens.

``CorpusData``: text / jsonl files -> ``data.prepare.prepare_corpus`` (``.bin/.idx`` train and validation splits,
cached by content) -> NeMo's ``PreTrainingDataModule``, i.e. Megatron-core's ``GPTDataset`` (a seeded shuffle of
``seq_length + 1``-token windows) and NeMo's ``MegatronDataSampler``. Samples carry an explicit causal
``attention_mask``: Megatron's local attention (no Transformer Engine) needs one. The corpus is prepared in
``__init__`` because NeMo's constructor checks that the files exist; the first rank to take the cache lock does it.

Exact resume: NeMo checkpoints ``consumed_samples`` and the sampler starts there, so a run restarted at step N sees
the uninterrupted run's batches (keep ``max_steps`` and ``seed``). Validation is always one epoch of the validation
windows, so its batches are the same on every run of the same corpus and seed. The ``.bin`` files are opened per
sample (``mmap_bin_files=False``): no handle stays open to interpreter exit, where Megatron's multistorageclient
wrapper prints tracebacks on close.

Upstream: megatron/core/datasets/gpt_dataset.py, nemo/collections/llm/gpt/data/pre_training.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from nemo import lightning as nl
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule
from nemo.lightning.data import WrappedDataLoader
from torch.utils.data import Dataset

from nemo_upcycle.data.prepare import PreparedCorpus, describe, prepare_corpus
from nemo_upcycle.engine.indexed import write_indexed
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.system.launcher import is_rank0


def default_cache_dir() -> Path:
    """Prepared corpora go here unless a cache_dir is given: $NEMO_UPCYCLE_DATA_CACHE or ~/.cache/nemo-upcycle/data."""
    return Path(os.environ.get("NEMO_UPCYCLE_DATA_CACHE") or Path.home() / ".cache" / "nemo-upcycle" / "data")


class PackedTokenizer(AutoTokenizer):
    """NeMo's HF tokenizer wrapper for packed pre-training windows, which are never padded: no pad id.

    Megatron's GPTDataset replaces every token equal to ``tokenizer.pad`` by 0 and masks its loss (meant for
    padded samples). SmolLM2's pad token is its EOS, so every document end would be erased; ``pad`` is -1,
    the value GPTDataset itself uses when a tokenizer has none.
    """

    @property
    def pad(self) -> int:
        return -1


class CorpusData(PreTrainingDataModule):
    """Text / jsonl files as NeMo pre-training data, split into train and validation by ``data.prepare``.

    Args: ``paths`` corpus files; ``tokenizer_dir`` the dense model's HF tokenizer directory; ``cache_dir`` root
    of the prepared-corpus cache (default ``default_cache_dir()``); ``vocab_size`` the model's vocabulary
    (every tokenizer id must be below it; None skips the check); ``seed`` GPTDataset's shuffle seed;
    ``num_workers`` DataLoader workers. Raises ``UpcycleError`` for bad input (see ``data.prepare``) and when the
    validation split holds fewer windows than one global batch.
    """

    def __init__(self, paths: Sequence[str], tokenizer_dir: str, cache_dir: Optional[str] = None,
                 seq_length: int = 256, micro_batch_size: int = 1, global_batch_size: int = 8,
                 validation_fraction: float = 0.05, vocab_size: Optional[int] = None, seed: int = 1234,
                 num_workers: int = 0):
        corpus = prepare_corpus(list(paths), tokenizer_dir, cache_dir or default_cache_dir(), seq_length=seq_length,
                                validation_fraction=validation_fraction, vocab_size=vocab_size, write=write_indexed,
                                progress=is_rank0())
        _, n_val = corpus.windows(seq_length)
        if n_val < global_batch_size:
            raise UpcycleError(f"the validation split has {n_val} windows of {seq_length} tokens, fewer than one "
                               f"global batch of {global_batch_size}; raise data.validation_fraction, add text or "
                               "lower data.global_batch_size.")
        rank_zero_info(describe(corpus))
        super().__init__(
            paths={"train": [corpus.train_prefix], "validation": [corpus.validation_prefix],
                   "test": [corpus.validation_prefix]},
            seq_length=seq_length, tokenizer=PackedTokenizer(str(tokenizer_dir)), micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
            create_attention_mask=True, seed=seed, split=None, index_mapping_dir=str(Path(corpus.dir) / "index"),
            mmap_bin_files=False)
        self.corpus: PreparedCorpus = corpus

    def build(self, trainer_max_steps: int, trainer_val_check_interval: int, trainer_limit_val_batches,
              trainer_limit_test_batches) -> None:
        # limit_val_batches=1.0 makes NeMo build exactly one epoch of validation windows (num_samples=None), the
        # same set whatever max_steps and val_check_interval are; the trainer's own limit still caps the batches.
        super().build(trainer_max_steps, trainer_val_check_interval, 1.0, trainer_limit_test_batches)



# -------------------------------------------------------------------------------------------- mock tokens


class _Strided(Dataset):
    """Independent samples of seq_length + 1 tokens each (no overlap between consecutive samples)."""

    def __init__(self, tokens: torch.Tensor, seq_length: int):
        self.tokens, self.seq = tokens, seq_length
        self.causal = torch.ones(1, seq_length, seq_length, dtype=torch.bool).triu(1)  # True = masked

    def __len__(self) -> int:
        return len(self.tokens) // (self.seq + 1)

    def __getitem__(self, i: int) -> dict:
        t = self.tokens[i * (self.seq + 1): (i + 1) * (self.seq + 1)]
        return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(self.seq), position_ids=torch.arange(self.seq),
                    attention_mask=self.causal)


class MockTokens(pl.LightningDataModule):
    """Deterministic learnable sequences (an arithmetic progression mod vocab per sample): throughput and tests.

    Resumes like ``CorpusData``: the checkpoint keeps the consumed samples and the sampler starts after them.
    """

    def __init__(self, vocab_size: int, seq_length: int = 32, micro_batch_size: int = 2, global_batch_size: int = 4,
                 num_train: int = 4096, num_val: int = 64, seed: int = 1234):
        super().__init__()
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_length, micro_batch_size, global_batch_size
        self.vocab_size, self.num_train, self.num_val, self.seed = vocab_size, num_train, num_val, seed
        self.data_sampler = nl.MegatronDataSampler(seq_len=seq_length, micro_batch_size=micro_batch_size,
                                                   global_batch_size=global_batch_size)
        self.train_ds: Optional[Dataset] = None
        self.val_ds: Optional[Dataset] = None

    def _make(self, n: int, offset: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + offset)
        start = torch.randint(0, self.vocab_size, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        return ((start + stride * torch.arange(self.seq_length + 1)) % self.vocab_size).reshape(-1)

    def setup(self, stage: str = "") -> None:
        if self.train_ds is None:
            self.train_ds = _Strided(self._make(self.num_train, 0), self.seq_length)
            self.val_ds = _Strided(self._make(self.num_val, 1), self.seq_length)

    def _loader(self, ds: Dataset, mode: str) -> WrappedDataLoader:
        # the sampler skips init_consumed_samples (train only; it tells modes apart by this attribute)
        self.data_sampler.init_global_step = self.trainer.global_step
        return WrappedDataLoader(mode=mode, dataset=ds, num_workers=0, shuffle=False)

    def train_dataloader(self):
        return self._loader(self.train_ds, "train")

    def val_dataloader(self):
        return self._loader(self.val_ds, "validation")

    def state_dict(self) -> dict:
        steps = self.trainer.global_step - self.data_sampler.init_global_step
        return {"consumed_samples": self.data_sampler.compute_consumed_samples(steps)}

    def load_state_dict(self, state: dict) -> None:
        self.data_sampler.init_consumed_samples = self.data_sampler.prev_consumed_samples = state["consumed_samples"]
