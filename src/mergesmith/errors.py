"""The one exception type for user errors. The CLI renders it as a single clear message."""

from __future__ import annotations

from collections.abc import Iterable


class MergeError(Exception):
    """A problem with the user's recipe, files or options.

    `where` names what the problem concerns: a YAML path (`models[1].parameters.density`), a file,
    or a tensor. The message says what is wrong and, where possible, what to do.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class InputChangedError(MergeError):
    """An input file changed under a running merge (truncated or rewritten by another process).

    A MergeError like any other, but the merge keeps its staging directory rather than deleting it:
    the inputs, not the output, are what went wrong."""


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, transpositions."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A `; did you mean 'x'?` suffix for the closest choice, or an empty string.

    Closest = fewest edits (a swapped pair of letters counts as one), then the nearest length;
    case and `-`/`_` differences are free.
    """
    norm = word.lower().replace("-", "_")
    scored = sorted((edit_distance(norm, c.lower().replace("-", "_")), abs(len(c) - len(word)), c) for c in choices)
    if scored and scored[0][0] <= max(2, len(word) // 3):
        return f"; did you mean '{scored[0][2]}'?"
    return ""
