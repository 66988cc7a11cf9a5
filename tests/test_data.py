"""Training data: text / jsonl -> Megatron ``.bin/.idx`` (``data_prep``) -> NeMo's pre-training data module.

Checked against code nobody here wrote: the HF tokenizer's own ids (one document at a time, unbatched),
Megatron-core's ``IndexedDataset`` reader and ``GPTDataset`` indexes, NeMo's ``MegatronDataSampler`` and
``PreTrainingDataModule`` state (consumed samples). The tokenizer is a byte-level BPE trained here on
Shakespeare excerpts (vocab 300, EOS = pad = id 299 as in SmolLM2, where pad is EOS), so nothing is downloaded.

- ``prepare_corpus``: tokens round-trip (control: another text gives other tokens), the split is disjoint,
  covering, the tail; the cache is reused and invalidated by a changed file; bad input -> one-line error and
  nothing written.
- ``CorpusData`` (no trainer: NeMo's sampler API with Megatron's DP rank/size set to one process): batch keys and
  shapes, labels = tokens shifted, every sample a window of GPTDataset's document order over the prepared
  tokens, EOS kept (control: NeMo's plain tokenizer wrapper zeroes it); one validation epoch whatever the
  trainer limits; a module restored from ``state_dict`` at step N gives the fresh module's batches N, N+1, ...
- slow: the SmolLM2 tokenizer on all of Shakespeare; a real NeMo trainer on CPU stopped at step 3 and resumed
  from its checkpoint sees the uninterrupted run's batches (and losses) for steps 4-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nemo_upcycle.data import prepare as data_prep
from nemo_upcycle.data.prepare import prepare_corpus, split_documents, split_position
from nemo_upcycle.data.resources import shakespeare_texts
from nemo_upcycle.engine.indexed import write_indexed
from nemo_upcycle.errors import UpcycleError

TOK_VOCAB, SEQ, MBS, GBS, FRACTION = 300, 32, 2, 4, 0.1
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (299 ids) trained on Shakespeare, plus EOS = pad as the last id (299)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text()[:20000] for p in shakespeare_texts()[:4]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TOK_VOCAB - 1, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Two .txt excerpts (one document each) and a jsonl of speeches (a document a line; some lines without text)."""
    d = tmp_path_factory.mktemp("corpus")
    plays = shakespeare_texts()
    files = []
    for i, p in enumerate(plays[5:7]):
        files.append(d / f"play{i}.txt")
        files[-1].write_text(p.read_text()[30000:36000])
    speeches = [s for s in plays[8].read_text()[30000:40000].split("\n\n") if s.strip()]
    lines = [json.dumps({"text": s}) for s in speeches] + [json.dumps({"id": 1}), "", json.dumps({"text": ""})]
    files.append(d / "speeches.jsonl")
    files[-1].write_text("\n".join(lines) + "\n")
    return files


def reference_documents(files: list[Path], tokenizer_dir: Path) -> list[list[int]]:
    """transformers' ids of each document, one call per document, + EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = []
    for f in files:
        texts = ([json.loads(x).get("text") for x in f.read_text().splitlines() if x.strip()]
                 if f.suffix == ".jsonl" else [f.read_text()])
        docs += [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts if t]
    return docs


def read_prefix(prefix: str) -> list[np.ndarray]:
    """The documents of a Megatron indexed dataset, read by Megatron's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=False)
    return [np.asarray(ds[i]) for i in range(len(ds))]


def prepare(files, tokenizer_dir, out_dir, **kw):
    args = dict(seq_length=SEQ, validation_fraction=FRACTION, vocab_size=TOK_VOCAB, progress=False) | kw
    return prepare_corpus([str(f) for f in files], tokenizer_dir, out_dir, write=write_indexed, **args)


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare(corpus, tokenizer_dir, cache), cache


# ---------------------------------------------------------------------------------------------- data_prep


