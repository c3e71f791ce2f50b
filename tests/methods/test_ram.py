"""ram and ramplus_tl against an element-by-element float64 formula."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn


def ref_ram(xs, base, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    base = base.double().reshape(-1)
    tau = [x.double().reshape(-1) - base for x in xs]
    n = base.numel()
    active = [[abs(t[j].item()) > epsilon for j in range(n)] for t in tau]
    count = [sum(a[j] for a in active) for j in range(n)]
    boost = []
    for a in active:
        shared = sum(1 for j in range(n) if a[j] and count[j] > 1)
        unique = sum(1 for j in range(n) if a[j] and count[j] == 1)
        rho = shared / max(unique, epsilon)
        boost.append(1 + r * min(max(rho, 0.0), alpha) if plus else 1.0)
    out = base.clone()
    for j in range(n):
        contributions = [(i, tau[i][j].item()) for i in range(len(xs)) if active[i][j]]
        if len(contributions) == 1:
            i, v = contributions[0]
            out[j] += boost[i] * v
        elif len(contributions) > 1:
            out[j] += sum(v for _, v in contributions) / len(contributions)
    return out.reshape(xs[0].shape)


def sparse_models(shape=(8, 10), n=3, seed=0, p_change=0.5):
    """Models that each change about half the weights, so 0, 1 or several change any one weight."""
    base = randn(*shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    xs = []
    for i in range(n):
        change = torch.rand(*shape, generator=g) < p_change
        tiny = torch.rand(*shape, generator=g) < 0.1  # changes below epsilon do not count
        delta = randn(*shape, seed=seed + 1 + i) * change + 1e-7 * tiny
        xs.append(base + delta)
    return xs, base


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("shape", [(8, 10), (50,)])
def test_ram_matches_formula(n, shape):
    xs, base = sparse_models(shape, n)
    close(call("ram", xs, base), ref_ram(xs, base))
    close(call("ram", xs, base, epsilon=0.5), ref_ram(xs, base, epsilon=0.5))


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 1.0), (1.0, 5.0)])
def test_ramplus_tl_matches_formula(n, r, alpha):
    xs, base = sparse_models((8, 10), n, seed=20, p_change=0.6)
    close(call("ramplus_tl", xs, base, r=r, alpha=alpha), ref_ram(xs, base, plus=True, r=r, alpha=alpha))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_zero_deltas_give_base(name):
    base = randn(5, 5, seed=30)
    close(call(name, [base.clone(), base.clone()], base), base)
