"""Whole-tensor inner products observed in row chunks: the state slerp and model_stock stream with."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from mergesmith import kernels, kernels_gram
from mergesmith.lazy_torch import torch
from mergesmith.methods.sparsify import rows_of
from mergesmith.methods.stream import Observation, Stream

#: The vectors a method's Gram matrix is of, picked from the chunk's inputs (and base).
Pick = Callable[[list, object], list]


def inputs(xs: list, base: object) -> list:
    return xs


def task_vectors(xs: list[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """x_i - b, in place (the chunk's inputs are the call's own); the inputs without a base."""
    return xs if base is None else [x.sub_(base) for x in xs]


class Gram(Observation):
    """The Gram matrix (v_i . v_j for every pair, norms squared on the diagonal) of a few tensors over
    their whole length, observed chunk by chunk: products exact in float64, added per row in a fixed
    order (`kernels_gram.gram_rows`), row sums added with `math.fsum`, so any chunking of whole rows
    gives the whole tensors' values, in torch or on raw values alike. The vectors are those `pick`
    takes of the inputs, less the base when `relative` (the task vectors; the inputs without a base).
    It is what slerp, model_stock, karcher... need of the whole tensors: their observation, not
    `fusable` unless the method merges raw values (`fuses`) and the kernels are there; with `observe`
    False (chunks that hold everything they need) it asks for no observe pass."""

    def __init__(self, pick: Pick = inputs, *, relative: bool = False, observe: bool = True, fuses: bool = False):
        self.pick = pick
        self.relative = relative
        self.needs_observe = observe
        self.fuses = fuses
        self.rows: dict[int, np.ndarray] = {}  # chunk start -> (rows, n, n) row sums of v_i * v_j
        self.gram: np.ndarray | None = None

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        return self.fuses and self.needs_observe and kernels_gram.available()

    def observe_tensors(self, vs: list[torch.Tensor], start: int) -> None:
        """The chunk of every vector at flat element `start`."""
        rows = [rows_of(v) for v in vs]
        arrays = [np.ascontiguousarray(r.to("cpu", torch.float32).numpy()) for r in rows]
        raw = [kernels.Raw(a, "float32") for a in arrays]
        self.rows[start] = kernels_gram.gram_rows(raw, None, arrays[0].shape[1])

    def feed(self, xs: list, base: object, at: Stream) -> None:
        vs = self.pick(xs, base)
        minus = base if self.relative else None
        if isinstance(vs[0], kernels.Raw):
            self.rows[at.start] = kernels_gram.gram_rows(vs, minus, at.cols)
        else:
            self.observe_tensors(vs if minus is None else [v.sub_(minus) for v in vs], at.start)

    def finish(self) -> bool:
        if self.needs_observe:
            whole = np.concatenate([self.rows[s] for s in sorted(self.rows)])
            n = whole.shape[1]
            self.gram = np.array([[math.fsum(whole[:, i, j].tolist()) for j in range(n)] for i in range(n)])
            self.rows = {}
        return True

    @classmethod
    def of(cls, vs: list[torch.Tensor]) -> np.ndarray:
        """The Gram matrix of whole tensors: the same values as observed in chunks."""
        gram = cls()
        gram.observe_tensors(vs, 0)
        gram.finish()
        assert gram.gram is not None
        return gram.gram


def combine(xs: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """sum_i c_i x_i, into `xs[0]`: the result of the methods whose output lies in the span of
    their inputs (the same element-wise passes on a chunk as on the whole tensor)."""
    out = xs[0].mul_(coefficients[0])
    for x, c in zip(xs[1:], coefficients[1:], strict=True):
        out.add_(x, alpha=c)
    return out


class WholeTensors(Gram):
    """The observation of a merge that, with these parameters, needs whole tensors: the executor
    then gives it one chunk (`Pruner.streams`), and `mergesmith validate` estimates its memory so."""

    streams = False

    def __init__(self) -> None:
        super().__init__(observe=False)
