"""Task-vector merges streamed in row chunks equal whole-tensor merges bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergesmith.engine import chunks
from mergesmith.engine import executor as executor_module
from mergesmith.methods import sparsify
from mergesmith.methods.registry import get_method
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorReader

METHODS = {
    "ties": {"weight": 0.6, "density": 0.5},
    "dare_ties": {"weight": 0.6, "density": 0.53},
    "dare_linear": {"weight": 0.6, "density": 0.4},
    "task_arithmetic": {"weight": 0.6, "density": 0.3},
    "breadcrumbs": {"weight": 0.6, "density": 0.7, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 0.6, "density": 0.7, "gamma": 0.05},
    "della": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
}


def _whole(t, readers, seed: int) -> torch.Tensor:
    """The method called once on whole float32 tensors (no streaming)."""
    xs = [readers[x.model].get(x.name).float().clone() for x in t.inputs]  # methods write in place
    base = xs[t.base]
    others = [x for i, x in enumerate(xs) if i != t.base]
    params = {**t.params, **{k: list(v) for k, v in t.per_model.items()}}
    rng = TensorRNG(seed, t.name, tuple(x.model for x in t.others))
    return get_method(t.method)(others, base, params, rng=rng).to(getattr(torch, t.dtype))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("rescale", [None, True])
def test_streamed_equals_whole(models, monkeypatch, method, rescale):
    params = dict(METHODS[method])
    if rescale is not None:
        params["rescale"] = rescale
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": params} for k in ("ft1", "ft2", "ft3")],
    }
    config = MergeConfig.model_validate(recipe)
    plan, infos = prepare_merge(config, MergeOptions())
    readers = {k: TensorReader(v) for k, v in infos.items()}
    whole = {t.name: _whole(t, readers, 7) for t in plan.tensors}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 100)  # a few rows per chunk
    monkeypatch.setattr(sparsify, "SMALL", 50)  # thresholds bracketed by a sample
    monkeypatch.setattr(sparsify, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(sparsify, "SAMPLE_RUN", 5)
    ex = executor_module.Executor(plan, readers, seed=7)
    for t in plan.tensors:
        got = ex.compute(t)
        assert torch.equal(got, whole[t.name]), t.name


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
@pytest.mark.parametrize("k", [0, 1, 900, 2100, 4095, 4096])
def test_streamed_top_k_with_ties(monkeypatch, chunk_rows, k):
    """Many equal magnitudes: the streamed mask keeps the lowest indices among ties, like top_k_mask."""
    g = torch.Generator().manual_seed(k)
    delta = torch.randint(-6, 7, (64, 64), generator=g).float()
    expect = delta * sparsify.top_k_mask(delta.abs(), k)
    monkeypatch.setattr(sparsify, "SMALL", 64)
    pruner = sparsify.Magnitude(k / delta.numel() + 1e-9)
    pruner.setup(delta.numel())
    monkeypatch.setattr(sparsify, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(sparsify, "SAMPLE_RUN", 5)
    pruner.sample(torch.cat([delta.reshape(-1)[a:b] for a, b in sparsify.sample_blocks(delta.numel())]))
    while True:
        for r0 in range(0, 64, chunk_rows):
            pruner.observe(delta[r0 : r0 + chunk_rows].clone(), r0 * 64)
        if pruner.finish():
            break
    got = torch.cat([pruner.apply(delta[r0 : r0 + chunk_rows].clone(), r0 * 64) for r0 in range(0, 64, chunk_rows)])
    assert torch.equal(got, expect)


def test_unlucky_sample_observes_again(monkeypatch):
    """A sample that misses the threshold opens its bracket and observes once more: still exact."""
    monkeypatch.setattr(sparsify, "SMALL", 64)
    delta = torch.arange(4096, dtype=torch.float32).view(64, 64)
    pruner = sparsify.Magnitude(0.5)
    pruner.setup(4096)
    pruner.sample(torch.full((100,), 4000.0))  # says every value is about 4000
    pruner.observe(delta.clone(), 0)
    assert not pruner.finish()
    pruner.observe(delta.clone(), 0)
    assert pruner.finish()
    assert torch.equal(pruner.apply(delta.clone(), 0), delta * (delta >= 2048))


def test_shard_digests_while_writing_equal_the_files(tmp_path):
    """The writer's running digest (for the resume journal) is the digest of the finished file."""
    from mergesmith.engine.sinks import ChunkJob
    from mergesmith.output.shards import ShardWriter, file_digest
    from mergesmith.shard_layout import layout_shards

    tensors = {f"t{i}": torch.randn(100 + i, 3) for i in range(6)}
    shards = layout_shards([(n, "float32", tuple(t.shape)) for n, t in tensors.items()], 4000)
    writer = ShardWriter(tmp_path, shards)
    got = {}
    writer.on_hashed = lambda shard, digest: got.__setitem__(shard.file, digest)
    for name, t in tensors.items():
        writer.write_chunk(ChunkJob(name, 0, t[:50].numpy().view("uint8"), "float32"))
        writer.write_chunk(ChunkJob(name, 50 * 3 * 4, t[50:].numpy().view("uint8"), "float32"))
    files = writer.close()
    assert len(files) > 1 and sorted(got) == sorted(files)
    assert all(got[f] == file_digest(tmp_path / f) for f in files)


