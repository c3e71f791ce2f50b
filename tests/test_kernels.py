"""The compiled kernels and their NumPy fallback: the same stream, checked against SplitMix64
written out here in plain Python integers; fused DARE masking equal to mask-and-multiply; the
streamed TIES top-k (hardshrink per chunk) equal to the whole-tensor mask on tie-heavy data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith import kernels
from mergesmith.methods.sparsify import SMALL, Magnitude, top_k_mask
from mergesmith.rng import TensorRNG

MASK = (1 << 64) - 1


def splitmix_word(key: int, w: int) -> int:
    z = (key + ((w >> 1) + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 32) if w & 1 else (z & 0xFFFFFFFF)


def test_the_compiled_kernels_are_built():
    """The editable install builds the extension; without it DARE masks run ~10x slower."""
    assert kernels.available()


@pytest.mark.parametrize("start,count", [(0, 1), (0, 100), (1, 7), (37, 1000), (2**40 + 3, 65)])
def test_words_are_splitmix64_halves(start, count):
    key = 0x0123456789ABCDEF
    expected = np.array([splitmix_word(key, start + i) for i in range(count)], dtype=np.uint32)
    assert np.array_equal(kernels.words(key, start, count), expected)
    assert np.array_equal(kernels.numpy_words(key, start, count), expected)


def test_chunks_draw_what_the_whole_draws():
    key = 987654321
    whole = kernels.words(key, 0, 10_001)
    parts = np.concatenate([kernels.words(key, a, b - a) for a, b in [(0, 3), (3, 4096), (4096, 9999), (9999, 10_001)]])
    assert np.array_equal(whole, parts)


@pytest.mark.parametrize("p", [0.1, 0.53, 0.9])
def test_fused_keep_apply_equals_mask_times_values(p):
    rng = TensorRNG(7, "model.layers.0.mlp.up_proj.weight", ("a", "b"))
    x = torch.randn(333, 77)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, -1.0, 0.0])
    expected = x * (rng.uniform(tuple(x.shape), 1, start=12) < p)
    got = rng.keep_apply(x.clone(), p, 1, start=12)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
    assert torch.equal(rng.keep_mask(tuple(x.shape), p, 1, start=12), rng.uniform(tuple(x.shape), 1, start=12) < p)
    kept = float((got != 0).float().mean())
    assert abs(kept - p) < 0.02


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 64, 400])
def test_streamed_top_k_with_many_ties_equals_the_whole_mask(rows_per_chunk):
    """Values from a handful of levels: thousands equal the threshold, so chunks keep all, none or
    (one chunk) some of them; the result is the whole-tensor mask, ties to the lowest index."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = 400, 2800  # > SMALL values: the sampled bracket is used
    assert rows * cols > SMALL
    delta = torch.randint(-6, 7, (rows, cols), generator=gen).float() / 8
    density = 0.37
    k = int(density * delta.numel())
    expected = delta * top_k_mask(delta.abs(), k)
    pruner = Magnitude(density)
    pruner.setup(delta.numel())
    flat = delta.reshape(-1)
    from mergesmith.methods.sparsify import sample_blocks

    pruner.sample(torch.cat([flat[a:b] for a, b in sample_blocks(delta.numel())]))
    chunks = [(r, min(rows, r + rows_per_chunk)) for r in range(0, rows, rows_per_chunk)]
    while True:
        for r0, r1 in chunks:
            pruner.observe(delta[r0:r1].clone(), r0 * cols)
        if pruner.finish():
            break
    got = torch.cat([pruner.apply(delta[r0:r1].clone(), r0 * cols) for r0, r1 in chunks])
    assert torch.equal(got, expected)
    assert int(torch.count_nonzero(got)) == min(k, int(torch.count_nonzero(delta)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, -0.4), (0.7,)])
