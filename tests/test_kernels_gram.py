"""The Gram family's kernels (`kernels_gram`): inner products row by row and the combination of the
inputs over raw values, against NumPy and torch's operations, and end to end through `mergesmith run`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergesmith import kernels, kernels_gram

pytestmark = pytest.mark.skipif(not kernels_gram.available(), reason="the compiled kernels are not built here")


def _raw(x: torch.Tensor, via: str | None = None) -> kernels.Raw:
    return kernels.Raw(x.contiguous().view(-1).view(torch.uint8).numpy(), str(x.dtype).removeprefix("torch."), via)


def _floats(x: torch.Tensor, via: str | None) -> torch.Tensor:
    """The values as the engine reads them: rounded through `via`, as float32."""
    return (x.to(getattr(torch, via)) if via else x).float()


@pytest.mark.parametrize(("dtype", "via"), [("bfloat16", None), ("float32", "bfloat16"), ("float32", None)])
@pytest.mark.parametrize(("rows", "cols"), [(1, 5), (3, 37), (2, 1030)])
@pytest.mark.parametrize("relative", [False, True])
def test_gram_rows_equal_numpy_and_the_float64_products(dtype, via, rows, cols, relative):
    """C and NumPy give the same inner products bit for bit, and they are the float64 dot products of
    the rounded values (of x_i - b in float32 when relative)."""
    g = torch.Generator().manual_seed(rows * cols)
    xs = [(torch.randn(rows * cols, generator=g) * (i + 1)).to(getattr(torch, dtype)) for i in range(3)]
    base = torch.randn(rows * cols, generator=g).to(getattr(torch, dtype))
    minus = _raw(base, via) if relative else None
    got = kernels_gram.gram_rows([_raw(x, via) for x in xs], minus, cols)
    vs = [_floats(x, via) - (_floats(base, via) if relative else 0) for x in xs]
    arrays = [v.numpy().reshape(rows, cols) for v in vs]
    assert np.array_equal(got, kernels_gram.numpy_gram_rows(arrays))
    wide = [v.double().reshape(rows, cols) for v in vs]
    for i in range(3):
        for j in range(3):
            expected = (wide[i] * wide[j]).sum(dim=1).numpy()  # the formula (another order of the sum)
            assert np.allclose(got[:, i, j], expected, rtol=1e-12, atol=1e-12)


def test_the_gram_matrix_does_not_depend_on_the_chunks():
    """Rows observed in any grouping of chunks give the whole tensors' Gram matrix, bit for bit."""
    from mergesmith.methods.gram import Gram

    g = torch.Generator().manual_seed(7)
    vs = [torch.randn(12, 70, generator=g) for _ in range(2)]
    whole = Gram.of([v.clone() for v in vs])
    parts = Gram()
    for r0, r1 in ((0, 5), (5, 6), (6, 12)):
        parts.observe_tensors([v[r0:r1].clone() for v in vs], r0 * 70)
    parts.finish()
    assert np.array_equal(parts.gram, whole)
    flat = [v.double().reshape(-1) for v in vs]
    assert math.isclose(whole[0, 1], float(flat[0] @ flat[1]), rel_tol=1e-12)


@pytest.mark.parametrize(("dtype", "via", "out"), [("bfloat16", None, "bfloat16"), ("float32", "bfloat16", "float32")])
@pytest.mark.parametrize("n", [5, 37, 4099])
@pytest.mark.parametrize("kind", ["multislerp", "model_stock"])
def test_span_equals_the_torch_operations(dtype, via, out, n, kind):
    """b + s ((sum_i c_i (x_i - b)) / divisor) over raw values is torch's float32 sequence bit for
    bit: multislerp's and nuslerp's (combine of the task vectors, then add_ of the base) and
    model_stock's (add_ of the task vectors, div_, addcmul_ by the ratio)."""
    if not {dtype, out} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(getattr(torch, dtype))
    xs = [(base.float() + torch.randn(n, generator=g) * 0.05).to(getattr(torch, dtype)) for _ in range(3)]
    b32 = _floats(base, via)
    deltas = [_floats(x, via).sub_(b32) for x in xs]
    result = torch.empty(n, dtype=getattr(torch, out))
    target = kernels.Raw(result.view(torch.uint8).numpy(), out)
    if kind == "multislerp":
        c = [0.71, -0.2, 0.493]
        expected = deltas[0].mul_(c[0]).add_(deltas[1], alpha=c[1]).add_(deltas[2], alpha=c[2]).add_(b32)
        kernels_gram.span(target, [_raw(x, via) for x in xs], _raw(base, via), c)
        formula = sum(ci * (_floats(x, via).double() - b32.double()) for ci, x in zip(c, xs, strict=True)) + b32
    else:
        ratio = 0.8173
        mean = deltas[0].add_(deltas[1]).add_(deltas[2]).div_(3)
        expected = b32.clone().addcmul_(mean, torch.tensor(ratio))
        kernels_gram.span(target, [_raw(x, via) for x in xs], _raw(base, via), [1.0] * 3, divisor=3, scale=ratio)
        formula = b32.double() + ratio * sum(_floats(x, via).double() - b32.double() for x in xs) / 3
    assert torch.equal(result.view(torch.uint8), expected.to(getattr(torch, out)).view(torch.uint8))
    assert torch.allclose(result.double(), formula.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("dtype", "via", "out"), [("bfloat16", None, "bfloat16"), ("float32", "bfloat16", "float32")])
