"""The performance machinery computes exactly what the plain formulas do, in bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith.engine import chunks
from mergesmith.engine import executor as executor_module
from mergesmith.engine.lanes.torch_chunked import elementwise
from mergesmith.methods import sparsify
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorReader
from mergesmith.toymodels import load_state_dict, save_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"


def sorted_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: a stable sort by descending value, ties to the lowest index."""
    flat = values.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(values.shape)


@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000])
def test_top_k_small_matches_sort(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 20, (10, 100), generator=g).float()  # many ties
    assert torch.equal(sparsify.top_k_mask(x, k), sorted_top_k(x, k))


@pytest.mark.parametrize("frac", [1e-6, 0.1, 0.5, 0.53, 0.9, 1 - 1e-6])
def test_top_k_large_matches_full_selection(frac):
    """Past SMALL the bracketed selection runs; it must equal kthvalue + lowest-index ties exactly."""
    g = torch.Generator().manual_seed(1)
    n = sparsify.SMALL * 3 + 17
    x = torch.randn(n, generator=g).abs()
    x[::5] = float(x[123])  # a big block of ties at one value
    x[: n // 3] = torch.sort(x[: n // 3]).values  # structured data: the strided sample is biased
    k = int(frac * n)
    flat_threshold = torch.kthvalue(x, n - k + 1).values
    expect = x > flat_threshold
    eq = x == flat_threshold
    expect |= eq & (torch.cumsum(eq, 0) <= k - int(expect.sum()))
    got = sparsify.top_k_mask(x, k)
    assert int(got.sum()) == k
    assert torch.equal(got, expect)


def test_kth_smallest_equals_sorted():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sparsify.SMALL * 2, generator=g)
    s = torch.sort(x).values
    for r in (1, 2, 1000, x.numel() // 2, x.numel() - 1, x.numel()):
        assert float(sparsify.kth_smallest(x, r)) == float(s[r - 1])


def test_keep_mask_equals_uniform_threshold():
    rng = TensorRNG(5, "model.layers.0.mlp.up_proj.weight", ("a", "b"))
    for p in (0.53, 0.1, 1e-9, 0.999999):
        for stream in (0, 1):
            assert torch.equal(rng.keep_mask((33, 17), p, stream), rng.uniform((33, 17), stream) < p)


def test_rng_reproducible_and_keyed():
    a = TensorRNG(1, "t", ("m1", "m2")).keep_mask((1000,), 0.5, 0)
    b = TensorRNG(1, "t", ("m1", "m2")).keep_mask((1000,), 0.5, 0)
    c = TensorRNG(1, "t", ("m2", "m1")).keep_mask((1000,), 0.5, 1)  # same model, other position
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, TensorRNG(2, "t", ("m1", "m2")).keep_mask((1000,), 0.5, 0))
    assert not torch.equal(a, TensorRNG(1, "u", ("m1", "m2")).keep_mask((1000,), 0.5, 0))


def _plan(recipe: dict):
    config = MergeConfig.model_validate(recipe)
    plan, infos = prepare_merge(config, MergeOptions())
    return plan, {k: TensorReader(v) for k, v in infos.items()}


@pytest.mark.parametrize("method", ["linear", "passthrough", "task_arithmetic"])
def test_chunked_equals_whole(models, monkeypatch, method):
    """Row chunks of one row each give bit-identical tensors to whole-tensor execution."""
    if method == "linear":
        recipe = {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [{"model": str(models[k]), "parameters": {"weight": w}} for k, w in (("ft1", 0.7), ("ft2", 0.4))],
        }
    elif method == "passthrough":
        recipe = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(models["ft1"]), "layer_range": [0, 3]}]}],
        }
    else:
        recipe = {
            "merge_method": "task_arithmetic",
            "base_model": str(models["base"]),
            "models": [{"model": str(models[k]), "parameters": {"weight": 0.6}} for k in ("ft1", "ft2")],
        }
    plan, readers = _plan(recipe)
    assert any(elementwise(t) for t in plan.tensors)
    whole = {t.name: executor_module.Executor(plan, readers).compute(t) for t in plan.tensors}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1)
    chunked = {t.name: executor_module.Executor(plan, readers).compute(t) for t in plan.tensors}
    assert all(torch.equal(whole[n], chunked[n]) for n in whole)


def test_chunked_run_through_shard_writer(models, tmp_path, monkeypatch):
    """The threaded writer puts every chunk at its offset: the file equals the in-memory result."""
    from conftest import merge

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models[k]), "parameters": {"weight": 1.0}} for k in ("base", "ft1")],
    }
    plan, readers = _plan(recipe)
    expect = {t.name: executor_module.Executor(plan, readers).compute(t) for t in plan.tensors}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 7)
    merge(recipe, tmp_path / "out")
    got = load_state_dict(tmp_path / "out")
    assert got.keys() == expect.keys()
    assert all(torch.equal(got[n], expect[n]) for n in got)


MEMORY_SCRIPT = """
import resource, sys
from mergesmith.cli import main
import torch  # imported before measuring: the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("GROWTH", (after - before) * 1024)
"""


def test_peak_memory_bounded(tmp_path):
    """Merging models of 4 x 50 MB tensors grows RSS by far less than one model's size."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)]
    base = {n: torch.randn(3200, 4000, generator=g).to(torch.float32) for n in names}  # 51 MB each
    for k, scale in (("a", 1.0), ("b", 0.5)):
        save_state_dict(tmp_path / k, {n: t * scale for n, t in base.items()})
        (tmp_path / k / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    del base
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / k), "parameters": {"weight": 0.5}} for k in ("a", "b")],
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, "run", str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    growth = int(out.split("GROWTH")[1].split()[0])
    model_bytes = 4 * 3200 * 4000 * 4
    assert growth < model_bytes / 3, growth
    merged = load_state_dict(tmp_path / "out")
    a = load_state_dict(tmp_path / "a")
    torch.testing.assert_close(merged[names[0]], a[names[0]] * 0.75)
