"""breadcrumbs and breadcrumbs_ties against a float64 formula."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn

# --- independent float64 reference ----------------------------------------------------------------


def ref_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Keep ascending-|delta| positions [bottom, n - top); nothing dropped from the top when floor(gamma n) = 0."""
    if density >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = sorted(range(n), key=lambda i: abs(flat[i].item()))
    out = torch.zeros_like(flat)
    for i in order[bottom : n - top]:
        out[i] = flat[i]
    if rescale and out.abs().sum() >= 1e-7 and flat.abs().sum() >= 1e-7:
        out *= flat.abs().sum() / out.abs().sum()
    return out.reshape(delta.shape)


def ref_merge(xs, base, weight, density, gamma, *, consensus, normalize, rescale=False, lam=1.0):
    base = base.double()
    d = [
        w * ref_outliers(x.double() - base, de, g, rescale)
        for x, w, de, g in zip(xs, weight, density, gamma, strict=True)
    ]
    total = sum(d)
    if consensus:
        sigma = torch.where(total >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(di) == sigma).double() for di in d]
        delta = sum(m * di for m, di in zip(masks, d, strict=True))
        z = sum(m * w for m, w in zip(masks, weight, strict=True))
        z = torch.where(z == 0, torch.ones_like(z), z)
    else:
        delta = total
        z = sum(weight)
        z = 1.0 if abs(z) < 1e-8 else z
    if normalize:
        delta = delta / z
    return base + lam * delta


# --- tests ------------------------------------------------------------------------------------------


def make_models(shape=(20, 10), n=3, seed=0):
    base = randn(*shape, seed=seed)
    return [base + randn(*shape, seed=seed + 1 + i) for i in range(n)], base


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize(
    "weight,density,gamma",
    [
        ([1.0, 0.5, 0.25], [0.9, 0.5, 0.3], [0.01, 0.05, 0.1]),
        ([0.7, -0.4, 1.3], [0.2, 0.2, 0.2], [0.0, 0.02, 0.3]),
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.01, 0.01, 0.01]),
        ([0.5, 0.5, 1.0], [0.01, 0.005, 0.02], [0.01, 0.01, 0.01]),
        ([1.0, 2.0, 3.0], [0.95, 0.99, 0.9], [0.2, 0.3, 0.15]),  # bottom < 0: fewer dropped from the top
    ],
)
@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True)])
def test_breadcrumbs_matches_formula(name, consensus, weight, density, gamma, normalize, rescale):
    xs, base = make_models()
    out = call(name, xs, base, weight=weight, density=density, gamma=gamma, normalize=normalize, rescale=rescale)
    expected = ref_merge(xs, base, weight, density, gamma, consensus=consensus, normalize=normalize, rescale=rescale)
    close(out, expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_defaults_and_lambda(name):
    xs, base = make_models(shape=(300,), n=2, seed=10)  # 1-D, 300 elements: floor(0.01 * 300) = 3 outliers dropped
    out = call(name, xs, base, weight=[0.6, 0.4], density=0.5, **{"lambda": 0.8})
    expected = ref_merge(
        xs, base, [0.6, 0.4], [0.5] * 2, [0.01] * 2, consensus=name.endswith("ties"), normalize=False, lam=0.8
    )
    close(out, expected)


def test_breadcrumbs_tiny_tensor_keeps_the_vector():
    """floor(gamma n) = 0 (n < 100 at gamma 0.01): mergekit zeroes the task vector; we drop no outlier."""
    base = randn(50, seed=20).float()
    x = base + randn(50, seed=21).float()
    out = call("breadcrumbs", [x], base, weight=1.0, density=0.5)
    delta = (out - base).abs()
    assert int((delta > 0).sum()) == 25  # the 25 largest survive, none is dropped as an outlier
    kept = delta > 0
    assert delta[kept].min() >= (x - base).abs()[~kept].max()
    close(call("breadcrumbs", [x], base, weight=1.0, density=1.0, gamma=0.0), x)  # density 1: unchanged


def test_breadcrumbs_zero_deltas_and_near_zero_density():
    xs, base = make_models(n=2, seed=30)
    close(call("breadcrumbs", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    close(call("breadcrumbs_ties", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    # density 1e-3 of 200 elements keeps none: the task vectors vanish
    close(call("breadcrumbs", xs, base, weight=[1.0, 1.0], density=1e-3), base)
    close(call("breadcrumbs_ties", xs, base, weight=[1.0, 1.0], density=1e-3), base)


def test_breadcrumbs_no_other_models_returns_base():
    base = randn(4, 4, seed=40)
    assert torch.equal(call("breadcrumbs", [], base, weight=[]), base.float())
