"""karcher, multislerp, nuslerp, sce, arcee_fusion, ram and ramplus_tl in row chunks: streamed
through the executor (a few rows per chunk) they equal the method on whole tensors bit for bit, and
float64 formulas written here."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from mergesmith.engine import chunks
from mergesmith.engine import executor as executor_module
from mergesmith.methods import arcee_fusion
from mergesmith.methods.registry import get_method
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorReader

FTS = ("ft1", "ft2", "ft3")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as `Executor.run` uses: on a loaded 2-core machine idle OpenMP workers make
    each small chunk's softmax cost milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def whole(t, readers, seed: int = 0) -> torch.Tensor:
    """The method called once on whole float32 tensors (no stream)."""
    xs = [readers[x.model].get(x.name).float().clone() for x in t.inputs]  # methods write in place
    base = xs[t.base] if t.base is not None else None
    others = [x for i, x in enumerate(xs) if i != t.base]
    params = {**t.params, **{k: list(v) for k, v in t.per_model.items()}}
    rng = TensorRNG(seed, t.name, tuple(x.model for x in t.others))
    return get_method(t.method)(others, base, params, rng=rng).to(getattr(torch, t.dtype))


def streamed_equals_whole(recipe: dict, monkeypatch) -> tuple:
    """Every tensor streamed equals it whole; returns (a >= 2-D tensor, its float64 inputs, its result)."""
    assert get_method(recipe["merge_method"]).streams or recipe["merge_method"] in ("ram", "nearswap")  # element-wise
    plan, infos = prepare_merge(MergeConfig.model_validate(recipe), MergeOptions())
    readers = {k: TensorReader(v) for k, v in infos.items()}
    expected = {t.name: whole(t, readers) for t in plan.tensors}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 100)  # three rows of 32 per chunk
    ex = executor_module.Executor(plan, readers)
    for t in plan.tensors:
        assert torch.equal(ex.compute(t), expected[t.name]), t.name
    t = next(t for t in plan.tensors if len(t.shape) >= 2 and t.shape[0] > 3)
    inputs = [readers[x.model].get(x.name).double() for x in t.inputs]
    base = inputs[t.base] if t.base is not None else None
    return t, [x for i, x in enumerate(inputs) if i != t.base], base, ex.compute(t).double()


def recipe_of(models, method: str, n: int = 3, base: bool = True, **params) -> dict:
    recipe = {"merge_method": method, "models": [{"model": str(models[k])} for k in FTS[:n]], "parameters": params}
    if base:
        recipe["base_model"] = str(models["base"])
    return recipe


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.allclose(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6), (
        (got - want.reshape(got.shape)).abs().max()
    )


def slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na, nb = max(a.norm().item(), 1e-7), max(b.norm().item(), 1e-7)
    theta = math.acos(min(1.0, max(-1.0, torch.dot(a, b).item() / (na * nb))))
    if abs(math.sin(theta)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_karcher(models, monkeypatch):
    t, xs, _, got = streamed_equals_whole(recipe_of(models, "karcher", base=False), monkeypatch)
    vs = [x.reshape(-1) for x in xs]
    units = [v / v.norm() for v in vs]
    u = sum(units) / 3
    u = u / u.norm()
    for _ in range(10):  # the fixed-point iteration, max_iter 10, tol 1e-5
        tangent = torch.zeros_like(u)
        for ui in units:
            theta = math.acos(min(1.0, max(-1.0, torch.dot(u, ui).item())))
            if theta >= 1e-5:
                tangent += (theta / math.sin(theta) / 3) * (ui - math.cos(theta) * u)
        step = tangent.norm().item()
        if step < 1e-5:
            break
        u = math.cos(step) * u + math.sin(step) * tangent / step
        u = u / u.norm()
    close(got, sum(v.norm() for v in vs) / 3 * u)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(models, monkeypatch, with_base):
    recipe = recipe_of(models, "multislerp", base=with_base)
    for m, w in zip(recipe["models"], (0.5, 0.3, 0.2), strict=True):
        m["parameters"] = {"weight": w}
    t, xs, base, got = streamed_equals_whole(recipe, monkeypatch)
    vs = [x.reshape(-1) - (0 if base is None else base.reshape(-1)) for x in xs]
    w, n = (0.5, 0.3, 0.2), [v.norm().item() for v in vs]
    u = [v / (ni + 1e-8) for v, ni in zip(vs, n, strict=True)]
    m = sum(wi * ui for wi, ui in zip(w, u, strict=True))
    m = m / m.norm()
    g = sum(wi * (ui - torch.dot(ui, m) * m) for wi, ui in zip(w, u, strict=True))
    tau = g.norm().item() + 1e-8
    y = sum(wi * ni for wi, ni in zip(w, n, strict=True)) * (m * math.cos(tau) + g * math.sin(tau) / tau)
    close(got, y if base is None else y + base.reshape(-1))


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp(models, monkeypatch, mode):
    recipe = recipe_of(models, "nuslerp", n=2, nuslerp_flatten=mode == "flatten", nuslerp_row_wise=mode == "columns")
    for m, w in zip(recipe["models"], (0.3, 0.7), strict=True):
        m["parameters"] = {"weight": w}
    t, (a, b), base, got = streamed_equals_whole(recipe, monkeypatch)
    a, b = a - base, b - base
    if mode == "flatten":
        y = slerp_pair(0.7, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif mode == "rows":
        y = torch.stack([slerp_pair(0.7, a[i], b[i]) for i in range(a.shape[0])])
    else:
        y = torch.stack([slerp_pair(0.7, a[:, j], b[:, j]) for j in range(a.shape[1])], dim=1)
    close(got, y + base)


@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce(models, monkeypatch, select_topk):
    t, xs, base, got = streamed_equals_whole(recipe_of(models, "sce", select_topk=select_topk), monkeypatch)
    if select_topk < 1:
        return  # selection needs whole tensors: streamed equals whole above; the formula is in tests/methods
    ds = [x - base for x in xs]
    energy = [(d * d).mean().item() for d in ds]
    omega = [e / sum(energy) for e in energy]
    elected = torch.where(sum(ds) >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(d) == elected).double() for d in ds]
    merged = sum(w * a * d for w, a, d in zip(omega, agree, ds, strict=True))
    divisor = sum(w * a for w, a in zip(omega, agree, strict=True)).clamp_min(1e-6)
    close(got, base + merged / divisor)


@pytest.mark.parametrize("sampled", [False, True])
def test_arcee_fusion(models, monkeypatch, sampled):
    if sampled:  # every >= 2-D tensor has its quantiles from a seeded sample, gathered chunk by chunk
        monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE", 500)
    t, (x,), base, got = streamed_equals_whole(recipe_of(models, "arcee_fusion", n=1), monkeypatch)
    if sampled:
        return
    p, q = torch.softmax(x, dim=-1) + 1e-8, torch.softmax(base, dim=-1) + 1e-8
    scores = (x - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    s = sorted(scores.reshape(-1).tolist())
    q1, median, q3 = (s[int(f * (len(s) - 1))] for f in (0.25, 0.5, 0.75))
    keep = scores >= median + 1.5 * (q3 - q1)
    assert 0 < int(keep.sum()) < keep.numel()
    changed = got != base
    assert torch.equal(changed, keep & (x != base))  # the same elements taken (float32 scores agree here)
    close(got, torch.where(keep, x, base))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram(models, monkeypatch, method):
    t, xs, base, got = streamed_equals_whole(recipe_of(models, method, epsilon=0.01), monkeypatch)
    ds = [x - base for x in xs]
    active = [(d.abs() > 0.01).double() for d in ds]
    count = sum(active)
    y = base.clone()
    for d, a in zip(ds, active, strict=True):
        if method == "ramplus_tl":
            rho = (a * (count > 1)).sum().item() / max((a * (count == 1)).sum().item(), 0.01)
            boost = 1 + 0.1 * min(max(rho, 0.0), 0.2)
        else:
            boost = 1.0
        y += torch.where(count == 1, boost, 1 / count.clamp_min(1)) * a * d
    close(got, y)


def test_nearswap(models, monkeypatch):
    recipe = recipe_of(models, "nearswap", n=1, t=0.01)
    t, (x,), base, got = streamed_equals_whole(recipe, monkeypatch)
    omega = (0.01 / (base - x).abs().clamp_min(1e-6)).clamp(0, 1)
    close(got, omega * x + (1 - omega) * base)


def test_validate_names_the_merges_that_need_whole_tensors(models, tmp_path):
    from conftest import run_cli

    streamed = tmp_path / "streamed.yml"
    streamed.write_text(yaml.safe_dump(recipe_of(models, "sce")))
    whole = tmp_path / "whole.yml"
    whole.write_text(yaml.safe_dump(recipe_of(models, "sce", select_topk=0.5)))
    result = run_cli("validate", streamed)
    assert result.exit_code == 0, result.output
    assert "whole tensors" not in result.output
    result = run_cli("validate", whole)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("whole tensors:"))
    assert "select_topk < 1" in line and "model.embed_tokens.weight" in line  # the largest (96 x 32)
    needed = float(re.search(r"needs ~([\d.]+) kB", line)[1]) * 1e3
    assert needed == pytest.approx(4 * 96 * 32 * 5 + 4 * 96 * 32, rel=1e-2)  # 4 inputs + result in float32, the copy