def test_compiled_ties_merge_equals_the_torch_operations(monkeypatch, normalize, weights):
    """The fused TIES consensus/disjoint merge gives the torch path's values (zeros, sign ties, a NaN)."""
    from mergesmith.methods.task_vectors import merge_task_vectors

    gen = torch.Generator().manual_seed(11)
    base = torch.randn(97, 31, generator=gen)
    xs = [base + torch.randint(-3, 4, (97, 31), generator=gen).float() / 4 for _ in weights]
    xs[0][0, 0] = float("nan")

    def run():
        return merge_task_vectors(
            [x.clone() for x in xs],
            base.clone(),
            list(weights),
            prune=None,
            consensus=True,
            normalize=normalize,
            lambda_=0.9,
        )

    fused = run()
    monkeypatch.setattr(kernels, "_LIB", None)
    reference = run()
    assert torch.equal(fused.isnan(), reference.isnan()) and bool(fused.isnan().any())
    assert torch.equal(torch.nan_to_num(fused), torch.nan_to_num(reference))


def expected_bracket(a: np.ndarray, lo: float | None, hi: float | None) -> tuple[int, int, list, int]:
    """(below lo or NaN, equal to lo, strictly between in order, equal to hi and not lo); no lo:
    nothing below or at it; no hi: no upper bound."""
    below = 0 if lo is None else int(np.count_nonzero(~(a >= np.float32(lo))))
    at_lo = np.zeros(a.shape, bool) if lo is None else a == np.float32(lo)
    at_hi = np.zeros(a.shape, bool) if hi is None else (a == np.float32(hi)) & ~at_lo
    inside = np.ones(a.shape, bool) if lo is None else a > np.float32(lo)
    if hi is not None:
        inside &= a < np.float32(hi)
    return below, int(at_lo.sum()), a[inside].tolist(), int(at_hi.sum())


def as_tuple(b: kernels.Bracket) -> tuple[int, int, list, int]:
    return b.below, b.at_lo, b.inside.tolist(), b.at_hi


@pytest.mark.parametrize("lo,hi", [(0.7, 0.8), (0.7, None), (0.75, 0.75), (0.5, 1.25)])
def test_bracket_counts_and_gathers_as_numpy(lo, hi):
    """Below lo (NaN there), at lo and at hi counted, strictly between gathered in order."""
    gen = np.random.default_rng(5)
    a = np.abs(gen.standard_normal(100_003)).astype(np.float32)
    a[:40_000] = np.round(a[:40_000] * 4) / 4  # discrete: thousands equal to 0.5, 0.75, 1.25
    a[[3, 77, 99_999]] = np.nan
    expected = expected_bracket(a, lo, hi)
    if lo * 4 == int(lo * 4):  # lo on the grid: thousands at lo (and at hi, unless it is lo)
        assert expected[1] > 1000 and (hi == lo or expected[3] > 1000)
    assert as_tuple(kernels.bracket(a, lo, hi)) == expected
    assert as_tuple(kernels.numpy_bracket(a, lo, hi)) == expected


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_merges_with_and_without_the_compiled_kernels_are_identical(models, tmp_path, monkeypatch, method):
    """End to end from YAML: the NumPy/torch fallback writes the same bytes as the kernels."""
    from conftest import merge, tensors

    from mergesmith.engine import chunks
    from mergesmith.methods import sparsify

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 200)  # several chunks per tensor
    monkeypatch.setattr(sparsify, "SMALL", 50)  # thresholds bracketed by a sample (the bracket kernel)
    monkeypatch.setattr(sparsify, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(sparsify, "SAMPLE_RUN", 5)
    params = {"weight": 0.5, "density": 0.6}
    if method == "della":
        params["epsilon"] = 0.1
    if method == "breadcrumbs_ties":
        params["gamma"] = 0.05
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": params} for k in ("ft1", "ft2")],
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "compiled")
    monkeypatch.setattr(kernels, "_LIB", None)
    merge(recipe, tmp_path / "fallback")
    a, b = tensors(tmp_path / "compiled"), tensors(tmp_path / "fallback")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "dtype,via,out",
    [
        ("bfloat16", None, "bfloat16"),
        ("float32", "bfloat16", "bfloat16"),
        ("float16", None, "float16"),
        ("float32", None, "float32"),
        ("bfloat16", "float16", "float32"),
    ],
)
@pytest.mark.parametrize("n", [5, 37, 4099])
@pytest.mark.parametrize("divisor", [None, 1.35])
def test_fused_linear_equals_the_torch_operations(dtype, via, out, n, divisor):
    """One pass over raw values gives torch's float32 result bit for bit: x0*w0, an FMA per further
    input (torch's add_ with alpha), a true division, then rounding to the output dtype."""
    if not {dtype, out} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    g = torch.Generator().manual_seed(n)
    xs = [(torch.randn(n, generator=g) * 3).to(getattr(torch, dtype)) for _ in range(3)]
    weights = [0.3, 0.45, -0.61]
    floats = [(x.to(getattr(torch, via)) if via else x).float().clone() for x in xs]
    expected = floats[0].mul_(weights[0])
    expected.add_(floats[1], alpha=weights[1]).add_(floats[2], alpha=weights[2])
    if divisor is not None:
        expected.div_(divisor)
    expected = expected.to(getattr(torch, out))
    result = torch.empty(n, dtype=getattr(torch, out))
    raw = [kernels.Raw(x.view(-1).view(torch.uint8).numpy(), dtype, via) for x in xs]
    kernels.linear(kernels.Raw(result.view(torch.uint8).numpy(), out), raw, weights, divisor)
    assert torch.equal(result.view(torch.uint8), expected.view(torch.uint8))
    values = [(x.to(getattr(torch, via)) if via else x).double() for x in xs]
    exact = sum(w * v for w, v in zip(weights, values, strict=True)) / (divisor or 1.0)  # the formula
    assert torch.allclose(result.double(), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("dtype", "via", "out"), [("bfloat16", None, "bfloat16"), ("float32", "bfloat16", "float32")])
