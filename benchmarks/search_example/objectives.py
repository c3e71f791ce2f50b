"""Synthetic tasks for the search example: next-token loss on patterned word sequences."""

from __future__ import annotations

import random
from typing import Any

import torch

PATTERNS = {
    "count": ["one", "two", "three", "four", "five"],
    "colors": ["red", "green", "blue"],
    "animals": ["cat", "dog", "the", "cat", "and", "the", "dog"],
}


def sequences(tokenizer: Any, pattern: str, n: int, length: int, seed: int) -> torch.Tensor:
    """`n` rows of the pattern repeated from random phases; half the rows mix in a second pattern."""
    rng = random.Random(seed)
    words = PATTERNS[pattern]
    rows = []
    for _ in range(n):
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(length))
        rows.append(tokenizer(text)["input_ids"][:length])
    return torch.tensor(rows)


class NextTokenLoss:
    """Score = minus the mean next-token cross-entropy on held-out rows of one pattern."""

    def __init__(self, pattern: str, tokenizer_dir: str, n: int = 16, length: int = 16, seed: int = 1234) -> None:
        from transformers import AutoTokenizer

        self.name = pattern
        self.ids = sequences(AutoTokenizer.from_pretrained(tokenizer_dir), pattern, n, length, seed)

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        out = model(self.ids, labels=self.ids)
        return {"neg_loss": -float(out.loss)}


def next_token_loss(**kwargs: Any) -> NextTokenLoss:
    return NextTokenLoss(**kwargs)