def test_data_prep_does_not_import_nemo():
    code = "import sys, nemo_upcycle.data.prepare; sys.exit(any(m.split('.')[0] == 'nemo' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_prepared_tokens_round_trip(prepared, corpus, tokenizer_dir, tmp_path):
    c, _ = prepared
    ref = reference_documents(corpus, tokenizer_dir)
    train, val = read_prefix(c.train_prefix), read_prefix(c.validation_prefix)
    assert len(ref) > 3  # two plays and several speeches
    assert (c.train_documents, c.validation_documents) == (len(train), len(val))
    # one entry per document; the document at the cut is split between the last train and first val entry
    straddle = len(train) + len(val) == len(ref) + 1
    joined = train[:-1] + [np.concatenate([train[-1], val[0]])] + val[1:] if straddle else train + val
    assert len(joined) == len(ref)
    for i, (got, want) in enumerate(zip(joined, ref)):
        assert got.tolist() == want, f"document {i}: {len(got)} tokens prepared vs {len(want)} from the tokenizer"
    assert max(max(d) for d in ref) == c.max_token_id == TOK_VOCAB - 1 and c.eos_id == TOK_VOCAB - 1
    summary = json.loads((Path(c.dir) / "corpus.json").read_text())
    assert summary["train"]["tokens"] == c.train_tokens and summary["dtype"] == "uint16"
    assert [s["documents"] for s in summary["sources"]] == [1, 1, len(ref) - 2]

    # control: another text (one word changed) gives other tokens
    other = tmp_path / "play0.txt"
    other.write_text(corpus[0].read_text().replace("the", "thy", 1))
    c2 = prepare([other, *corpus[1:]], tokenizer_dir, tmp_path / "cache")
    assert c2.key != c.key
    assert read_prefix(c2.train_prefix)[0].tolist() != ref[0]


def test_split_is_the_tail_disjoint_and_covering(prepared, corpus, tokenizer_dir):
    c, _ = prepared
    stream = np.concatenate([np.asarray(d) for d in reference_documents(corpus, tokenizer_dir)])
    train, val = np.concatenate(read_prefix(c.train_prefix)), np.concatenate(read_prefix(c.validation_prefix))
    assert c.train_tokens + c.validation_tokens == len(stream) == len(train) + len(val)
    assert c.validation_tokens == max(int(np.ceil(len(stream) * FRACTION)), SEQ + 1)
    assert np.array_equal(train, stream[: len(train)]) and np.array_equal(val, stream[len(train):])


def test_split_documents_and_minimum_windows():
    docs = [np.arange(5), np.arange(5, 8), np.arange(8, 12)]
    train, val = split_documents(docs, 6)  # cuts the second document
    assert [d.tolist() for d in train] == [[0, 1, 2, 3, 4], [5]]
    assert [d.tolist() for d in val] == [[6, 7], [8, 9, 10, 11]]
    train, val = split_documents(docs, 8)  # on a document boundary: nothing split
    assert [len(d) for d in train] == [5, 3] and [len(d) for d in val] == [4]
    assert split_position(1000, 32, 0.05) == 1000 - 50
    assert split_position(100, 32, 0.05) == 100 - 33  # at least one window of seq_length + 1
    with pytest.raises(UpcycleError, match="too few"):
        split_position(65, 32, 0.05)


def test_cache_reused_then_invalidated_by_a_changed_file(corpus, tokenizer_dir, tmp_path, monkeypatch):
    files = [Path(tmp_path / f.name) for f in corpus]
    for src, dst in zip(corpus, files):
        dst.write_bytes(src.read_bytes())
    cache = tmp_path / "cache"
    first = prepare(files, tokenizer_dir, cache)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(first.dir).iterdir()}
    with monkeypatch.context() as m:
        m.setattr(data_prep, "_build", lambda *a, **k: pytest.fail("the cache entry was rebuilt"))
        again = prepare(files, tokenizer_dir, cache)
    assert again.reused and not first.reused and again.dir == first.dir
    assert {p.name: p.stat().st_mtime_ns for p in Path(first.dir).iterdir()} == stamps
    with files[1].open("a") as f:
        f.write("\nExeunt all.\n")
    changed = prepare(files, tokenizer_dir, cache)
    assert not changed.reused and changed.key != first.key and changed.train_tokens > first.train_tokens
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.key, changed.key])  # no temporary left
    # the model's vocabulary is checked on a cache hit too
    with pytest.raises(UpcycleError, match="has 300 tokens but the model's vocabulary is 200"):
        prepare(files, tokenizer_dir, cache, vocab_size=200)


