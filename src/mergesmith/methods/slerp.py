from __future__ import annotations

import math

import numpy as np

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, merge_method
from mergesmith.methods.sparsify import Pruner, rows_of
from mergesmith.methods.task_vectors import Streaming


class Angle(Pruner):
    """The whole-tensor scalars slerp needs (|v0|^2, |v1|^2, v0.v1), observed chunk by chunk: summed
    per row in float64 (products of float32 values are exact there; NumPy's pairwise sum per row) and
    the row sums added exactly (`math.fsum`), so any chunking of whole rows gives the same scalars as
    the whole tensor. It prunes nothing: it is the stream's state for input 0 (`Streaming.pruner`)."""

    needs_observe = True

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}  # chunk start -> (rows, 3) row sums
        self.sums = (0.0, 0.0, 0.0)

    def observe_pair(self, v0: torch.Tensor, v1: torch.Tensor, start: int) -> None:
        a, b = rows_of(v0), rows_of(v1)
        if a.device.type == "cpu":
            a64, b64 = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
            self.rows[start] = np.stack([(a64 * a64).sum(axis=1), (b64 * b64).sum(axis=1), (a64 * b64).sum(axis=1)], 1)
        else:
            a64, b64 = a.double(), b.double()
            sums = torch.stack([(a64 * a64).sum(dim=1), (b64 * b64).sum(dim=1), (a64 * b64).sum(dim=1)], 1)
            self.rows[start] = sums.cpu().numpy()

    def finish(self) -> bool:
        rows = [self.rows[s] for s in sorted(self.rows)]
        whole = np.concatenate(rows) if rows else np.zeros((0, 3))
        self.sums = tuple(math.fsum(whole[:, j].tolist()) for j in range(3))
        self.rows = {}
        return True

    def weights(self, t: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
        """(c0, c1) with y = c0 v0 + c1 v1."""
        n0, n1, dot = math.sqrt(self.sums[0]), math.sqrt(self.sums[1]), self.sums[2]
        if n0 > 1e-8:
            dot /= n0
        if n1 > 1e-8:
            dot /= n1
        if abs(dot) > dot_threshold:
            return 1 - t, t
        theta = math.acos(dot)
        s = math.sin(theta)
        return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (as flat vectors), un-normalised endpoints."""
    angle = Angle()
    angle.observe_pair(v0, v1, 0)
    angle.finish()
    c0, c1 = angle.weights(t)
    return v0.mul_(c0).add_(v1, alpha=c1)


@merge_method(
    "slerp",
    base="required",
    models=(0, 1),
    summary="Spherical interpolation between the base (t=0) and one other model (t=1).",
    paper="https://en.wikipedia.org/wiki/Slerp",
    pretty="SLERP",
)
def slerp(
    xs: list[torch.Tensor], base: torch.Tensor, *, t: float = REQUIRED, stream: Streaming | None = None
) -> torch.Tensor | None:
    """u_k = v_k/|v_k|; d = u0.u1; |d| > 0.9995: (1-t)v0 + t v1;
    else theta = acos d, y = [sin((1-t)theta) v0 + sin(t theta) v1] / sin theta.
    Streamed: the norms and the dot product are observed over the row chunks first."""
    if not xs:
        return base
    if stream is None:
        return slerp_tensors(t, base, xs[0])
    angle = stream.pruner(0, lambda i: Angle())  # before touching the inputs: `Angle` is not `fusable`
    if stream.phase == "sample":
        return None
    if stream.phase == "observe":
        angle.observe_pair(base, xs[0], stream.start)
        return None
    c0, c1 = angle.weights(t)
    return base.mul_(c0).add_(xs[0], alpha=c1)
