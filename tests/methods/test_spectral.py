"""tsv, iso_c and iso_cts against float64 references written from the papers.

The references take independent routes where the maths allows: the nearest orthonormal matrix as
A (A^T A)^(-1/2) by an eigendecomposition (not an SVD), the common subspace of iso_cts as the top
eigenvectors of D D^T, Iso-C's mean singular value as the nuclear norm over the rank."""

from __future__ import annotations

import pytest
import torch
from method_calls import call, close, randn


def ref_polar(a):
    """A (A^T A)^(-1/2): the orthonormal factor of A's polar decomposition (full column rank)."""
    a = a.double()
    evals, evecs = torch.linalg.eigh(a.T @ a)
    return a @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def ref_mean(base, xs, lam):
    return base.double() + lam * sum(x.double() - base.double() for x in xs) / len(xs)


def ref_tsv(base, xs, rank_share=1.0, lam=1.0):
    if base.dim() != 2:
        return ref_mean(base, xs, lam)
    b = base.double()
    r, t = min(b.shape), len(xs)
    k = max(1, int(rank_share * r / t))
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = torch.linalg.svd(x.double() - b)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, v = ref_polar(torch.cat(us, 1)), ref_polar(torch.cat(vs, 1))
    return b + lam * u @ torch.diag(torch.cat(ss)) @ v.T


def ref_iso_c(base, xs, lam=1.0):
    if base.dim() != 2:
        return ref_mean(base, xs, lam)
    b = base.double()
    total = sum(x.double() - b for x in xs)
    sigma = torch.linalg.matrix_norm(total, ord="nuc") / min(b.shape)
    if total.shape[0] < total.shape[1]:
        return b + lam * sigma * ref_polar(total.T).T
    return b + lam * sigma * ref_polar(total)


def top_eigvecs(m, k):
    evals, evecs = torch.linalg.eigh(m)  # ascending
    return evecs[:, evals.argsort(descending=True)[:k]]


def ref_iso_cts(base, xs, common_fraction=0.8, lam=1.0):
    if base.dim() != 2:
        return ref_mean(base, xs, lam)
    b = base.double()
    deltas = [x.double() - b for x in xs]
    r, t = min(b.shape), len(xs)
    per_task = min(round((r - int(common_fraction * r)) / t), r // t)
    k = r - t * per_task
    total = sum(deltas)
    uc = top_eigvecs(total @ total.T, k)
    vc = total.T @ uc  # = V_k S_k: the right vectors and singular values of the common part
    sc = vc.norm(dim=0)
    us, vs, ss = [uc], [vc / sc], [sc]
    for d in deltas:
        own = d - uc @ uc.T @ d
        u, s, vh = torch.linalg.svd(own)
        us.append(u[:, :per_task])
        vs.append(vh[:per_task].T)
        ss.append(s[:per_task])
    sigma = torch.cat(ss).mean()
    return b + lam * sigma * ref_polar(torch.cat(us, 1)) @ ref_polar(torch.cat(vs, 1)).T


def inputs(shape, n, seed):
    base = randn(*shape, seed=seed)
    return base, [base + randn(*shape, seed=seed + 1 + i, scale=0.1) for i in range(n)]


SHAPES = [(12, 9), (8, 16), (24,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("n", "rank_share", "lam"), [(3, 1.0, 1.0), (2, 0.5, 0.7), (4, 1.0, 1.3)])
def test_tsv_matches_formula(shape, n, rank_share, lam):
    base, xs = inputs(shape, n, seed=10 * n)
    out = call("tsv", xs, base, rank_share=rank_share, **{"lambda": lam})
    close(out, ref_tsv(base, xs, rank_share, lam), rtol=1e-4, atol=1e-5)


def test_tsv_of_one_model_at_full_rank_is_that_model():
    base, xs = inputs((7, 5), 1, seed=3)
    close(call("tsv", xs, base), xs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("n", "lam"), [(1, 1.0), (3, 0.6), (4, 1.5)])
def test_iso_c_matches_formula(shape, n, lam):
    base, xs = inputs(shape, n, seed=7 * n)
    close(call("iso_c", xs, base, **{"lambda": lam}), ref_iso_c(base, xs, lam), rtol=1e-4, atol=1e-5)


def test_iso_c_keeps_an_isotropic_task_vector_and_skips_dead_directions():
    base = randn(6, 6, seed=1)
    q, _ = torch.linalg.qr(randn(6, 6, seed=2))
    close(call("iso_c", [base + 0.3 * q], base), base + 0.3 * q, rtol=1e-5, atol=1e-5)
    low = randn(6, 2, seed=3) @ randn(2, 6, seed=4)  # rank 2: four undefined directions
    u, s, vh = torch.linalg.svd(low)
    expected = base + s.sum() / 6 * u[:, :2] @ vh[:2]
    close(call("iso_c", [base + low], base), expected, rtol=1e-4, atol=1e-5)
    b32 = base.float()
    close(call("iso_c", [b32.clone(), b32.clone()], b32), b32, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("n", "frac", "lam"), [(2, 0.8, 1.0), (3, 0.5, 0.8), (4, 0.0, 1.2)])
def test_iso_cts_matches_formula(shape, n, frac, lam):
    base, xs = inputs(shape, n, seed=5 * n)
    out = call("iso_cts", xs, base, common_fraction=frac, **{"lambda": lam})
    close(out, ref_iso_cts(base, xs, frac, lam), rtol=1e-4, atol=1e-5)


def test_iso_cts_all_common_is_iso_c():
    base, xs = inputs((10, 7), 3, seed=2)
    close(call("iso_cts", xs, base, common_fraction=1.0), call("iso_c", xs, base), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(6, 5), (17,)])
def test_zero_deltas_give_the_base(name, shape):
    base = randn(*shape, seed=1).float()
    out = call(name, [base.clone() for _ in range(3)], base)
    assert torch.isfinite(out).all()
    close(out, base, rtol=0, atol=1e-7)
