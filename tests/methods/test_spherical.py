"""nuslerp, multislerp, karcher (and slerp's identity case) against float64 formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from method_calls import call, close, randn

from mergesmith.errors import MergeError

# --- independent float64 references -------------------------------------------------------------


def ref_slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ua = a / max(a.norm().item(), 1e-7)
    ub = b / max(b.norm().item(), 1e-7)
    cos = min(1.0, max(-1.0, torch.dot(ua, ub).item()))
    theta = math.acos(cos)
    s = math.sin(theta)
    if abs(s) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / s


def ref_nuslerp(xs, base, weight, flatten=True, row_wise=False):
    a, b = (x.double().clone() for x in xs)
    if base is not None:
        a, b = a - base.double(), b - base.double()
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    out = torch.empty_like(a)
    if flatten or a.dim() < 2:
        out = ref_slerp_pair(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif row_wise:  # vectors along the first axis
        for idx in itertools.product(*(range(s) for s in a.shape[1:])):
            sel = (slice(None), *idx)
            out[sel] = ref_slerp_pair(t, a[sel], b[sel])
    else:  # vectors along the last axis
        for idx in itertools.product(*(range(s) for s in a.shape[:-1])):
            out[idx] = ref_slerp_pair(t, a[idx], b[idx])
    return out if base is None else out + base.double()


def ref_multislerp(xs, base, weight, normalize_weights=True, eps=1e-8):
    vs = [x.double().reshape(-1) - (0 if base is None else base.double().reshape(-1)) for x in xs]
    w = [float(v) for v in weight]
    if normalize_weights:
        w = [v / sum(weight) for v in w]
    n = [v.norm().item() for v in vs]
    u = [v / (ni + eps) for v, ni in zip(vs, n, strict=True)]
    m = sum(wi * ui for wi, ui in zip(w, u, strict=True))
    if m.norm().item() < eps:
        y = w[0] * vs[0] + w[1] * vs[1]
    else:
        m = m / m.norm()
        g = sum(wi * (ui - torch.dot(ui, m) * m) for wi, ui in zip(w, u, strict=True))
        tau = g.norm().item() + eps
        y = sum(wi * ni for wi, ni in zip(w, n, strict=True)) * (m * math.cos(tau) + g * math.sin(tau) / tau)
    y = y.reshape(xs[0].shape)
    return y if base is None else y + base.double()


def ref_karcher(xs, max_iter=10, tol=1e-5):
    vs = [x.double().reshape(-1) for x in xs]
    n = [v.norm().item() for v in vs]
    valid = [(v / ni) for v, ni in zip(vs, n, strict=True) if ni > tol]
    if not valid:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    alpha = 1 / len(valid)
    u = sum(alpha * ui for ui in valid)
    u = valid[0].clone() if u.norm().item() < tol else u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for ui in valid:
            c = min(1.0, max(-1.0, torch.dot(u, ui).item()))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent += alpha * theta / math.sin(theta) * (ui - c * u)
        tn = tangent.norm().item()
        if tn < tol:
            break
        u = math.cos(tn) * u + math.sin(tn) * tangent / tn
        u = u / u.norm()
    return (sum(n) / len(xs) * u).reshape(xs[0].shape)


# --- nuslerp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weight", [[1.0, 1.0], [0.3, 0.7], [-0.5, 2.0], [1.0, -1.0]])
def test_nuslerp_matches_formula(flatten, row_wise, with_base, weight):
    xs = [randn(5, 7, seed=1), randn(5, 7, seed=2)]
    base = randn(5, 7, seed=3) if with_base else None
    out = call("nuslerp", xs, base, weight=weight, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(out, ref_nuslerp(xs, base, weight, flatten, row_wise), rtol=1e-4, atol=1e-5)


def test_nuslerp_row_wise_true_interpolates_columns():
    """mergekit's `nuslerp_row_wise: true` slerps columns W[:, j]; we keep that and say so in the docs."""
    xs = [randn(4, 6, seed=4), randn(4, 6, seed=5)]
    out = call("nuslerp", xs, weight=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(6):
        close(out[:, j], ref_slerp_pair(2 / 3, xs[0][:, j], xs[1][:, j]))
    rows = call("nuslerp", xs, weight=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=False)
    for i in range(4):
        close(rows[i], ref_slerp_pair(2 / 3, xs[0][i], xs[1][i]))
    assert not torch.allclose(out, rows)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_3d_unflattened(row_wise):
    xs = [randn(3, 4, 5, seed=6), randn(3, 4, 5, seed=7)]
    out = call("nuslerp", xs, weight=[0.4, 0.6], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    close(out, ref_nuslerp(xs, None, [0.4, 0.6], False, row_wise), rtol=1e-4, atol=1e-5)


def test_nuslerp_1d_and_identical_inputs():
    x = randn(9, seed=8)
    close(call("nuslerp", [x, x.clone()], weight=[0.2, 0.8]), x)
    close(call("nuslerp", [x, x.clone()], weight=[0.2, 0.8], nuslerp_flatten=False), x)
    y = randn(9, seed=9)
    close(call("nuslerp", [x, y], weight=[0.2, 0.8], nuslerp_flatten=False), ref_nuslerp([x, y], None, [0.2, 0.8]))
    m = randn(3, 4, seed=10)
    for flatten, row_wise in itertools.product([True, False], repeat=2):
        out = call("nuslerp", [m, m.clone()], weight=[1.0, 3.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
        close(out, m)


def test_nuslerp_zero_deltas_give_base():
    b = randn(4, 4, seed=11)
    close(call("nuslerp", [b.clone(), b.clone()], b, weight=[1.0, 1.0]), b)


def test_nuslerp_input_counts():
    x = randn(3, 3, seed=12)
    with pytest.raises(MergeError, match="exactly two"):
        call("nuslerp", [x, x, x], weight=[1.0, 1.0, 1.0])
    with pytest.raises(MergeError, match="exactly two"):
        call("nuslerp", [x], x.clone() + 1, weight=[1.0])
    close(call("nuslerp", [x], weight=[1.0]), x)  # a tensor only one model has passes through


# --- multislerp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("weight", [[1.0, 2.0, 3.0], [0.5, -0.2, 0.7]])
def test_multislerp_matches_formula(with_base, normalize_weights, weight):
    xs = [randn(6, 5, seed=20 + i) for i in range(3)]
    base = randn(6, 5, seed=30) if with_base else None
    out = call("multislerp", xs, base, weight=weight, normalize_weights=normalize_weights)
    close(out, ref_multislerp(xs, base, weight, normalize_weights), rtol=1e-4, atol=1e-5)


def test_multislerp_two_models_1d():
    xs = [randn(11, seed=31), randn(11, seed=32)]
    close(call("multislerp", xs, weight=[0.25, 0.75]), ref_multislerp(xs, None, [0.25, 0.75]))


def test_multislerp_identical_inputs_and_single_input():
    x = randn(4, 6, seed=33)
    close(call("multislerp", [x, x.clone(), x.clone()], weight=[1.0, 2.0, 0.5]), x)
    close(call("multislerp", [x], weight=[0.3]), x)
    b = randn(4, 6, seed=34)
    close(call("multislerp", [x, x.clone()], b, weight=[1.0, 1.0]), x)


def test_multislerp_cancelling_directions():
    x = randn(8, seed=35)
    # two opposite inputs with equal weight: the weighted sum (mergekit's fallback), here zero
    close(call("multislerp", [x, -x], weight=[1.0, 1.0]), torch.zeros(8))
    with pytest.raises(MergeError, match="zero"):
        call("multislerp", [x, -x, x], weight=[1.0, 2.0, 1.0])
    with pytest.raises(MergeError, match="sum to zero"):
        call("multislerp", [x, randn(8, seed=36)], weight=[1.0, -1.0])


# --- karcher ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_karcher_matches_formula(n_models):
    xs = [randn(7, 6, seed=40 + i, scale=1 + i) for i in range(n_models)]
    close(call("karcher", xs), ref_karcher(xs), rtol=1e-4, atol=1e-5)
    close(call("karcher", xs, max_iter=2, tol=1e-3), ref_karcher(xs, 2, 1e-3), rtol=1e-4, atol=1e-5)


def test_karcher_converges_to_the_karcher_mean():
    """At the Karcher mean u the log maps of the unit inputs sum to zero."""
    xs = [randn(50, seed=50 + i) for i in range(4)]
    out = call("karcher", xs, max_iter=200, tol=1e-7).double()
    u = out / out.norm()
    logs = torch.zeros_like(u)
    for x in xs:
        ui = x / x.norm()
        theta = math.acos(torch.dot(u, ui).clamp(-1, 1).item())
        logs += theta / math.sin(theta) * (ui - math.cos(theta) * u)
    assert logs.norm().item() < 1e-4
    assert out.norm().item() == pytest.approx(sum(x.norm().item() for x in xs) / 4, rel=1e-5)


def test_karcher_identical_zero_and_single_inputs():
    x = randn(3, 5, seed=60)
    close(call("karcher", [x, x.clone(), x.clone()]), x)
    close(call("karcher", [x]), x)
    zero = torch.zeros(3, 5, dtype=torch.float64)
    close(call("karcher", [x, zero]), x / 2)  # the zero input is skipped but counts in the mean norm
    close(call("karcher", [zero, zero.clone()]), zero)
    v = randn(10, seed=61)
    w = randn(10, seed=62)
    close(call("karcher", [v, w]), ref_karcher([v, w]), rtol=1e-4, atol=1e-5)


def test_slerp_identical_inputs():
    x = randn(4, 4, seed=70)
    close(call("slerp", [x.clone()], x, t=0.3), x)
