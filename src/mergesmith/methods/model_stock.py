"""model_stock: move from the base towards the models' average as far as their task vectors agree."""

from __future__ import annotations

import math

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.methods.sparsify import Pruner, rows_of
from mergesmith.methods.task_vectors import Streaming


class Gram(Pruner):
    """The task vectors' norms and pairwise dot products over the whole tensor, observed chunk by chunk
    (products exact in float64, NumPy's pairwise sum per row, row sums added with `math.fsum`: any
    chunking of whole rows gives the whole tensor's values). The stream's state for input 0
    (`Streaming.pruner`); with `filter_wise` each chunk's rows hold their own cosines, and nothing
    needs observing."""

    def __init__(self, observe: bool = True) -> None:
        self.needs_observe = observe
        self.rows: dict[int, np.ndarray] = {}  # chunk start -> (rows, n, n) row sums of d_i * d_j
        self.gram: np.ndarray | None = None

    def observe_deltas(self, deltas: list[torch.Tensor], start: int) -> None:
        rows = [rows_of(d) for d in deltas]
        if rows[0].device.type == "cpu":
            r64 = [r.numpy().astype(np.float64) for r in rows]
        else:
            r64 = [r.double().cpu().numpy() for r in rows]
        n = len(r64)
        sums = np.zeros((len(r64[0]), n, n))
        for i in range(n):
            for j in range(i, n):
                sums[:, i, j] = sums[:, j, i] = (r64[i] * r64[j]).sum(axis=1)
        self.rows[start] = sums

    def finish(self) -> bool:
        if self.needs_observe:
            whole = np.concatenate([self.rows[s] for s in sorted(self.rows)])
            n = whole.shape[1]
            self.gram = np.array([[math.fsum(whole[:, i, j].tolist()) for j in range(n)] for i in range(n)])
            self.rows = {}
        return True

    def ratio(self) -> float:
        """t = N c / (1 + (N-1) c), c the mean pairwise cosine (0 where the task vectors cancel)."""
        assert self.gram is not None
        n = len(self.gram)
        norms = [math.sqrt(self.gram[i, i]) for i in range(n)]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        c = sum(min(1.0, max(-1.0, self.gram[i, j] / max(norms[i] * norms[j], 1e-6))) for i, j in pairs) / len(pairs)
        denominator = 1 + (n - 1) * c
        return 0.0 if denominator == 0 else n * c / denominator


@merge_method(
    "model_stock",
    base="required",
    models=(0, None),
    summary="Model Stock: interpolate base -> average of the models by the mean cosine of their task vectors.",
    paper="https://arxiv.org/abs/2403.19522",
    pretty="Model Stock",
)
def model_stock(
    xs: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False, stream: Streaming | None = None
) -> torch.Tensor | None:
    """c = mean over pairs i<j of cos(delta_i, delta_j) (norm product clamped at 1e-6, c in [-1, 1]),
    t = N c / (1 + (N-1) c), y = t mean_i(x_i) + (1-t) b; per row (last axis) when `filter_wise`.
    Streamed: the norms and dot products are observed over the row chunks first."""
    if not xs:
        return base
    if len(xs) < 2:
        raise MergeError(f"model_stock needs the base model and at least two other models, got {len(xs)} other")
    if filter_wise and stream is None:
        return _filter_wise(xs, base)
    gram = Gram() if stream is None else stream.pruner(0, lambda i: Gram(observe=not filter_wise))
    if stream is not None and stream.phase == "sample":  # `Gram` is not `fusable`: no raw values here
        return None
    if filter_wise:  # a chunk of whole rows
        return _filter_wise(xs, base)
    deltas = [x.sub_(base) for x in xs]
    if stream is None or stream.phase == "observe":
        gram.observe_deltas(deltas, 0 if stream is None else stream.start)
        if stream is not None:
            return None
        gram.finish()
    mean_delta = deltas[0]
    for d in deltas[1:]:
        mean_delta.add_(d)
    mean_delta.div_(len(deltas))
    return base.addcmul_(mean_delta, torch.tensor(gram.ratio(), dtype=base.dtype, device=base.device))


def _filter_wise(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """model_stock with a ratio per row (last axis)."""
    shape = base.shape
    if base.dim() >= 2:
        rows = [x.reshape(-1, shape[-1]) for x in [base, *xs]]
    else:
        rows = [x.reshape(1, -1) for x in [base, *xs]]
    b, deltas = rows[0], [x.sub_(rows[0]) for x in rows[1:]]
    norms = [torch.linalg.vector_norm(d, dim=-1).double() for d in deltas]
    n = len(deltas)
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(deltas[i], deltas[j], dim=-1).double()
            cos_sum += (dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp_(-1.0, 1.0)
    c = cos_sum / (n * (n - 1) / 2)
    denominator = 1 + (n - 1) * c
    # Task vectors that cancel exactly (c = -1/(N-1)) have a zero mean: keep the base instead of NaN.
    t = torch.where(denominator == 0, 0.0, n * c / torch.where(denominator == 0, 1.0, denominator))
    mean_delta = deltas[0]
    for d in deltas[1:]:
        mean_delta.add_(d)
    mean_delta.div_(n)
    return b.addcmul_(mean_delta, t.to(b.dtype).unsqueeze(-1)).reshape(shape)
