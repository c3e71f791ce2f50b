"""Optimisers behind one ask/tell interface: CMA-ES (`cma`), random search, NSGA-II (`optuna`).

Each optimiser is a deterministic function of its seed and of the scores it was told: asking a
population, then telling the scores of that population in order, replays exactly. That is what
makes `--resume` and results independent of the worker count: the history is enough to rebuild
any optimiser's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.extras import require

OPTIMIZERS = ("cmaes", "random", "pareto")


class Optimizer(Protocol):
    def ask(self) -> list[np.ndarray]: ...

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        """`scores[i]` are candidate i's objectives (all maximised): [fitness] or one per task."""


class CMAES:
    """`cma.CMAEvolutionStrategy` maximising the fitness (cma minimises: it is told -fitness)."""

    def __init__(self, x0: np.ndarray, seed: int, sigma0: float = 1 / 6, popsize: int | None = None) -> None:
        cma = require("cma", "the cmaes optimiser of mergesmith search", "--optimizer")

        opts = {"seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}  # cma treats seed 0 as "random"
        if popsize:
            opts["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)

    def ask(self) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float64) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        self.es.tell(xs, [-float(s[0]) for s in scores])


class RandomSearch:
    """Uniform samples in [0, 1] per gene ([-1, 1] where negative weights are allowed)."""

    def __init__(self, size: int, seed: int, low: float = 0.0, popsize: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.size, self.low, self.popsize = size, low, popsize

    def ask(self) -> list[np.ndarray]:
        return [self.rng.uniform(self.low, 1.0, self.size) for _ in range(self.popsize)]

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        pass


class Pareto:
    """optuna's NSGA-II over one objective per task, every objective maximised."""

    def __init__(self, size: int, objectives: int, seed: int, low: float = 0.0, popsize: int = 16) -> None:
        optuna = require("optuna", "the pareto optimiser of mergesmith search", "--optimizer")

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=popsize, seed=seed)
        self.study = optuna.create_study(directions=["maximize"] * objectives, sampler=sampler)
        self.size, self.low, self.popsize = size, low, popsize
        self._trials: list = []

    def ask(self) -> list[np.ndarray]:
        self._trials = []
        xs = []
        for _ in range(self.popsize):
            trial = self.study.ask()
            xs.append(np.array([trial.suggest_float(f"x{i}", self.low, 1.0) for i in range(self.size)]))
            self._trials.append(trial)
        return xs

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        for trial, s in zip(self._trials, scores, strict=True):
            self.study.tell(trial, [float(v) for v in s])


def make_optimizer(
    name: str, x0: np.ndarray, seed: int, objectives: int, allow_negative: bool, popsize: int | None
) -> Optimizer:
    low = -1.0 if allow_negative else 0.0
    if name == "cmaes":
        return CMAES(x0, seed, popsize=popsize)
    if name == "random":
        return RandomSearch(len(x0), seed, low, popsize or 8)
    if name == "pareto":
        return Pareto(len(x0), objectives, seed, low, popsize or 16)
    raise MergeError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})", "--optimizer")