@pytest.mark.parametrize("n", [5, 37, 4099])
@pytest.mark.parametrize("t", [0.0013, 0.5])
def test_fused_nearswap_equals_the_torch_operations(dtype, via, out, n, t):
    """One pass over raw values gives torch's float32 result bit for bit (a true reciprocal, the
    product by t in float32, addcmul's FMA), NaN and infinite inputs included."""
    if not {dtype, out} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(getattr(torch, dtype))
    x = (base.float() + torch.randn(n, generator=g) * torch.rand(n, generator=g) * 0.05).to(getattr(torch, dtype))
    x[0] = base[0]  # |d| = 0: the 1e-6 floor
    if n > 3:
        x[1], x[2] = float("nan"), float("inf")
    b32, x32 = ((v.to(getattr(torch, via)) if via else v).float().clone() for v in (base, x))
    delta = x32.sub_(b32)
    omega = delta.abs().clamp_min_(1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    expected = b32.clone().addcmul_(delta, omega).to(getattr(torch, out))
    result = torch.empty(n, dtype=getattr(torch, out))
    raw = [kernels.Raw(v.view(torch.uint8).numpy(), dtype, via) for v in (x, base)]
    kernels.nearswap(kernels.Raw(result.view(torch.uint8).numpy(), out), raw[0], raw[1], t)
    nan = expected.isnan()  # the same places; the NaN's bit pattern is the kernels' quiet NaN (see ms_to_bf16)
    assert torch.equal(result.isnan(), nan)
    assert torch.equal(result[~nan].view(torch.uint8), expected[~nan].view(torch.uint8))
    b64, x64 = ((v.to(getattr(torch, via)) if via else v).double() for v in (base, x))
    d = x64 - b64
    w = (t / d.abs().clamp_min(1e-6)).clamp(0, 1)
    exact = b64 + w * d  # the formula, in float64
    finite = torch.isfinite(exact)
    assert torch.allclose(result.double()[finite], exact[finite], rtol=1e-2, atol=1e-2)
    assert n <= 3 or bool(result[1:3].isnan().all())


@pytest.mark.parametrize(("dtype", "via", "out"), [("bfloat16", None, "bfloat16"), ("float32", "bfloat16", "float32")])
@pytest.mark.parametrize("n", [5, 37, 4099])
@pytest.mark.parametrize("m", [1, 3])
def test_ramplus_kernels_equal_the_torch_operations(dtype, via, out, n, m):
    """ram's overlap counts and ramplus_tl's merge over raw values are torch's (`methods.ram`) bit
    for bit: changes below epsilon, unique and shared ones, NaN and infinite inputs included."""
    from mergesmith.methods.ram import Overlap, _active, ramplus_tl

    if not kernels.has_ram() or not {dtype, out} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    g = torch.Generator().manual_seed(n + m)
    base = torch.randn(n, generator=g).to(getattr(torch, dtype))
    xs = []
    for i in range(m):
        keep = torch.rand(n, generator=g) < 0.5  # about half the values unchanged: unique and shared changes
        x = (base.float() + torch.randn(n, generator=g) * 0.05 * keep).to(getattr(torch, dtype))
        if n > 3 and i == 0:
            x[1], x[2] = float("nan"), float("inf")
        xs.append(x)
    rounded = [(v.to(getattr(torch, via)) if via else v).float() for v in (base, *xs)]
    overlap = Overlap(1e-5)
    overlap.count(*_active([v.clone() for v in rounded[1:]], rounded[0].clone(), 1e-5), 0)
    raw = [kernels.Raw(v.view(torch.uint8).numpy(), dtype, via) for v in (base, *xs)]
    assert kernels.ram_overlap(raw[1:], raw[0], 1e-5) == overlap.chunks[0]
    overlap.finish()
    expected = ramplus_tl([v.clone() for v in rounded[1:]], rounded[0].clone(), r=0.3, alpha=0.5).to(
        getattr(torch, out)
    )
    result = torch.empty(n, dtype=getattr(torch, out))
    boosts = [
        1 + 0.3 * min(max(s / max(u, 1e-5), 0.0), 0.5) for s, u in zip(overlap.shared, overlap.unique, strict=True)
    ]
    kernels.ramplus(kernels.Raw(result.view(torch.uint8).numpy(), out), raw[1:], raw[0], 1e-5, boosts)
    nan = expected.isnan()  # the same places; the NaN's bit pattern is the kernels' quiet NaN (see ms_to_bf16)
    assert torch.equal(result.isnan(), nan)
    assert torch.equal(result[~nan].view(torch.uint8), expected[~nan].view(torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_nonfinite_counts_nan_and_inf(dtype, monkeypatch):
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    x[[0, 17, 5000]] = float("nan")
    x[[9, 10_000]] = float("inf")
    x[44] = -float("inf")
    raw = x.view(torch.uint8).numpy()
    expected = int((~torch.isfinite(x)).sum())  # torch's own test of every value
    assert expected == 6
    for lib in (kernels._LIB, None):  # the compiled scan, then the NumPy fallback (in steps)
        monkeypatch.setattr(kernels, "_LIB", lib)
        monkeypatch.setattr(kernels, "SCAN_CHUNK", 1000)
        assert kernels.nonfinite(raw, dtype) == expected
        assert kernels.nonfinite(x) == expected  # a tensor: scanned as its bytes
        assert kernels.nonfinite(x.view(-1, 1)[::2]) == 4  # not contiguous, copied: values 0, 44, 5000, 10000
        assert kernels.nonfinite(memoryview(raw[: 10 * x.element_size()]), dtype) == 2  # values 0 and 9
        assert kernels.nonfinite(np.zeros(8, np.uint8), "int64") == 0
        assert kernels.nonfinite(torch.tensor([1, 2, 3])) == 0


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_nonfinite_counts_float8(dtype, monkeypatch):
    x = torch.tensor([0.5, -1.0, float("nan"), 2.0, -float("nan")]).to(getattr(torch, dtype))
    if dtype == "float8_e5m2":
        x = torch.cat([x, torch.tensor([float("inf"), -float("inf")]).to(x.dtype)])
    expected = int((~torch.isfinite(x.float())).sum())
    assert expected == (2 if dtype == "float8_e4m3fn" else 4)
    monkeypatch.setattr(kernels, "_LIB", None)
    assert kernels.nonfinite(x) == expected


@pytest.mark.parametrize(
    "dtype,out_dtype", [(None, None), ("bfloat16", None), ("float16", "float32"), (None, "bfloat16")]
)
def test_linear_merges_with_and_without_the_fused_kernel_are_identical(models, tmp_path, monkeypatch, dtype, out_dtype):
    """End to end from YAML (a sharded input, a gradient, recipe and output dtypes): the fused kernel
    reading the files writes the bytes the torch path writes."""
    from conftest import merge, tensors

    from mergesmith.engine import chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 300)  # several chunks per tensor, one cut mid-row
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": [0.2, 0.9, 0.4]}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.7}},
            {"model": str(models["base"]), "parameters": {"weight": 0.3}},
        ],
    }
    if dtype:
        recipe["dtype"] = dtype
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    if not {dtype or "float32", out_dtype or dtype or "float32"} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    merge(recipe, tmp_path / "fused")
    monkeypatch.setattr(kernels, "_LIB", None)  # no kernels: every tensor through torch
    merge(recipe, tmp_path / "torch")
    a, b = tensors(tmp_path / "fused"), tensors(tmp_path / "torch")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_delta_bracket_and_l1_kernels_equal_the_float32_passes():
    """The raw lane's observing kernels: the bracket of |x - b| (rounded through a recipe dtype) and
    DARE's row L1 norms before and after the drop, against the torch/NumPy passes on the delta."""
    g = torch.Generator().manual_seed(11)
    x, b = torch.randn(37, 101, generator=g), torch.randn(37, 101, generator=g)
    b[:20] = torch.round(b[:20].clamp(-3.9, 3.9) * 16) / 16  # deltas of k/4 exactly (bf16 holds both)
    x[:20] = b[:20] + torch.randint(-2, 3, (20, 101), generator=g).float() / 4
    xb, bb = x.to(torch.bfloat16), b
    d = xb.float() - bb  # x read as bfloat16, b as float32
    a = d.abs().reshape(-1).numpy()
    raw_x = kernels.Raw(xb.view(torch.uint8).numpy(), "bfloat16")
    raw_b = kernels.Raw(bb.view(torch.uint8).numpy(), "float32")
    for lo, hi in [(0.25, 0.5), (0.3, 0.9), (0.5, None), (None, 0.5), (None, None)]:
        assert as_tuple(kernels.delta_bracket(raw_x, raw_b, lo, hi)) == expected_bracket(a, lo, hi)
    assert kernels.delta_bracket(raw_x, raw_b, 0.25, 0.5).at_hi > 200
    via = kernels.Raw(x.view(torch.uint8).numpy(), "float32", "bfloat16")  # float32 rounded through bf16
    assert as_tuple(kernels.delta_bracket(via, raw_b, 0.3, 0.9)) == expected_bracket(a, 0.3, 0.9)
    rows = d.clone()
    expected = kernels.keep_apply_l1(rows.numpy(), 77, 1000, TensorRNG.word_cut(0.4))
    got = kernels.delta_keep_l1(raw_x, raw_b, 101, 77, 1000, TensorRNG.word_cut(0.4))
    assert all(np.array_equal(u, v) for u, v in zip(got, expected, strict=True))
    assert np.allclose(got[0], d.abs().double().sum(dim=1).numpy())