def test_no_lock_file_remains_after_prepare_corpus(corpus, tokenizer_dir, tmp_path, monkeypatch):
    import tempfile

    locks = tmp_path / "locks"
    locks.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(locks))
    seen = []
    build = data_prep._build

    def watched(*a, **k):  # negative control: while the entry is prepared, the lock file is there
        seen.extend(p.name for p in locks.iterdir())
        return build(*a, **k)

    monkeypatch.setattr(data_prep, "_build", watched)
    c = prepare(corpus, tokenizer_dir, tmp_path / "cache")
    assert seen == [f"nemo-upcycle-data-{c.key}.lock"] and list(locks.iterdir()) == []
    prepare(corpus, tokenizer_dir, tmp_path / "cache")  # a cache hit takes and removes it too
    assert list(locks.iterdir()) == []


def test_damaged_entry_is_replaced_only_if_ours_else_moved_aside(corpus, tokenizer_dir, tmp_path, capsys):
    from nemo_upcycle.system.files import MARK, read_mark, write_mark

    cache = tmp_path / "cache"
    first = prepare(corpus, tokenizer_dir, cache)
    entry = Path(first.dir)
    assert read_mark(entry)["kind"] == "data-cache" and read_mark(entry)["key"] == first.key
    stale = cache / f".{first.key}.tmp-999999999-x"  # a killed process's temporary entry (marked, process gone)
    stale.mkdir()
    write_mark(stale, "staging", target=str(entry))
    (stale / MARK).write_text(json.dumps(json.loads((stale / MARK).read_text()) | {"pid": 999999999}))
    foreign_tmp = cache / f".{first.key}.tmp-1-user"  # negative control: unmarked, never swept
    foreign_tmp.mkdir()
    (foreign_tmp / "notes.txt").write_text("a user's file")
    (entry / "train.bin").write_bytes(b"\0" * 10)  # damaged: not as corpus.json records
    again = prepare(corpus, tokenizer_dir, cache)
    assert not again.reused and again.dir == first.dir and data_prep._load_cached(entry, first.key) is not None
    assert not stale.exists() and (foreign_tmp / "notes.txt").read_text() == "a user's file"
    assert capsys.readouterr().err == ""
    # an entry without our mark (written before marks existed, or not by us): moved aside, never deleted
    (entry / MARK).unlink()
    (entry / "train.bin").write_bytes(b"\1" * 10)
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    third = prepare(corpus, tokenizer_dir, cache)
    assert not third.reused and data_prep._load_cached(entry, first.key) is not None
    (aside,) = cache.glob(f"{first.key}.damaged-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"moved it to {aside}" in err and "not deleted" in err, err


def _bad(tmp_path: Path, tokenizer_dir: Path, corpus: list[Path], case: str):
    """(paths, tokenizer dir, extra kwargs) for a bad-input case."""
    f = tmp_path / "in.txt"
    if case == "missing file":
        return [tmp_path / "nope.txt"], tokenizer_dir, {}
    if case == "empty file":
        f.write_text("  \n\n")
        return [corpus[0], f], tokenizer_dir, {}
    if case == "jsonl without text":
        f = tmp_path / "in.jsonl"
        f.write_text(json.dumps({"content": "no text key"}) + "\n" + json.dumps({"text": ""}) + "\n")
        return [f], tokenizer_dir, {}
    if case == "too small":
        f.write_text("Enter a Messenger.")
        return [f], tokenizer_dir, {}
    if case == "vocab too small":
        return corpus, tokenizer_dir, {"vocab_size": 256}
    if case == "missing tokenizer":
        return corpus, tmp_path / "no_tokenizer", {}
    if case == "unreadable tokenizer":
        d = tmp_path / "broken_tokenizer"
        d.mkdir()
        (d / "tokenizer.json").write_text("{not json")
        return corpus, d, {}
    raise AssertionError(case)


BAD = {"missing file": ("nope.txt does not exist", "data.paths"),
       "empty file": ("in.txt has no text", "pass files with text"),
       "jsonl without text": ('in.jsonl has no text (no non-empty "text" field', "pass files with text"),
       "too small": ("too few for one training and one validation window of seq_length 32", "add text"),
       "vocab too small": ("has 300 tokens but the model's vocabulary is 256", "use the dense model's own tokenizer"),
       "missing tokenizer": ("no_tokenizer does not exist", "tokenizer directory"),
       "unreadable tokenizer": ("cannot load the tokenizer in", "pass the dense model's tokenizer directory")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, corpus, tokenizer_dir, tmp_path):
    paths, tok, kw = _bad(tmp_path, tokenizer_dir, corpus, case)
    out = tmp_path / "cache"
    with pytest.raises(UpcycleError) as e:
        prepare(paths, tok, out, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(words in msg for words in BAD[case]), msg
    assert not out.exists(), f"{case}: {sorted(out.rglob('*'))} left behind"


# ---------------------------------------------------------------------------------------------- data module


@pytest.fixture()
def one_process(monkeypatch):
    """Megatron's data-parallel rank/size and NeMo's app state as a one-process trainer sets them; a fresh
    microbatch calculator (a process-wide singleton) for each test."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from nemo.utils import AppState

    monkeypatch.setattr(parallel_state, "_MPU_DATA_PARALLEL_WORLD_SIZE", 1)
    monkeypatch.setattr(parallel_state, "_MPU_DATA_PARALLEL_RANK", 0)
    monkeypatch.setattr(AppState(), "_data_parallel_size", 1)
    destroy_num_microbatches_calculator()
    yield
    destroy_num_microbatches_calculator()


def data_module(corpus, tokenizer_dir, cache, step=0, max_steps=20, val_check_interval=5, limit_val_batches=2,
                tokenizer=None, **kw):
    """A CorpusData attached to a stand-in trainer (what NeMo's strategy and Lightning would attach), set up."""
    from nemo import lightning as nl

    from nemo_upcycle.engine.data import CorpusData

    dm = CorpusData([str(f) for f in corpus], str(tokenizer_dir), str(cache), seq_length=SEQ, micro_batch_size=MBS,
                    global_batch_size=GBS, validation_fraction=FRACTION, vocab_size=TOK_VOCAB, **kw)
    if tokenizer is not None:
        dm.tokenizer = tokenizer
    trainer = SimpleNamespace(global_step=step, max_steps=max_steps, val_check_interval=val_check_interval,
                              limit_val_batches=limit_val_batches, limit_test_batches=1,
                              strategy=nl.MegatronStrategy())
    dm.trainer = trainer
    dm.data_sampler.connect(trainer)
    dm.data_sampler.setup(0)
    dm.setup("fit")
    return dm


def micro_batches(dm, n: int, mode: str = "train") -> list[dict]:
    """The first n micro-batches NeMo's MegatronDataSampler draws (DP = 1: GBS / MBS per step)."""
    loader = dm.data_sampler.transform_dataloader(dm.train_dataloader() if mode == "train" else dm.val_dataloader())
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def windows(ds) -> torch.Tensor:
    """Every GPTDataset sample rebuilt from its indexes: the documents (read with Megatron's reader) in
    document_index order, cut at sample_index (document position, offset) into seq_length + 1 windows."""
    docs = read_prefix(ds.dataset.path_prefix)
    order = np.asarray(ds.document_index)
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in order])])
    stream = np.concatenate([docs[d] for d in order]).astype(np.int64)
    first = [starts[p] + o for p, o in np.asarray(ds.sample_index)[:-1]]
    by_index = np.stack([stream[s: s + SEQ + 1] for s in first])
    return torch.from_numpy(by_index[np.asarray(ds.shuffle_index)])


