"""Properties every merge method should keep, checked with hypothesis and across the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_calls import call, close, randn

from mergesmith.methods import METHODS

shapes = st.one_of(
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 8)),
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
)
seeds = st.integers(0, 2**31 - 1)
weights = st.one_of(st.floats(1e-2, 1e2), st.floats(-1e2, -1e-2))
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(shape=shapes, seed=seeds, w=weights)
def test_linear_one_model_normalized_is_that_model(shape, seed, w):
    x = randn(*shape, seed=seed)
    close(call("linear", [x], weight=[w]), x)


@FAST
@given(shape=shapes, seed=seeds, n=st.integers(1, 4), w=st.lists(weights, min_size=4, max_size=4))
def test_task_arithmetic_lambda_zero_is_the_base(shape, seed, n, w):
    base = randn(*shape, seed=seed).float()
    xs = [randn(*shape, seed=seed + 1 + i) for i in range(n)]
    out = call("task_arithmetic", xs, base, weight=w[:n], **{"lambda": 0.0})
    assert torch.equal(out, base)


@FAST
@given(shape=shapes, seed=seeds, w=weights, normalize=st.booleans(), lam=st.floats(-2, 2))
def test_ties_one_model_density_one_is_task_arithmetic(shape, seed, w, normalize, lam):
    base = randn(*shape, seed=seed)
    x = base + randn(*shape, seed=seed + 1)
    kw = {"weight": [w], "density": [1.0], "normalize": normalize, "lambda": lam}
    close(call("ties", [x], base, **kw), call("task_arithmetic", [x], base, **kw))


@FAST
@given(
    name=st.sampled_from(["dare_linear", "dare_ties", "della", "della_linear"]),
    shape=shapes,
    seed=seeds,
    rng_seed=st.integers(0, 2**32 - 1),
    key=st.text(min_size=1, max_size=30),
    density=st.floats(0.2, 0.8),
)
def test_seeded_random_methods_are_bit_identical_across_reruns(name, shape, seed, rng_seed, key, density):
    base = randn(*shape, seed=seed)
    xs = [base + randn(*shape, seed=seed + 1 + i) for i in range(3)]
    kw = {"weight": [1.0, 0.5, -0.3], "density": density}
    if name.startswith("della"):
        kw["epsilon"] = min(0.1, density / 2, (1 - density) / 2)
    first = call(name, xs, base, seed=rng_seed, key=key, **kw)
    again = call(name, xs, base, seed=rng_seed, key=key, **kw)
    assert torch.equal(first, again)


# --- every method, the same edge cases --------------------------------------------------------------

TASK_VECTOR = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
BASE_ONLY = ["sce", "ram", "ramplus_tl", "model_stock"]
EXTRA = {"nearswap": {"t": 0.01}}


def params_for(name, n):
    p = {k: [1.0 / n] * n for k in ("weight",) if k in METHODS[name].params}
    if "density" in METHODS[name].params:
        p["density"] = 0.5
    return {**p, **EXTRA.get(name, {})}


@pytest.mark.parametrize("name", TASK_VECTOR + BASE_ONLY + ["nearswap", "arcee_fusion"])
@pytest.mark.parametrize("shape", [(6, 5), (17,)])
def test_zero_deltas_give_the_base(name, shape):
    base = randn(*shape, seed=1).float()
    n = 1 if name in ("nearswap", "arcee_fusion") else 3
    out = call(name, [base.clone() for _ in range(n)], base, **params_for(name, n))
    close(out, base, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "karcher", "multislerp", "nuslerp"])
@pytest.mark.parametrize("shape", [(6, 5), (17,)])
def test_identical_inputs_give_the_input(name, shape):
    x = randn(*shape, seed=2)
    n = 2 if name == "nuslerp" else 3
    close(call(name, [x.clone() for _ in range(n)], **params_for(name, n)), x)


@pytest.mark.parametrize("name", TASK_VECTOR)
def test_task_vector_methods_at_density_one_are_task_arithmetic(name):
    base = randn(5, 6, seed=3)
    xs = [base + randn(5, 6, seed=4 + i) for i in range(3)]
    w = [0.5, -0.25, 1.0]
    m = METHODS[name].params
    kw = {"weight": w, "density": 1.0, "normalize": False, "rescale": False}
    expected = call("task_arithmetic", xs, base, weight=w)
    if name in ("ties", "dare_ties", "breadcrumbs_ties", "della"):  # sign consensus still applies
        d = [wi * (x - base) for wi, x in zip(w, xs, strict=True)]
        sigma = torch.where(sum(d) >= 0, 1.0, -1.0).double()
        expected = base + sum(di * (torch.sign(di) == sigma) for di in d)
    assert set(kw) <= set(m)
    close(call(name, xs, base, **kw), expected)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_density_near_zero_keeps_nothing(name):
    """floor(density n) = 0: mergekit asserts for TIES; here the task vector is simply empty."""
    base = randn(10, 10, seed=5).float()
    xs = [base + randn(10, 10, seed=6 + i) for i in range(2)]
    close(call(name, xs, base, weight=[1.0, 1.0], density=1e-3), base, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_handles_1d_tensors(name):
    n = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "slerp": 1}.get(name, 3)
    base = randn(13, seed=7)
    xs = [base + randn(13, seed=8 + i, scale=0.1) for i in range(n)]
    params = params_for(name, n)
    if name == "slerp":
        params["t"] = 0.5
    uses_base = METHODS[name].base != "input"
    out = call(name, xs, base if uses_base else None, **params)
    assert torch.isfinite(out).all()
