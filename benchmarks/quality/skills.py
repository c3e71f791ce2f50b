"""Four synthetic skills on one token vocabulary, and an exact-match scorer for a resident model.

A prompt is `[skill token, x_1 .. x_n, SEP]` and the answer the n tokens that follow:
copy (x), reverse (x backwards), increment (each x_i + 1, wrapping) and rotate (x_2 .. x_n x_1).
The skill token is the only thing that says which answer is wanted, so a merge keeps a skill only
if it keeps the skill's fine-tune's change. Scoring is teacher-forced: the fraction of answer positions whose argmax is
the right token (`token_accuracy`, graded; chance 1/24), and `exact_match`, all n right, which
is exactly what greedy decoding would produce. Prompts are split by a hash of their symbols: train, validation (for tuning and
search) and test (the held-out prompts every table reports).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

SKILLS = ("copy", "reverse", "increment", "rotate")
FIRST_SKILL_TOKEN, SEP, FIRST_SYMBOL, SYMBOLS, LENGTH = 4, 8, 16, 24, 6
VOCAB = 64  # ids 0-3 special, 4-7 skills, 8 SEP, 16-39 symbols


def answer(skill: str, xs: list[int]) -> list[int]:
    if skill == "copy":
        return list(xs)
    if skill == "reverse":
        return xs[::-1]
    if skill == "increment":
        return [FIRST_SYMBOL + (x - FIRST_SYMBOL + 1) % SYMBOLS for x in xs]
    if skill == "rotate":
        return xs[1:] + xs[:1]
    raise ValueError(skill)


def split_of(xs: list[int]) -> str:
    """train (80%), val (10%) or test (10%), by a hash of the symbols: the same in every run."""
    h = int(hashlib.sha256(bytes(x - FIRST_SYMBOL for x in xs)).hexdigest()[:8], 16) % 10
    return "val" if h == 0 else "test" if h == 1 else "train"


def batch(skill: str, n: int, split: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """`n` sequences [skill, x.., SEP, answer..] of `split`, and where the answer starts."""
    rows: list[list[int]] = []
    while len(rows) < n:
        xs = (torch.randint(0, SYMBOLS, (LENGTH,), generator=gen) + FIRST_SYMBOL).tolist()
        if split_of(xs) == split:
            rows.append([FIRST_SKILL_TOKEN + SKILLS.index(skill), *xs, SEP, *answer(skill, xs)])
    return torch.tensor(rows), LENGTH + 2


def answer_loss(model: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits[:, start - 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1))


def exact_match(model: Any, ids: torch.Tensor, start: int) -> float:
    with torch.no_grad():
        pred = model(ids[:, :-1]).logits[:, start - 1 :].argmax(-1)
    return float((pred == ids[:, start:]).all(-1).float().mean())


def token_accuracy(model: Any, ids: torch.Tensor, start: int) -> float:
    """The fraction of answer tokens predicted right (teacher-forced): graded where exact match is
    all or nothing. Chance is 1/SYMBOLS."""
    with torch.no_grad():
        pred = model(ids[:, :-1]).logits[:, start - 1 :].argmax(-1)
    return float((pred == ids[:, start:]).float().mean())


class Skill:
    """A `mergesmith search` task: exact match on fixed prompts of one skill and split."""

    def __init__(self, skill: str, split: str = "val", n: int = 256, seed: int = 0) -> None:
        self.name = f"{skill}-{split}"
        self.ids, self.start = batch(skill, n, split, torch.Generator().manual_seed(seed + SKILLS.index(skill)))

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        return {"token_accuracy": token_accuracy(model, self.ids, self.start)}


def skill_task(skill: str, split: str = "val", n: int = 256) -> Skill:
    return Skill(skill, split, n)
