"""Four synthetic skills in two regimes, and the scorers for a resident model.

A prompt is `[skill token, x_1 .. x_n, SEP]` and the answer the n tokens that follow:
copy (x), reverse (x backwards), increment (each x_i + 1, wrapping in the alphabet) and rotate
(x_2 .. x_n x_1). The skill token is the only thing that says which answer is wanted, so a merge
keeps a skill only if it keeps the skill's fine-tune's change. Scoring is teacher-forced: the
fraction of answer positions whose argmax is the right token (`token_accuracy`, graded), and
`exact_match`, all n right, which is exactly what greedy decoding would produce. Prompts are split
by a hash of their symbols: train, validation (for tuning and search) and test (the held-out
prompts every table reports).

Two regimes (docs/quality.md says why): `shared`, every skill on the same 24 symbols with the
same separator, and `distinct`, every skill with its own instruction token, separator and
24-symbol range, over a base pretrained on six general operations (`general_batch`) in a general
format on all 96 symbols.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

SKILLS = ("copy", "reverse", "increment", "rotate")
GENERAL_OPS = (*SKILLS, "decrement", "swap")  # the distinct regime's pretraining mixture
LENGTH = 6


@dataclass(frozen=True)
class Format:
    """How one skill's prompts look: its instruction token, separator and symbol range."""

    token: int
    sep: int
    first: int
    count: int


@dataclass(frozen=True)
class Regime:
    name: str
    vocab: int
    first: int  # the alphabet every answer wraps in: symbols first .. first + symbols - 1
    symbols: int
    formats: dict[str, Format]
    general: dict[str, Format]  # the pretraining mixture with real answers (empty: random answers)
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    schedule: bool  # warm-up then linear decay (run.train), for pretraining and fine-tunes


# ids 0-3 special, 4-7 skills, 8 SEP, 16-39 symbols
SHARED = Regime(
    "shared",
    vocab=64,
    first=16,
    symbols=24,
    formats={s: Format(4 + k, 8, 16, 24) for k, s in enumerate(SKILLS)},
    general={},
    pretrain_steps=150,
    pretrain_lr=3e-3,
    finetune_steps=300,
    finetune_lr=1e-3,
    schedule=False,
)
# ids 0-3 special, 4-9 general ops, 10-13 skills, 14 general SEP, 15-18 the skills' SEPs, 32-127 symbols
DISTINCT = Regime(
    "distinct",
    vocab=128,
    first=32,
    symbols=96,
    formats={s: Format(10 + k, 15 + k, 32 + 24 * k, 24) for k, s in enumerate(SKILLS)},
    general={op: Format(4 + k, 14, 32, 96) for k, op in enumerate(GENERAL_OPS)},
    pretrain_steps=3000,
    pretrain_lr=2e-3,
    finetune_steps=300,  # the design's 100 at 3e-4 left reverse at 5% (docs/quality.md)
    finetune_lr=3e-3,
    schedule=True,
)
REGIMES = {r.name: r for r in (SHARED, DISTINCT)}


def answer(op: str, xs: list[int], regime: Regime = SHARED) -> list[int]:
    first, n = regime.first, regime.symbols
    if op == "copy":
        return list(xs)
    if op == "reverse":
        return xs[::-1]
    if op == "increment":
        return [first + (x - first + 1) % n for x in xs]
    if op == "decrement":
        return [first + (x - first - 1) % n for x in xs]
    if op == "rotate":
        return xs[1:] + xs[:1]
    if op == "swap":
        return [xs[i ^ 1] for i in range(len(xs))]
    raise ValueError(op)


def split_of(xs: list[int], first: int = SHARED.first) -> str:
    """train (80%), val (10%) or test (10%), by a hash of the symbols: the same in every run."""
    h = int(hashlib.sha256(bytes(x - first for x in xs)).hexdigest()[:8], 16) % 10
    return "val" if h == 0 else "test" if h == 1 else "train"


def _rows(op: str, f: Format, n: int, split: str, gen: torch.Generator, regime: Regime) -> torch.Tensor:
    rows: list[list[int]] = []
    while len(rows) < n:
        xs = (torch.randint(0, f.count, (LENGTH,), generator=gen) + f.first).tolist()
        if split_of(xs, regime.first) == split:
            rows.append([f.token, *xs, f.sep, *answer(op, xs, regime)])
    return torch.tensor(rows)


def batch(skill: str, n: int, split: str, gen: torch.Generator, regime: Regime = SHARED) -> tuple[torch.Tensor, int]:
    """`n` sequences [skill, x.., SEP, answer..] of `split` in the skill's format, and where the answer starts."""
    return _rows(skill, regime.formats[skill], n, split, gen, regime), LENGTH + 2


def general_batch(op: str, n: int, split: str, gen: torch.Generator, regime: Regime) -> tuple[torch.Tensor, int]:
    """`n` sequences of the pretraining mixture's operation `op`, in the general format."""
    return _rows(op, regime.general[op], n, split, gen, regime), LENGTH + 2


def answer_loss(model: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits[:, start - 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1))


def exact_match(model: Any, ids: torch.Tensor, start: int) -> float:
    with torch.no_grad():
        pred = model(ids[:, :-1]).logits[:, start - 1 :].argmax(-1)
    return float((pred == ids[:, start:]).all(-1).float().mean())


def token_accuracy(model: Any, ids: torch.Tensor, start: int) -> float:
    """The fraction of answer tokens predicted right (teacher-forced): graded where exact match is
    all or nothing."""
    with torch.no_grad():
        pred = model(ids[:, :-1]).logits[:, start - 1 :].argmax(-1)
    return float((pred == ids[:, start:]).float().mean())


class Skill:
    """A `mergesmith search` task: token accuracy on fixed prompts of one skill and split."""

    def __init__(self, skill: str, split: str = "val", n: int = 256, seed: int = 0, regime: str = "shared") -> None:
        self.name = f"{skill}-{split}"
        gen = torch.Generator().manual_seed(seed + SKILLS.index(skill))
        self.ids, self.start = batch(skill, n, split, gen, REGIMES[regime])

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        return {"token_accuracy": token_accuracy(model, self.ids, self.start)}


def skill_task(skill: str, split: str = "val", n: int = 256, regime: str = "shared") -> Skill:
    return Skill(skill, split, n, regime=regime)