def _quantised_models(root):
    """A float32 base on a grid of 1/256 and two fine-tunes that add multiples of 1/64: deltas take
    five values, so TIES thresholds fall among thousands of equal magnitudes."""
    from mergesmith.toymodels import load_state_dict, make_base, save_state_dict

    base = make_base(root / "qbase", layers=2, hidden=64, vocab=96, seed=4)
    state = {k: torch.round(v * 256) / 256 for k, v in load_state_dict(base).items()}
    save_state_dict(base, state)
    out = {"base": base}
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        ft = root / f"qft{seed}"
        ft.mkdir()
        for f in base.iterdir():
            if f.suffix == ".json":
                (ft / f.name).write_bytes(f.read_bytes())
        ft_state = {k: v + torch.randint(-2, 3, v.shape, generator=g).float() / 64 for k, v in state.items()}
        save_state_dict(ft, ft_state, shards=2)
        out[f"ft{seed}"] = ft
    return out


@pytest.mark.parametrize(
    "method,params,extra",
    [
        ("ties", {"density": 0.5}, {}),
        ("ties", {"density": [0.3, 0.8]}, {"parameters": {"normalize": False, "lambda": 1.3}, "dtype": "bfloat16"}),
        ("ties", {"density": 0.7}, {"dtype": "float16", "out_dtype": "bfloat16"}),
        ("dare_ties", {"density": 0.53}, {"dtype": "bfloat16"}),
        ("dare_ties", {"density": 0.4}, {"parameters": {"rescale": False, "normalize": True}}),
        ("dare_linear", {"density": [0.9, 0.2]}, {"parameters": {"lambda": 0.7}, "out_dtype": "float16"}),
        ("task_arithmetic", {}, {"parameters": {"normalize": True}}),
    ],
)
def test_task_vector_merges_in_the_raw_lane_equal_the_torch_path(tmp_path, monkeypatch, method, params, extra):
    """End to end from YAML: ties, dare_ties, dare_linear and task_arithmetic merged from the files' raw
    values by the kernels write the bytes the torch pipeline writes (recipe and output dtypes, per-model
    densities, a weight gradient, thresholds among many equal magnitudes cut mid-chunk)."""
    from conftest import merge, tensors

    from mergesmith.engine import chunks, executor
    from mergesmith.methods import sparsify

    if not {extra.get("dtype", "float32"), extra.get("out_dtype", "float32")} <= kernels.raw_kinds():
        pytest.skip("no compiled kernel for these dtypes here")
    models = _quantised_models(tmp_path)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 512)  # several chunks per tensor
    monkeypatch.setattr(sparsify, "SMALL", 100)  # thresholds bracketed by a sample
    monkeypatch.setattr(sparsify, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(sparsify, "SAMPLE_RUN", 16)
    weights = {"ft1": [0.9, 0.3], "ft2": 0.6}
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": {"weight": w, **params}} for k, w in weights.items()],
        **extra,
    }
    merge(recipe, tmp_path / "raw")
    calls = []
    monkeypatch.setattr(kernels, "task_merge", lambda *a, **k: calls.append(1))  # the raw lane is gone
    monkeypatch.setattr(executor, "raw_streams", lambda ctx, t, entries: False)
    merge(recipe, tmp_path / "torch")
    assert not calls
    a, b = tensors(tmp_path / "raw"), tensors(tmp_path / "torch")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    if method == "ties" and "parameters" not in extra:  # the formula, independently: top-k, elect, disjoint mean
        base = tensors(models["base"])["model.layers.0.mlp.up_proj.weight"].double()
        fts = [tensors(models[k])["model.layers.0.mlp.up_proj.weight"].double() for k in ("ft1", "ft2")]
        w = [0.9, 0.6]  # layer 0: the start of the gradient [0.9, 0.3]
        kept = []
        for ft, wi in zip(fts, w, strict=True):
            dlt = (ft - base).reshape(-1)
            k = int(params["density"] * dlt.numel())
            mask = torch.zeros_like(dlt, dtype=torch.bool)
            mask[torch.argsort(-dlt.abs(), stable=True)[:k]] = True  # ties to the lowest index
            kept.append((dlt * mask * wi).view(base.shape))
        sign = torch.where(sum(kept) >= 0, 1.0, -1.0)
        agree = [torch.where(kd * sign > 0, kd, torch.zeros_like(kd)) for kd in kept]
        div = sum(wi * (ag != 0).double() for wi, ag in zip(w, agree, strict=True)).clamp(min=min(w) / 2)
        expected = (base + sum(agree) / div).to(a["model.layers.0.mlp.up_proj.weight"].dtype)
        assert torch.allclose(a["model.layers.0.mlp.up_proj.weight"].double(), expected.double(), atol=1e-6)