@pytest.mark.parametrize("n", [7, 4099])
def test_sce_kernel_equals_the_torch_operations(dtype, via, out, n):
    """sce's merge over raw values is torch's float32 sequence (`methods.sce`) bit for bit, with the
    edges: task vectors of 0 (no sign), sums of 0 (elected +), NaN and Inf in one model."""
    if not {dtype, out} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(getattr(torch, dtype))
    xs = [(base.float() + torch.randn(n, generator=g) * 0.05).to(getattr(torch, dtype)) for _ in range(3)]
    xs[0][0], xs[1][1], xs[2][2] = base[0], float("nan"), float("inf")  # d = 0; NaN; Inf
    xs[1][3] = xs[0][3] = base[3]  # two zero task vectors and one other
    base[4], xs[0][4], xs[1][4], xs[2][4] = 0.5, 1.5, -0.5, 0.5  # they sum to 0: + is elected
    w = [0.5, 0.3, 0.2]
    b32 = _floats(base, via)
    deltas = [_floats(x, via).sub_(b32) for x in xs]
    total = deltas[0].clone().add_(deltas[1]).add_(deltas[2])
    elected = total.sign_().add_(0.5).sign_()
    merged, divisor = torch.zeros(n), torch.zeros(n)
    for d, wi in zip(deltas, w, strict=True):
        agree = (torch.sign(d) == elected).float()
        merged.addcmul_(d, agree, value=wi)
        divisor.add_(agree, alpha=wi)
    expected = b32.clone().add_(merged.div_(divisor.clamp_min_(1e-6)))
    result = torch.empty(n, dtype=getattr(torch, out))
    kernels_gram.sce(kernels.Raw(result.view(torch.uint8).numpy(), out), [_raw(x, via) for x in xs], _raw(base, via), w)
    want = expected.to(getattr(torch, out))
    assert torch.isnan(result[1]) and torch.isnan(want[1])  # (torch's vector and scalar NaN bytes differ)
    result[1], want[1] = 0, 0
    assert torch.equal(result.view(torch.uint8), want.view(torch.uint8))
    assert result[4].item() == 1.5  # the + model's alone
    # away from the edges, the formula in float64
    d64 = torch.stack([_floats(x, via).double() - b32.double() for x in xs])[:, 5:]
    sign = torch.where(d64.sum(0) < 0, -1.0, 1.0).double()
    keep = (torch.sign(d64) == sign).double()
    weights = torch.tensor(w, dtype=torch.float64)[:, None]
    formula = b32.double()[5:] + (weights * keep * d64).sum(0) / (weights * keep).sum(0).clamp_min(1e-6)
    assert torch.allclose(result[5:].double(), formula, rtol=1e-2, atol=1e-2)


#: name: (method, the models, their weights (None: no per-model parameters), global parameters, with a base)
RECIPES = {
    "slerp": ("slerp", ("base", "ft1"), None, {"t": 0.35}, True),
    "model_stock": ("model_stock", ("ft1", "ft2"), None, {}, True),
    "karcher": ("karcher", ("ft1", "ft2"), None, {}, False),
    "multislerp": ("multislerp", ("ft1", "ft2"), (0.5, 0.5), {}, False),
    "multislerp_base": ("multislerp", ("ft1", "ft2"), (0.2, 0.7), {}, True),
    "nuslerp": ("nuslerp", ("ft1", "ft2"), (0.4, 0.6), {}, True),
    "nuslerp_nobase": ("nuslerp", ("ft1", "ft2"), (0.3, 0.5), {}, False),
    "sce": ("sce", ("ft1", "ft2"), None, {}, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gram_merges_in_the_raw_lane_equal_the_torch_path(models, tmp_path, monkeypatch, name, dtype):
    """End to end from YAML: slerp, model_stock, karcher, multislerp, nuslerp and sce merged from the
    files' raw values by the kernels (several chunks per tensor) write the bytes the torch lane writes."""
    from conftest import merge, tensors

    from mergesmith.engine import chunks, executor

    method, names, weights, params, with_base = RECIPES[name]
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 200)
    entries = [{"model": str(models[k])} for k in names]
    for entry, w in zip(entries, weights or (), strict=False):
        entry["parameters"] = {"weight": w}
    recipe = {"merge_method": method, "dtype": dtype, "models": entries, "parameters": params}
    if with_base:
        recipe["base_model"] = str(models["base"])
    spans = []
    real_span = kernels_gram.span
    monkeypatch.setattr(kernels_gram, "span", lambda *a, **k: (spans.append(1), real_span(*a, **k)))
    lanes = []
    real_parts = executor.raw_streamed_parts

    def parts(*args):
        lanes.append(result := real_parts(*args))
        return result

    monkeypatch.setattr(executor, "raw_streamed_parts", parts)
    merge(recipe, tmp_path / "raw")
    assert lanes and all(p is not None for p in lanes)  # observed and merged on the files' values
    assert bool(spans) == (with_base and method not in ("slerp", "sce"))
    monkeypatch.setattr(executor, "raw_streams", lambda ctx, t, entries: False)
    merge(recipe, tmp_path / "torch")
    a, b = tensors(tmp_path / "raw"), tensors(tmp_path / "torch")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    if method == "slerp":  # the formula, independently, on one tensor
        key = "model.layers.1.mlp.up_proj.weight"
        v0, v1 = (tensors(models[k])[key].to(getattr(torch, dtype)).double() for k in ("base", "ft1"))
        cos, t = float((v0 * v1).sum() / (v0.norm() * v1.norm())), 0.35
        if abs(cos) > 0.9995:
            expected = (1 - t) * v0 + t * v1
        else:
            theta = math.acos(cos)
            expected = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
        assert torch.allclose(a[key].double(), expected, rtol=1e-2, atol=1e-3)
