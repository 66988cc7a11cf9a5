"""The smoke tasks shipped with the package: lm-eval YAML tasks (``evals/tasks/``) whose documents are built here,
deterministically and with no download, from the Shakespeare corpus's held-out part (``data.resources``: the part the
training runs never train on).

  * ``shakespeare_next_line``: a speech's first lines (after the speaker's name); which of 4 lines comes next? The
    gold line and 3 lines of other speeches of the same play (seeded draws). Metrics acc / acc_norm (lm-eval's
    multiple choice: the choice with the highest log-likelihood; acc_norm divides it by the choice's bytes).
  * ``shakespeare_cloze``: the passage of a speech up to the last word of one of its lines (a word of 4+ letters);
    which of 4 words fills the gap? The masked word and 3 line-final words of other speeches of the same play.
    Metrics acc / acc_norm as above.

Smoke tasks, not benchmarks: they show that an upcycled model still reads Shakespeare as the dense model did and
that the evaluation pipeline runs end to end; the items are few (their standard errors are wide), from one author,
in the domain the default recipe trains on. They say nothing about knowledge or reasoning (MMLU, ARC, HellaSwag:
``--tasks`` / ``--include-path`` with your own copies). lm-eval calls ``next_line`` / ``cloze`` through the YAML's
``custom_dataset: !function``; the texts come from ``shakespeare_held_out`` (one home of the split).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SMOKE_TASKS = ("shakespeare_next_line", "shakespeare_cloze")
SIZES = {"shakespeare_next_line": 25, "shakespeare_cloze": 25}  # items: seconds on the default E8 export (README)
SEED = "nemo-upcycle-smoke-v1"
_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,.'&-]*[A-Z]\.$")  # "LEONTES.", "FIRST LORD."
_WORD = re.compile(r"^(.*\s)([A-Za-z]{4,})([^A-Za-z]*)$")  # a line ending in a word of 4+ letters, then punctuation


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) of every speech in a play: a block after a blank line that starts with a name in
    capitals and a full stop; stage directions ([...]) and empty lines dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [x.strip() for x in block.split("\n") if x.strip()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        verse = [x for x in lines[1:] if not x.startswith("[") and not _SPEAKER.match(x)]
        if verse:
            out.append((lines[0], verse))
    return out


def _spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them when there are fewer)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def _plays():
    from nemo_upcycle.data.resources import shakespeare_held_out

    return [(name, speeches(text)) for name, text in shakespeare_held_out()]


def next_line_docs(n: int = SIZES["shakespeare_next_line"]) -> list[dict]:
    """The next-line items: context (speaker + 2-4 lines), 4 choices, the gold index."""
    cands = []
    for play, sp in _plays():
        pool = [x for _, verse in sp for x in verse if len(x) >= 20]
        for k, (who, verse) in enumerate(sp):
            if len(verse) < 3:
                continue
            j = min(len(verse) - 1, 4)
            gold = verse[j]
            if len(gold) < 20:
                continue
            cands.append((play, k, who, verse[:j], gold, pool))
    docs = []
    for play, k, who, before, gold, pool in _spread(cands, n):
        rng = random.Random(f"{SEED}/{play}/{k}")
        wrong = []
        while len(wrong) < 3:
            x = rng.choice(pool)
            if x != gold and x not in wrong and x not in before:
                wrong.append(x)
        label = rng.randrange(4)
        choices = wrong[:label] + [gold] + wrong[label:]
        docs.append({"id": f"{play}/{k}", "context": who + "\n" + "\n".join(before) + "\n", "choices": choices,
                     "label": label})
    return docs


def cloze_docs(n: int = SIZES["shakespeare_cloze"]) -> list[dict]:
    """The cloze items: the passage up to a line's last word (4+ letters), 4 words, the gold index."""
    cands = []
    for play, sp in _plays():
        found = []
        for k, (who, verse) in enumerate(sp):
            for j in range(1, min(len(verse), 4)):
                m = _WORD.match(verse[j])
                if m:
                    ctx = who + "\n" + "\n".join(verse[:j]) + "\n" + m.group(1).rstrip()
                    found.append((f"{play}/{k}/{j}", ctx, m.group(2)))
                    break
        pool = sorted({w for _, _, w in found})
        cands += [(i, ctx, w, pool) for i, ctx, w in found]
    docs = []
    for i, ctx, gold, pool in _spread(cands, n):
        rng = random.Random(f"{SEED}/{i}")
        wrong = []
        while len(wrong) < 3:
            x = rng.choice(pool)
            if x.lower() != gold.lower() and x not in wrong:
                wrong.append(x)
        label = rng.randrange(4)
        docs.append({"id": i, "context": ctx, "choices": wrong[:label] + [gold] + wrong[label:], "label": label})
    return docs


def _dataset(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def next_line(**_):
    """lm-eval's ``custom_dataset`` (called with the task's metadata, unused)."""
    return _dataset(next_line_docs())


def cloze(**_):
    return _dataset(cloze_docs())
