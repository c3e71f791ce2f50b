"""The two kinds of evaluation example: an answer to generate, or a choice to score.

Their own module because both the task readers (tasks.py) and the scorers (scoring.py) use them,
and tasks.py calls the scorers: with the examples here neither imports the other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerExample:
    prompt: str
    answer: str
    stop: tuple[str, ...] = ()
    id: str | None = None


@dataclass(frozen=True)
class ChoiceExample:
    prompt: str
    choices: tuple[str, ...]
    label: int
    id: str | None = None
