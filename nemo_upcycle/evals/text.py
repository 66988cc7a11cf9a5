"""Perplexity on a held-out text file and greedy samples: the two things read first after an upcycle, per model.

Perplexity is transformers' sliding-window recipe (docs: "Perplexity of fixed-length models"): windows of ``window``
tokens that start every ``stride`` tokens; each window scores only the tokens not scored by the one before, with
the rest as context, so every token after the first is scored once, with up to ``window - 1`` tokens of context.
Token-weighted: exp(sum of the negative log-likelihoods / number of scored tokens), in the model's own tokenizer
(so perplexities of models with different tokenizers are not comparable; the table says which tokenizer).
Samples: ``generate`` with greedy decoding (no sampling) on ``PROMPTS``, the same for every model.
"""

from __future__ import annotations

from typing import Optional

import torch

PROMPTS = (
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
    "LEONTES.\nGo, play, boy, play; thy mother plays, and I\n",
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n",
)
NEW_TOKENS = 32


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tok, text: str, window: int, stride: int, max_tokens: Optional[int] = None,
               progress: bool = True) -> dict:
    """{"tokens": scored tokens, "nll": their summed negative log-likelihood (nats), "ppl": exp(nll / tokens),
    "window", "stride"} of ``text`` under ``model`` (see the module doc)."""
    from tqdm.auto import tqdm

    ids = _ids(tok, text)
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids)
    nll, count, prev_end = 0.0, 0, 0
    starts = list(range(0, n, stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        end = min(begin + window, n)
        chunk = ids[begin:end].unsqueeze(0)
        labels = chunk.clone()
        labels[:, : max(prev_end - begin, 1)] = -100  # scored by the window before: context only
        logits = model(chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == n:
            break
    ppl = float(torch.exp(torch.tensor(nll / count))) if count else None
    return {"tokens": count, "nll": nll, "ppl": ppl, "window": window, "stride": stride}


@torch.no_grad()
def samples(model, tok, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> list[str]:
    """Greedy continuations (the new text only) of each prompt."""
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for p in prompts:
        enc = tok(p, return_tensors="pt", return_token_type_ids=False)  # a causal LM takes no token types
        gen = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
        out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
