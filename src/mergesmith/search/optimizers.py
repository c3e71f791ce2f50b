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


Bounds = tuple[np.ndarray, np.ndarray]  # each gene's (lows, highs): `Genome.bounds`

#: CMA-ES' initial step, as a fraction of each gene's range: wide enough that the first
#: generations see the landscape, narrow enough that they rarely sit on a bound.
STEP = 0.2


class CMAES:
    """`cma.CMAEvolutionStrategy` maximising the fitness (cma minimises: it is told -fitness), kept
    inside the genes' bounds, with a step of `STEP` times each gene's range."""

    def __init__(self, x0: np.ndarray, bounds: Bounds, seed: int, popsize: int | None = None) -> None:
        cma = require("cma", "the cmaes optimiser of mergesmith search", "--optimizer")

        lows, highs = bounds
        opts = {
            "seed": seed + 1,  # cma treats seed 0 as "random"
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "bounds": [list(lows), list(highs)],
            "CMA_stds": list(np.maximum(highs - lows, 1e-12)),
        }
        if popsize:
            opts["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(list(x0), STEP, opts)

    def ask(self) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float64) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        self.es.tell(xs, [-float(s[0]) for s in scores])


class RandomSearch:
    """Uniform samples within each gene's bounds."""

    def __init__(self, bounds: Bounds, seed: int, popsize: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.lows, self.highs = bounds
        self.popsize = popsize

    def ask(self) -> list[np.ndarray]:
        return [self.rng.uniform(self.lows, self.highs) for _ in range(self.popsize)]

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        pass


class Pareto:
    """optuna's NSGA-II over one objective per task, every objective maximised."""

    def __init__(self, bounds: Bounds, objectives: int, seed: int, popsize: int = 16) -> None:
        optuna = require("optuna", "the pareto optimiser of mergesmith search", "--optimizer")

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=popsize, seed=seed)
        self.study = optuna.create_study(directions=["maximize"] * objectives, sampler=sampler)
        self.lows, self.highs = bounds
        self.popsize = popsize
        self._trials: list = []

    def ask(self) -> list[np.ndarray]:
        self._trials = []
        xs = []
        for _ in range(self.popsize):
            trial = self.study.ask()
            genes = zip(self.lows, self.highs, strict=True)
            xs.append(
                np.array([trial.suggest_float(f"x{i}", float(lo), float(hi)) for i, (lo, hi) in enumerate(genes)])
            )
            self._trials.append(trial)
        return xs

    def tell(self, xs: list[np.ndarray], scores: Sequence[Sequence[float]]) -> None:
        for trial, s in zip(self._trials, scores, strict=True):
            self.study.tell(trial, [float(v) for v in s])


def make_optimizer(
    name: str, x0: np.ndarray, bounds: Bounds, seed: int, objectives: int, popsize: int | None
) -> Optimizer:
    if name == "cmaes":
        return CMAES(x0, bounds, seed, popsize=popsize)
    if name == "random":
        return RandomSearch(bounds, seed, popsize or 8)
    if name == "pareto":
        return Pareto(bounds, objectives, seed, popsize or 16)
    raise MergeError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})", "--optimizer")
