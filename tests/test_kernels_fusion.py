"""arcee_fusion's kernels (`kernels_fusion`) against float64 formulas, and the raw lane end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith import kernels, kernels_fusion

pytestmark = pytest.mark.skipif(not kernels_fusion.available(), reason="the compiled kernels are not built here")


def _raw(x: torch.Tensor) -> kernels.Raw:
    return kernels.Raw(x.contiguous().view(-1).view(torch.uint8).numpy(), str(x.dtype).removeprefix("torch."))


def ref_kl(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x.double(), dim=-1) + 1e-8
    q = torch.softmax(b.double(), dim=-1) + 1e-8
    return (p * torch.log(p / q)).sum(dim=-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("rows", "width", "spread"), [(3, 7, 1.0), (5, 2048, 0.02), (2, 1030, 8.0)])
def test_row_kl_matches_the_float64_formula(dtype, rows, width, spread):
    """Each row's KL divergence of the two softmaxes (+1e-8), exp and log the kernels' own: within
    float32 rounding of the probabilities (their log ratio cancels where the rows are close)."""
    g = torch.Generator().manual_seed(width)
    b = (torch.randn(rows, width, generator=g) * spread).to(getattr(torch, dtype))
    x = (b.float() + torch.randn(rows, width, generator=g) * spread * 0.3).to(getattr(torch, dtype))
    kl = kernels_fusion.row_kl(_raw(x), _raw(b), width)
    want = ref_kl(x.float(), b.float()).numpy()
    assert kl.dtype == np.float32 and kl.shape == (rows,)
    assert np.allclose(kl, want, rtol=2e-3, atol=1e-7), (kl, want)


def test_row_kl_edges():
    """Equal rows: 0; a row with a NaN or +Inf: NaN (as torch's softmax gives); -Inf is a zero probability."""
    b = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    x = b.clone()
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    x[3, 5] = float("-inf")
    kl = kernels_fusion.row_kl(_raw(x), _raw(b), 16)
    assert kl[0] == pytest.approx(0.0, abs=1e-7)
    assert np.isnan(kl[1]) and np.isnan(kl[2])
    assert kl[3] == pytest.approx(float(ref_kl(x[3:], b[3:])[0]), rel=1e-4)


def test_scores_and_the_merge():
    """|x - b| kl[row] everywhere and at given positions; the merge keeps x where the score reaches the
    threshold, else b, and an infinite change times the mask's 0 is NaN (torch's `mul_`)."""
    rows, width = 6, 40
    g = torch.Generator().manual_seed(3)
    b = torch.randn(rows, width, generator=g)
    x = b + torch.randn(rows, width, generator=g) * 0.1
    x[0, 0] = float("inf")
    kl = np.linspace(0.5, 2.0, rows, dtype=np.float32)
    scores = kernels_fusion.scores(_raw(x), _raw(b), kl, width)
    want = ((x - b).abs() * torch.from_numpy(kl)[:, None]).reshape(-1)
    assert np.array_equal(scores, want.numpy())
    at = np.array([5, 5, 239, 0, 77])
    assert np.array_equal(kernels_fusion.scores(_raw(x), _raw(b), kl, width, at), want.numpy()[at])
    threshold = float(np.quantile(scores[1:], 0.8))
    out = torch.empty(rows, width)
    kernels_fusion.fusion(_raw(out), _raw(x), _raw(b), kl, width, threshold)
    keep = want.view(rows, width) >= np.float32(threshold)
    expected = torch.where(keep, x, b)
    assert torch.equal(out[:, 1:], expected[:, 1:]) and torch.equal(out[1:], expected[1:])
    assert out[0, 0] == float("inf")  # its score is Inf: kept
    x[0, 0], kl[0] = float("inf"), 0.0  # score Inf * 0 = NaN: not kept, and Inf * 0 = NaN
    kernels_fusion.fusion(_raw(out), _raw(x), _raw(b), kl, width, threshold)
    assert torch.isnan(out[0, 0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_arcee_fusion_in_the_raw_lane(models, tmp_path, monkeypatch, dtype):
    """End to end from YAML, several chunks per tensor and the quantiles from a seeded sample (shrunk):
    the raw lane (no torch) and the torch lane agree but for elements within rounding of the threshold,
    and a rerun writes the same bytes."""
    from conftest import merge, tensors

    from mergesmith.engine import chunks, executor
    from mergesmith.methods import arcee_fusion

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE", 500)
    recipe = {
        "merge_method": "arcee_fusion",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft1"])}],
        "dtype": dtype,
    }
    lanes = []
    real_parts = executor.raw_streamed_parts
    monkeypatch.setattr(executor, "raw_streamed_parts", lambda *a: (lanes.append(r := real_parts(*a)), r)[1])
    merge(recipe, tmp_path / "raw")
    merge(recipe, tmp_path / "again")
    assert lanes and all(p is not None for p in lanes)
    monkeypatch.setattr(executor, "raw_streams", lambda ctx, t, entries: False)
    merge(recipe, tmp_path / "torch")
    a, again, b = tensors(tmp_path / "raw"), tensors(tmp_path / "again"), tensors(tmp_path / "torch")
    base, ft = tensors(models["base"]), tensors(models["ft1"])
    total = differ = 0
    for key in a:
        assert torch.equal(a[key], again[key]), key
        y = a[key].float()
        bk, fk = base[key].to(getattr(torch, dtype)).float(), ft[key].to(getattr(torch, dtype)).float()
        assert torch.equal(y, torch.where(y == fk, fk, bk)), key  # every element is the base's or the model's
        total += y.numel()
        differ += int((a[key] != b[key]).sum())
    assert differ <= total // 1000  # the lanes' scores differ by rounding only
