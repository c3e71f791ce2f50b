"""model_stock against a float64 formula."""

from __future__ import annotations

import itertools

import pytest
import torch
from method_calls import call, close, randn

from mergesmith.errors import MergeError


def ref_ratio(deltas):
    """t = N c / (1 + (N-1) c), c the mean pairwise cosine of the given vectors."""
    n = len(deltas)
    cosines = []
    for a, b in itertools.combinations(deltas, 2):
        c = torch.dot(a, b).item() / max(a.norm().item() * b.norm().item(), 1e-6)
        cosines.append(min(1.0, max(-1.0, c)))
    c = sum(cosines) / len(cosines)
    return n * c / (1 + (n - 1) * c)


def ref_model_stock(xs, base, filter_wise=False):
    base = base.double()
    xs = [x.double() for x in xs]
    avg = sum(xs) / len(xs)
    if not filter_wise:
        t = ref_ratio([(x - base).reshape(-1) for x in xs])
        return t * avg + (1 - t) * base
    rows_b = base.reshape(1, -1) if base.dim() < 2 else base.reshape(-1, base.shape[-1])
    rows_x = [x.reshape(rows_b.shape) for x in xs]
    rows_avg = avg.reshape(rows_b.shape)
    out = torch.empty_like(rows_b)
    for i in range(rows_b.shape[0]):
        t = ref_ratio([x[i] - rows_b[i] for x in rows_x])
        out[i] = t * rows_avg[i] + (1 - t) * rows_b[i]
    return out.reshape(base.shape)


def make_models(shape, n, seed=0, shared=1.0):
    """Models whose task vectors share a common direction, so the cosines are well inside (0, 1)."""
    base = randn(*shape, seed=seed)
    common = randn(*shape, seed=seed + 50)
    return [base + shared * common + randn(*shape, seed=seed + 1 + i) for i in range(n)], base


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 8), (40,), (2, 3, 5)])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_formula(filter_wise, shape, n):
    xs, base = make_models(shape, n)
    close(call("model_stock", xs, base, filter_wise=filter_wise), ref_model_stock(xs, base, filter_wise))


def test_model_stock_edges():
    xs, base = make_models((4, 6), 3, seed=10)
    close(call("model_stock", [], base), base)  # only the base present
    with pytest.raises(MergeError, match="at least two"):
        call("model_stock", xs[:1], base)
    close(call("model_stock", [xs[0], xs[0].clone()], base), xs[0])  # identical: c = 1, t = 1
    close(call("model_stock", [base.clone(), base.clone()], base), base)  # zero deltas: c = 0, t = 0
    # exactly opposite task vectors: the mean is the base (mergekit divides by zero here)
    b, d = (randn(4, 6, seed=s).mul(4).round().div(4) for s in (11, 12))  # exact in float32
    out = call("model_stock", [b + d, b - d], b)
    assert torch.isfinite(out).all()
    close(out, b)
