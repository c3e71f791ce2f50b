"""nearswap against a float64 formula."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn

from mergesmith.errors import MergeError


def ref_nearswap(base, x, t):
    a, x = base.double(), x.double()
    omega = (t / (a - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return omega * x + (1 - omega) * a


@pytest.mark.parametrize("t", [1e-4, 0.05, 0.5, 3.0, 0.0])
@pytest.mark.parametrize("shape", [(5, 7), (20,)])
def test_nearswap_matches_formula(t, shape):
    base = randn(*shape, seed=1)
    x = base + randn(*shape, seed=2, scale=0.3)
    x.reshape(-1)[:3] = base.reshape(-1)[:3]  # equal weights: omega = 1
    close(call("nearswap", [x], base, t=t), ref_nearswap(base, x, t))


def test_nearswap_edges():
    base = randn(4, 4, seed=3)
    x = randn(4, 4, seed=4)
    close(call("nearswap", [x], base, t=1e9), x)  # everything is near: take the other model
    close(call("nearswap", [base.clone()], base, t=0.1), base)
    with pytest.raises(MergeError, match="exactly one"):
        call("nearswap", [x, x.clone()], base, t=0.1)
    with pytest.raises(MergeError, match="exactly one"):
        call("nearswap", [], base, t=0.1)
    assert torch.isfinite(call("nearswap", [x], base, t=1e-3)).all()
