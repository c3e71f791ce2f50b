"""sce against a float64 formula."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn

from mergesmith.methods import METHODS


def ref_sce(xs, base, select_topk=1.0):
    base = base.double()
    tau = torch.stack([x.double() - base for x in xs])
    if select_topk < 1:
        mean = tau.mean(0)
        var = ((tau - mean) ** 2).mean(0).reshape(-1)
        k = int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros_like(var)
        if k > 0:
            order = sorted(range(var.numel()), key=lambda i: -var[i].item())
            keep[order[:k]] = 1.0
        tau = tau * keep.reshape(base.shape)
    energy = [(t**2).mean().item() for t in tau]
    total = sum(energy)
    omega = [1 / len(xs)] * len(xs) if total < 1e-6 else [e / total for e in energy]
    sigma = torch.where(tau.sum(0) >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for w, t in zip(omega, tau, strict=True):
        m = (torch.sign(t) == sigma).double()
        num += w * m * t
        den += w * m
    return base + num / den.clamp(min=1e-6)


def make_models(shape=(6, 9), n=3, seed=0):
    base = randn(*shape, seed=seed)
    return [base + randn(*shape, seed=seed + 1 + i, scale=0.5 + i) for i in range(n)], base


@pytest.mark.parametrize("select_topk", [1.0, 0.75, 0.3, 0.05])
@pytest.mark.parametrize("shape", [(6, 9), (30,)])
@pytest.mark.parametrize("n", [2, 3])
def test_sce_matches_formula(select_topk, shape, n):
    xs, base = make_models(shape, n)
    close(call("sce", xs, base, select_topk=select_topk), ref_sce(xs, base, select_topk))


def test_sce_edges():
    xs, base = make_models(seed=10)
    close(call("sce", xs, base, select_topk=0.0), base)  # k = 0: every task vector zeroed
    close(call("sce", [base.clone(), base.clone()], base, select_topk=0.5), base)  # zero deltas
    close(call("sce", [xs[0]], base), xs[0])  # one model: its own task vector, whole
    assert "weight" not in METHODS["sce"].params  # sce ignores model weights
    # positions where every model agrees (zero variance) never count towards k
    same = [x.clone() for x in xs]
    for s in same:
        s[:3] = base[:3] + 1.0
    close(call("sce", same, base, select_topk=0.5), ref_sce(same, base, 0.5))