def test_batches_are_shifted_windows_of_the_prepared_tokens(corpus, tokenizer_dir, tmp_path, one_process):
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    dm = data_module(corpus, tokenizer_dir, tmp_path / "cache")
    n_train, n_val = dm.corpus.windows(SEQ)
    assert n_train >= 20 * GBS and (len(dm._train_ds), len(dm._validation_ds)) == (n_train, n_val)  # one epoch
    batch = micro_batches(dm, 1)[0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (MBS, SEQ), "labels": (MBS, SEQ), "loss_mask": (MBS, SEQ), "position_ids": (MBS, SEQ),
        "attention_mask": (MBS, 1, SEQ, SEQ)}
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(MBS, SEQ))
    assert torch.equal(batch["attention_mask"], torch.ones(MBS, 1, SEQ, SEQ, dtype=torch.bool).triu(1))  # True = masked
    assert bool((batch["loss_mask"] == 1).all())

    want = windows(dm._train_ds)
    got = torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in (dm._train_ds[i] for i in range(len(want)))])
    assert torch.equal(got, want), f"{int((got != want).any(1).sum())} of {len(want)} samples differ"
    eos = dm.corpus.eos_id
    with_eos = (want[:, :-1] == eos).any(1)
    assert with_eos.any(), "no sample holds a document end: the EOS check below would prove nothing"
    i = int(with_eos.nonzero()[0])
    assert bool((dm._train_ds[i]["loss_mask"] == 1).all())

    # control: NeMo's plain wrapper reports pad = EOS (as SmolLM2's tokenizer does): GPTDataset zeroes every EOS
    plain = data_module(corpus, tokenizer_dir, tmp_path / "cache", tokenizer=AutoTokenizer(str(tokenizer_dir)))
    assert plain.tokenizer.pad == eos
    s = plain._train_ds[i]
    assert not torch.equal(s["tokens"], want[i, :-1]) and not (s["tokens"] == eos).any()