def _chunked(recipe: dict, monkeypatch) -> tuple:
    """(plan, readers, whole-tensor results, an executor streaming a few rows per chunk)."""
    plan, infos = prepare_merge(MergeConfig.model_validate(recipe), MergeOptions())
    readers = {k: TensorReader(v) for k, v in infos.items()}
    whole = {t.name: _whole(t, readers, 0) for t in plan.tensors}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 100)
    return plan, readers, whole, executor_module.Executor(plan, readers)


def test_streamed_slerp_equals_whole_and_the_formula(models, monkeypatch):
    """slerp streamed in row chunks (norms and dot product observed first) equals slerp of the whole
    tensors bit for bit, and the spherical interpolation computed here in float64."""
    recipe = {
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
        "parameters": {"t": [0.2, 0.7]},
    }
    plan, readers, whole, ex = _chunked(recipe, monkeypatch)
    chunked = [t for t in plan.tensors if len(t.shape) >= 2]
    assert chunked
    for t in plan.tensors:
        got = ex.compute(t)
        assert torch.equal(got, whole[t.name]), t.name
    t = chunked[-1]
    v0, v1 = (readers[x.model].get(x.name).double().reshape(-1) for x in (t.inputs[t.base], t.others[0]))
    s = t.params["t"]
    theta = torch.acos(torch.dot(v0 / v0.norm(), v1 / v1.norm()))
    expected = (torch.sin((1 - s) * theta) * v0 + torch.sin(s * theta) * v1) / torch.sin(theta)
    assert torch.allclose(ex.compute(t).double().reshape(-1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_streamed_model_stock_equals_whole_and_the_formula(models, monkeypatch, filter_wise):
    """model_stock streamed in row chunks (the task vectors' Gram matrix observed first, or per-row
    cosines inside each chunk) equals model_stock of the whole tensors bit for bit, and the formula."""
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k])} for k in ("ft1", "ft2", "ft3")],
        "parameters": {"filter_wise": filter_wise},
    }
    plan, readers, whole, ex = _chunked(recipe, monkeypatch)
    for t in plan.tensors:
        assert torch.equal(ex.compute(t), whole[t.name]), t.name
    t = next(t for t in plan.tensors if len(t.shape) >= 2)
    b = readers[t.inputs[t.base].model].get(t.name).double()
    ds = [readers[x.model].get(x.name).double() - b for x in t.others]
    if filter_wise:  # one cosine per row
        ds = [d.reshape(-1, t.shape[-1]) for d in ds]
        cos = [torch.nn.functional.cosine_similarity(ds[i], ds[j], dim=1) for i, j in ((0, 1), (0, 2), (1, 2))]
        c = (sum(cos) / 3).unsqueeze(1)
    else:
        flat = [d.reshape(-1) for d in ds]
        c = (
            sum(torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm()) for i, j in ((0, 1), (0, 2), (1, 2)))
            / 3
        )
    ratio = 3 * c / (1 + 2 * c)
    expected = b + (ratio * sum(ds) / 3).reshape(b.shape)
    assert torch.allclose(ex.compute(t).double(), expected, rtol=1e-5, atol=1e-6)
