"""Scoring candidates in memory: each candidate merged straight into one resident model's parameters
(`mergesmith.resident`: prepared as `run` prepares, so a candidate scores what `run` would write).

The input models are opened once (memory-mapped safetensors); one `transformers` model stays
loaded; no checkpoint is written. A tokenizer block (`tokenizer: {source: union}` and the like) is
aligned once, from the first recipe, as `run` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mergesmith.preparation import MergeOptions
from mergesmith.recipe.schema import parse_config
from mergesmith.resident import ResidentMerge
from mergesmith.search.tasks import WeightedTask


@dataclass
class Scored:
    scores: dict[str, float]  # task label -> metric (the runner aggregates them: search/fitness.py)
    seconds: float


class InMemoryMerger:
    def __init__(
        self,
        first_recipe: dict[str, Any],
        tasks: list[WeightedTask],
        device: str = "cpu",
        seed: int = 0,
        options: MergeOptions | None = None,
    ):
        """`options`: the merge options of `run` (LoRA cache and dtype, caches, remote code); `device`
        and `seed` override theirs."""
        options = options or MergeOptions()
        options = MergeOptions(**{**vars(options), "device": device, "random_seed": seed})
        self.resident = ResidentMerge(parse_config(first_recipe, "genome"), options)
        self.model, self.tokenizer = self.resident.model, self.resident.tokenizer
        self.tasks = tasks
        labels = [t.label for t in tasks]
        self.labels = [lab if labels.count(lab) == 1 else f"{lab}#{i}" for i, lab in enumerate(labels)]

    def load_weights(self, recipe: dict[str, Any]) -> None:
        """Overwrite the resident model's weights with the merge of `recipe`."""
        self.resident.load(parse_config(recipe, "candidate"))

    def score(self, recipe: dict[str, Any]) -> Scored:
        start = time.perf_counter()
        self.load_weights(recipe)
        scores: dict[str, float] = {}
        with torch.no_grad():
            for task, label in zip(self.tasks, self.labels, strict=True):
                scores[label] = task.score(self.model, self.tokenizer)
        return Scored(scores, time.perf_counter() - start)