def test_validation_is_one_fixed_epoch(corpus, tokenizer_dir, tmp_path, one_process):
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    a = data_module(corpus, tokenizer_dir, tmp_path / "cache", max_steps=20, val_check_interval=5, limit_val_batches=2)
    vals = micro_batches(a, 10**6, mode="validation")
    b = data_module(corpus, tokenizer_dir, tmp_path / "cache", max_steps=7, val_check_interval=3, limit_val_batches=9)
    assert len(a._validation_ds) == len(b._validation_ds) == a.corpus.windows(SEQ)[1]
    assert len(vals) == a.corpus.windows(SEQ)[1] // GBS * (GBS // MBS)  # whole global batches of one epoch
    assert same(micro_batches(b, 10**6, mode="validation"), vals)
    assert torch.equal(windows(b._validation_ds), windows(a._validation_ds))
    # control: NeMo's own count (from max_steps, val_check_interval, limit_val_batches) is another dataset size
    PreTrainingDataModule.build(b, 7, 3, 9, 1)
    assert len(b._validation_ds) != len(a._validation_ds)


def test_restored_module_continues_at_the_consumed_samples(corpus, tokenizer_dir, tmp_path, one_process):
    N, per_step = 3, GBS // MBS
    fresh = data_module(corpus, tokenizer_dir, tmp_path / "cache")
    uninterrupted = micro_batches(fresh, 8 * per_step)
    fresh.trainer.global_step = N  # what the checkpoint at step N stores
    state = fresh.state_dict()
    assert state == {"consumed_samples": N * GBS}

    resumed = data_module(corpus, tokenizer_dir, tmp_path / "cache", step=N)
    resumed.load_state_dict(state)  # Lightning's restore of the datamodule state
    assert same(micro_batches(resumed, 5 * per_step), uninterrupted[N * per_step:])
    assert same(micro_batches(resumed, per_step, mode="validation"), micro_batches(fresh, per_step, mode="validation"))
    resumed.trainer.global_step = N + 2  # a later checkpoint counts from the restored samples
    assert resumed.state_dict() == {"consumed_samples": (N + 2) * GBS}
    # control: without the restored state the module starts from the first batch again
    again = data_module(corpus, tokenizer_dir, tmp_path / "cache", step=N)
    assert not same(micro_batches(again, per_step), uninterrupted[N * per_step:(N + 1) * per_step])


