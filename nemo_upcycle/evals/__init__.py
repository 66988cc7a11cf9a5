"""Downstream evaluation with EleutherAI's lm-evaluation-harness (its HF backend scores; nothing is scored here),
perplexity on held-out text and greedy samples, dense against upcycled models side by side. No NeMo."""
