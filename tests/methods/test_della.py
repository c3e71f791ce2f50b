"""della and della_linear against a float64 formula fed the same seeded uniform draws."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn

from mergesmith.errors import MergeError
from mergesmith.rng import TensorRNG

KEY = "model.layers.3.self_attn.q_proj.weight"

# --- independent float64 reference ----------------------------------------------------------------


def ref_magprune(delta, density, epsilon, uniforms, rescale):
    """p = density - eps + 2 eps rank/(n-1) by ascending |delta| within each row; keep where u < p."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    u = uniforms.reshape(rows.shape).double()
    n = rows.shape[1]
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        order = sorted(range(n), key=lambda j: abs(rows[r, j].item()))
        for rank, j in enumerate(order):
            p = density if n == 1 else density - epsilon + 2 * epsilon * rank / (n - 1)
            if u[r, j] < p:
                out[r, j] = rows[r, j]
    if rescale and out.abs().sum() >= 1e-7 and rows.abs().sum() >= 1e-7:
        out *= rows.abs().sum() / out.abs().sum()
    return out.reshape(delta.shape)


def ref_della(xs, base, weight, density, epsilon, *, consensus, normalize, rescale=True, lam=1.0, seed=0):
    rng = TensorRNG(seed, KEY)
    base = base.double()
    d = [
        w * ref_magprune(x.double() - base, de, ep, rng.uniform(tuple(x.shape), i), rescale)
        for i, (x, w, de, ep) in enumerate(zip(xs, weight, density, epsilon, strict=True))
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


def make_models(shape=(8, 12), n=3, seed=0):
    base = randn(*shape, seed=seed)
    return [base + randn(*shape, seed=seed + 1 + i) for i in range(n)], base


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
@pytest.mark.parametrize(
    "weight,density,epsilon",
    [
        ([1.0, 0.5, 0.25], [0.5, 0.3, 0.7], [0.15, 0.1, 0.2]),
        ([0.8, -0.3, 1.2], [0.4, 0.4, 0.4], [0.0, 0.3, 0.05]),
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.15, 0.15, 0.15]),
    ],
)
@pytest.mark.parametrize("shape", [(8, 12), (40,), (2, 3, 4)])
def test_della_matches_formula(name, consensus, normalize, weight, density, epsilon, shape):
    xs, base = make_models(shape)
    out = call(name, xs, base, key=KEY, weight=weight, density=density, epsilon=epsilon)
    close(out, ref_della(xs, base, weight, density, epsilon, consensus=consensus, normalize=normalize))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_params_and_lambda(name):
    xs, base = make_models(n=2, seed=10)
    kw = {"weight": [0.7, 0.6], "density": [0.5, 0.6], "epsilon": [0.1, 0.1], "normalize": True, "rescale": False}
    out = call(name, xs, base, key=KEY, seed=7, **kw, **{"lambda": 1.5})
    expected = ref_della(
        xs,
        base,
        kw["weight"],
        kw["density"],
        kw["epsilon"],
        consensus=name == "della",
        normalize=True,
        rescale=False,
        lam=1.5,
        seed=7,
    )
    close(out, expected)


def test_della_length_one_rows_keep_with_probability_density():
    """mergekit divides by zero on rows of one element; here such a row keeps with probability `density`."""
    xs, base = make_models(shape=(64, 1), n=2, seed=20)
    out = call("della_linear", xs, base, key=KEY, weight=[1.0, 1.0], density=0.5, rescale=False)
    assert torch.isfinite(out).all()
    close(out, ref_della(xs, base, [1.0, 1.0], [0.5] * 2, [0.15] * 2, consensus=False, normalize=False, rescale=False))
    kept = ((out.double() - base).abs() > 1e-6).sum().item()
    assert 20 < kept < 108  # two models x 64 single-element rows at p = 0.5


@pytest.mark.parametrize("density,epsilon", [(0.9, 0.15), (0.85, 0.15), (0.1, 0.15), (0.15, 0.15), (0.5, 0.6)])
def test_della_density_epsilon_out_of_range_is_an_error(density, epsilon):
    xs, base = make_models(n=1)
    with pytest.raises(MergeError, match="density"):
        call("della", xs, base, weight=1.0, density=density, epsilon=epsilon)


def test_della_density_edges():
    xs, base = make_models(n=2, seed=30)
    close(call("della_linear", xs, base, weight=[1.0, 1.0], density=0.0), base)  # density <= 0: no task vector
    # density 1: nothing dropped, so della_linear is plain task arithmetic
    close(
        call("della_linear", xs, base, weight=[0.5, 0.25], density=1.0),
        base + 0.5 * (xs[0] - base) + 0.25 * (xs[1] - base),
    )
    close(call("della", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)  # zero deltas


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_is_reproducible_per_seed_and_tensor(name):
    xs, base = make_models(shape=(16, 32), n=3, seed=40)
    kw = {"weight": [1.0, 0.5, 0.5], "density": 0.4}
    first = call(name, xs, base, seed=3, key="a", **kw)
    assert torch.equal(first, call(name, xs, base, seed=3, key="a", **kw))
    assert not torch.equal(first, call(name, xs, base, seed=4, key="a", **kw))
    assert not torch.equal(first, call(name, xs, base, seed=3, key="b", **kw))