def test_validation_smaller_than_a_global_batch_is_refused(corpus, tokenizer_dir, tmp_path):
    from nemo_upcycle.engine.data import CorpusData

    with pytest.raises(UpcycleError, match="fewer than one global batch of 64"):
        CorpusData([str(f) for f in corpus], str(tokenizer_dir), str(tmp_path), seq_length=SEQ, global_batch_size=64,
                   validation_fraction=0.02, vocab_size=TOK_VOCAB)


def test_mock_tokens_resume(one_process):
    from nemo import lightning as nl

    from nemo_upcycle.engine.data import MockTokens

    def module(step):
        dm = MockTokens(vocab_size=97, seq_length=16, micro_batch_size=MBS, global_batch_size=GBS, num_train=64)
        dm.trainer = SimpleNamespace(global_step=step, strategy=nl.MegatronStrategy())
        dm.data_sampler.connect(dm.trainer)
        dm.data_sampler.setup(0)
        dm.setup()
        return dm

    fresh = module(0)
    uninterrupted = micro_batches(fresh, 6 * 2)
    fresh.trainer.global_step = 2
    resumed = module(2)
    resumed.load_state_dict(fresh.state_dict())
    assert same(micro_batches(resumed, 4 * 2), uninterrupted[4:])
    assert same(micro_batches(resumed, 2, mode="validation"), micro_batches(module(0), 2, mode="validation"))


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_smollm2_tokenizer_on_all_of_shakespeare(tmp_path):
    import time

    from transformers import AutoTokenizer

    from nemo_upcycle.data.resources import smollm2_gguf
    from nemo_upcycle.formats.base import open_dense

    tok_dir = tmp_path / "tokenizer"
    open_dense(smollm2_gguf()).save_tokenizer(tok_dir)
    files = shakespeare_texts()
    t0 = time.time()
    c = prepare_corpus(files, tok_dir, tmp_path / "cache", seq_length=256, validation_fraction=0.05,
                       write=write_indexed, vocab_size=49152, progress=False)
    seconds = time.time() - t0
    t0 = time.time()
    assert prepare_corpus(files, tok_dir, tmp_path / "cache", seq_length=256, validation_fraction=0.05,
                          write=write_indexed, vocab_size=49152).reused
    assert time.time() - t0 < 1.0
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    first = tok(files[0].read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    last = tok(files[-1].read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    train, val = read_prefix(c.train_prefix), read_prefix(c.validation_prefix)
    assert train[0].tolist() == first and val[-1].tolist() == last
    total = c.train_tokens + c.validation_tokens
    assert c.train_documents + c.validation_documents in (len(files), len(files) + 1)
    assert c.validation_tokens == int(np.ceil(total * 0.05)) and total > 1_000_000
    print(f"SmolLM2 tokenizer, {len(files)} texts: {total} tokens in {seconds:.1f} s")
    with pytest.raises(UpcycleError, match="has 49152 tokens but the model's vocabulary is 32000"):
        prepare_corpus(files, tok_dir, tmp_path / "cache", seq_length=256, validation_fraction=0.05,
                       write=write_indexed, vocab_size=32000)


@pytest.mark.slow
def test_trainer_resumed_from_a_checkpoint_sees_the_uninterrupted_batches(corpus, tokenizer_dir, tmp_path):
    """A real nl.Trainer + MegatronStrategy on CPU (a one-layer GPT, 6 steps): stopped after step 3 and
    checkpointed, then resumed with ``ckpt_path`` (as AutoResume does): its samples and losses for steps 4-6
    are the uninterrupted run's (control: its first samples are not the uninterrupted run's first ones)."""
    plan = dict(corpus=[str(f) for f in corpus], tokenizer=str(tokenizer_dir), cache=str(tmp_path / "cache"),
                ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "results.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, json.dumps(plan)], cwd=tmp_path, env=env, timeout=1200,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    r = json.loads(Path(plan["out"]).read_text())  # per run: losses, and sample checksums in collate order
    full, stopped, resumed = r["full"], r["stopped"], r["resumed"]
    assert len(full["losses"]) == 6 and len(stopped["losses"]) == 3 and len(resumed["losses"]) == 3
    assert stopped["train"][: 3 * GBS] == full["train"][: 3 * GBS]
    assert resumed["train"][: 3 * GBS] == full["train"][3 * GBS: 6 * GBS]
    assert resumed["train"][:GBS] != full["train"][:GBS]
    # each validation starts from the first validation sample (limit_val_batches=1: one global batch)
    assert full["val"] == full["val"][:GBS] * 2 and resumed["val"][-GBS:] == full["val"][:GBS]
    diff = max(abs(a - b) for a, b in zip(resumed["losses"], full["losses"][3:]))
    assert diff <= 1e-5, f"losses after resume differ by {diff}: {resumed['losses']} vs {full['losses'][3:]}"


def _trainer_runs(plan: dict) -> None:
    """The subprocess of the test above: three runs in this process (importing NeMo once)."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_upcycle.engine import cpu
    from nemo_upcycle.engine.data import CorpusData

    cpu.enable_cpu_support()

    class Recorded(CorpusData):
        """CorpusData that notes a checksum of every sample it collates, in order."""

        seen = {"train": [], "val": []}

        def _create_dataloader(self, dataset, mode, **kwargs):
            key = "train" if mode == "train" else "val"

            def collate(samples):
                self.seen[key].append([zlib.crc32(s["tokens"].numpy().tobytes()) for s in samples])
                return torch.utils.data.default_collate(samples)

            dataset.collate_fn = collate
            return super()._create_dataloader(dataset, mode, **kwargs)

    class Steps(pl.Callback):
        def __init__(self, stop_at=None, save=None):
            self.losses, self.stop_at, self.save = [], stop_at, save

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(trainer.callback_metrics["reduced_train_loss"]))
            if trainer.global_step == self.stop_at:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            if self.save:
                trainer.save_checkpoint(self.save)

    def run(stop_at=None, save=None, ckpt_path=None) -> dict:
        torch.manual_seed(1234)
        os.environ.pop("MASTER_PORT", None)  # a fresh port for each run's process group
        config = llm.GPTConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=TOK_VOCAB, seq_length=SEQ, normalization="RMSNorm", activation_func=F.silu,
            gated_linear_unit=True, position_embedding_type="rope", add_bias_linear=False,
            share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=False,
            params_dtype=torch.float32, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            **cpu.cpu_config_overrides())
        optim = nl.MegatronOptimizerModule(OptimizerConfig(optimizer="adam", lr=3e-3, bf16=False,
                                                           use_distributed_optimizer=False))
        steps = Steps(stop_at, save)
        trainer = nl.Trainer(accelerator="cpu", devices=1, max_steps=6, val_check_interval=3, limit_val_batches=1,
                             num_sanity_val_steps=0, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                             callbacks=[steps], plugins=nl.MegatronMixedPrecision(precision="32"),
                             strategy=nl.MegatronStrategy(**cpu.cpu_strategy_kwargs()))
        Recorded.seen = {"train": [], "val": []}
        data = Recorded(plan["corpus"], plan["tokenizer"], plan["cache"], seq_length=SEQ, micro_batch_size=MBS,
                        global_batch_size=GBS, validation_fraction=FRACTION, vocab_size=TOK_VOCAB)
        trainer.fit(llm.GPTModel(config, optim=optim), data, ckpt_path=ckpt_path)
        destroy_num_microbatches_calculator()
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        flat = {k: [x for batch in v for x in batch] for k, v in Recorded.seen.items()}
        return dict(losses=steps.losses, **flat)

    results = {"full": run(), "stopped": run(stop_at=3, save=plan["ckpt"])}
    results["resumed"] = run(ckpt_path=plan["ckpt"])
    Path(plan["out"]).write_text(json.dumps(results))


if __name__ == "__main__":  # the subprocess of the trainer test; distributed checkpointing re-imports __main__
    _trainer_runs(json.loads(sys.argv[1]))
