"""Whole-tensor inner products observed in row chunks: the state slerp and model_stock stream with."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from mergesmith.lazy_torch import torch
from mergesmith.methods.sparsify import rows_of
from mergesmith.methods.stream import Observation, Stream

#: The vectors a method's Gram matrix is of, from the inputs' chunk (the inputs, their task vectors...).
Vectors = Callable[[list, object], list]


def inputs(xs: list[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    return xs


def task_vectors(xs: list[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """x_i - b, in place (the chunk's inputs are the call's own); the inputs without a base."""
    return xs if base is None else [x.sub_(base) for x in xs]


class Gram(Observation):
    """The Gram matrix (v_i . v_j for every pair, norms squared on the diagonal) of a few tensors over
    their whole length, observed chunk by chunk: products exact in float64, NumPy's pairwise sum per
    row, row sums added with `math.fsum`, so any chunking of whole rows gives the whole tensors'
    values. It is what slerp, model_stock, karcher... need of the whole tensors: their observation
    (of the `vectors` of the inputs), not `fusable`; with `observe` False (chunks that hold
    everything they need) it asks for no observe pass."""

    def __init__(self, vectors: Vectors = inputs, observe: bool = True) -> None:
        self.vectors = vectors
        self.needs_observe = observe
        self.rows: dict[int, np.ndarray] = {}  # chunk start -> (rows, n, n) row sums of v_i * v_j
        self.gram: np.ndarray | None = None

    def observe_tensors(self, vs: list[torch.Tensor], start: int) -> None:
        """The chunk of every tensor at flat element `start`."""
        rows = [rows_of(v) for v in vs]
        rs = [r.numpy() if r.device.type == "cpu" else r.double().cpu().numpy() for r in rows]
        n = len(rs)
        sums = np.zeros((len(rs[0]), n, n))
        products = np.empty(rs[0].shape)  # float64, one buffer for every pair (no float64 copies)
        for i in range(n):
            for j in range(i, n):
                np.multiply(rs[i], rs[j], out=products, dtype=np.float64)
                sums[:, i, j] = sums[:, j, i] = products.sum(axis=1)
        self.rows[start] = sums

    def feed(self, xs: list[torch.Tensor], base: torch.Tensor | None, at: Stream) -> None:
        self.observe_tensors(self.vectors(xs, base), at.start)

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