def test_copies_and_fused_merges_never_import_torch(models, tmp_path, monkeypatch):
    """`mergesmith run` of a linear merge, of frankenmerges, of ties and dare_ties, of the Gram family
    (slerp, model_stock, karcher), sce and arcee_fusion in a process where importing torch fails: all
    complete, and write what in-process runs write through torch (no kernels); arcee_fusion, whose
    raw lane rounds its scores differently from torch's, what an in-process run with the kernels writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import merge, tensors

    import mergesmith

    recipes = {
        "linear": {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [{"model": str(models[k]), "parameters": {"weight": w}} for k, w in (("ft1", 0.6), ("ft2", 0.4))],
        },
        **{
            method: {  # the task-vector raw lane
                "merge_method": method,
                "base_model": str(models["base"]),
                "dtype": "bfloat16",
                "models": [
                    {"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.4}} for k in ("ft1", "ft2")
                ],
            }
            for method in ("ties", "dare_ties")
        },
        **{
            method: {  # the Gram family's and sce's raw lane
                "merge_method": method,
                "base_model": str(models["base"]),
                "dtype": "bfloat16",
                "models": [{"model": str(models[k])} for k in ("ft1", "ft2")],
            }
            for method in ("model_stock", "sce")
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(models["base"]),
            "dtype": "bfloat16",
            "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
            "parameters": {"t": 0.3},
        },
        "karcher": {
            "merge_method": "karcher",
            "dtype": "float32",
            "models": [{"model": str(models[k])} for k in ("ft1", "ft2")],
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": str(models["base"]),
            "dtype": "bfloat16",
            "models": [{"model": str(models["ft1"])}],
        },
        "stack": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(models["ft2"]), "layer_range": [1, 4]}]},
            ],
        },
        "stack-scaled-bf16": {  # scaled and converted copies: passthrough's fused variant
            "merge_method": "passthrough",
            "out_dtype": "bfloat16",
            "slices": [
                {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 2]}]},
                {
                    "sources": [{"model": str(models["ft2"]), "layer_range": [2, 4]}],
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.37}, {"value": 1.0}]},
                },
            ],
        },
    }
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('this test forbids importing torch')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from mergesmith.cli import main\n"
        "main.main(sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(mergesmith.__file__).parents[1])}
    merge(recipes["arcee_fusion"], tmp_path / "arcee_fusion-ref")  # with the kernels, before they go
    monkeypatch.setattr(kernels, "_LIB", None)  # the in-process references: every tensor through torch
    for name, recipe in recipes.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe))
        done = subprocess.run(
            [sys.executable, "-c", script, "run", str(path), str(tmp_path / name), "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        if name != "arcee_fusion":
            merge(recipe, tmp_path / f"{name}-ref")
        a, b = tensors(tmp_path / name), tensors(tmp_path / f"{name}-ref")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_magnitude_ranks_are_the_inverse_of_a_stable_argsort():
    """DELLA's ranks: the CPU key sort equals torch's double stable argsort, ties by position."""
    from mergesmith.methods.sparsify import magnitude_ranks

    rows = torch.randn(7, 1000, generator=torch.Generator().manual_seed(3))
    rows[2, :40] = 0.5
    rows[2, 40:80] = -0.5  # equal magnitudes of both signs
    rows[5, ::3] = 0.0
    expected = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True).float()
    assert torch.equal(magnitude_ranks(rows), expected)
    assert torch.equal(magnitude_ranks(rows.double()).float(), expected)  # the torch path


@pytest.mark.parametrize("cols", [1, 2, 255, 1000, 70_000])
def test_radix_row_ranks_equal_a_stable_argsort_and_numpy(cols):
    """The per-row radix sort (C) gives each element its place by |value|, ties by position: the
    inverse of a stable argsort, and NumPy's key sort; bytes shared by every key (skipped passes),
    signed zeros, subnormals, infinities and NaN included."""
    g = torch.Generator().manual_seed(cols)
    rows = torch.randn(5, cols, generator=g)
    rows[1] = rows[1].round()  # few distinct magnitudes: long runs of ties
    rows[2] = 0.75  # one key everywhere: every pass skipped
    rows[3, ::2] = -rows[3, ::2]
    if cols >= 8:
        rows[4, :8] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), -float("inf"), float("nan"), 3.0])
    expected = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True).float()
    assert getattr(kernels._LIB, "ms_row_ranks", None) is not None  # the C sort, not the fallback
    got = kernels.row_ranks(rows.numpy())
    assert np.array_equal(got, kernels.numpy_row_ranks(rows.numpy()))
    assert torch.equal(torch.from_numpy(got), expected)  # NaN last, as its bit pattern sorts
