"""Each issue-2 method run end to end on real model files, against the float64 formula."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import merge, tensors
from formulas import f64, gradient, linear, slerp, task_vectors

LAYERS = 4


def layer_t(name: str, layers: int = LAYERS) -> float:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m[1]) / (layers - 1) if m else 0.0


def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(f64(actual), expected.to(torch.float64), rtol=2e-5, atol=2e-6, msg=name)


def test_linear_with_gradient_and_filter(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(models["ft1"]),
                "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 1.0}]},
            },
            {"model": str(models["ft2"]), "parameters": {"weight": 0.5}},
            {"model": str(models["ft3"]), "parameters": {"weight": 0.25}},
        ],
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    ins = [tensors(models[k]) for k in ("ft1", "ft2", "ft3")]
    assert set(out) == set(ins[0])
    for name, y in out.items():
        w1 = gradient([1.0, 3.0], layer_t(name)) if "mlp" in name else 1.0
        close(y, linear([i[name] for i in ins], [w1, 0.5, 0.25]), name)


def test_linear_normalize_false_and_out_dtype(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}],
        "parameters": {"weight": 0.5, "normalize": False},
        "out_dtype": "bfloat16",
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    a, b = tensors(models["ft1"]), tensors(models["ft2"])
    for name, y in out.items():
        assert y.dtype == torch.bfloat16
        expected = linear([a[name], b[name]], [0.5, 0.5], normalize=False)
        assert torch.equal(y, expected.to(torch.bfloat16)), name


def test_slerp_gradient_per_filter(models, tmp_path):
    t_attn, t_mlp, t_rest = [0.0, 0.5, 0.3, 0.7, 1.0], [1.0, 0.5, 0.7, 0.3, 0.0], 0.5
    recipe = {
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "slices": [
            {
                "sources": [
                    {"model": str(models["base"]), "layer_range": [0, LAYERS]},
                    {"model": str(models["ft1"]), "layer_range": [0, LAYERS]},
                ]
            }
        ],
        "parameters": {
            "t": [{"filter": "self_attn", "value": t_attn}, {"filter": "mlp", "value": t_mlp}, {"value": t_rest}]
        },
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    base, ft = tensors(models["base"]), tensors(models["ft1"])
    for name, y in out.items():
        t = (
            gradient(t_attn, layer_t(name))
            if "self_attn" in name
            else gradient(t_mlp, layer_t(name))
            if "mlp" in name
            else t_rest
        )
        close(y, slerp(t, base[name], ft[name]), name)


@pytest.mark.parametrize("method,normalize,consensus", [("task_arithmetic", False, False), ("ties", True, True)])
def test_task_vector_methods(models, tmp_path, method, normalize, consensus):
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(models["ft2"]), "parameters": {"weight": [0.2, 0.6], "density": 0.8}},
            {"model": str(models["ft3"]), "parameters": {"weight": -0.3, "density": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    base = tensors(models["base"])
    fts = [tensors(models[k]) for k in ("ft1", "ft2", "ft3")]
    for name, y in out.items():
        ws = [0.7, gradient([0.2, 0.6], layer_t(name)), -0.3]
        expected = task_vectors(
            base[name],
            [f[name] for f in fts],
            ws,
            [0.5, 0.8, 0.3] if method == "ties" else [1, 1, 1],  # task_arithmetic ignores density, as mergekit
            consensus=consensus,
            normalize=normalize,
            lam=0.9,
        )
        close(y, expected, name)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_methods(models, tmp_path, method, consensus):
    """DARE masks are random: read each model's mask off a single-model merge, then check the formula."""
    density = 0.6
    single = {}
    for k in ("ft1", "ft2"):
        recipe = {
            "merge_method": method,
            "base_model": str(models["base"]),
            "models": [{"model": str(models[k]), "parameters": {"weight": 1.0, "density": density}}],
            "parameters": {"rescale": False},
        }
        merge(recipe, tmp_path / f"single_{k}", "--random-seed", "7")
        single[k] = tensors(tmp_path / f"single_{k}")
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[k]), "parameters": {"weight": w, "density": density}}
            for k, w in (("ft1", 0.6), ("ft2", 0.4))
        ],
    }
    merge(recipe, tmp_path / "out", "--random-seed", "7")
    out = tensors(tmp_path / "out")
    base = tensors(models["base"])
    fts = {k: tensors(models[k]) for k in ("ft1", "ft2")}
    kept_total = numel = 0
    for name, y in out.items():
        masks = [(single[k][name] != base[name]).double() for k in ("ft1", "ft2")]
        kept_total += float(masks[0].sum())
        numel += masks[0].numel()
        expected = task_vectors(
            base[name],
            [fts["ft1"][name], fts["ft2"][name]],
            [0.6, 0.4],
            [density] * 2,
            consensus=consensus,
            normalize=False,
            masks=masks,
            rescale=True,
        )
        close(y, expected, name)
    # The mask keeps each element with probability `density` (binomial: 5 standard deviations).
    assert abs(kept_total / numel - density) < 5 * (density * (1 - density) / numel) ** 0.5


def test_precedence_levels(models, tmp_path):
    """source > slice > input_model_parameters > top-level parameters > default."""
    base, ft1, ft2, ft3 = (str(models[k]) for k in ("base", "ft1", "ft2", "ft3"))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, LAYERS]},
                    {
                        "model": ft1,
                        "layer_range": [0, LAYERS],
                        "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]},
                    },
                    {"model": ft2, "layer_range": [0, LAYERS]},
                    {"model": ft3, "layer_range": [0, LAYERS]},
                ],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}]},
            }
        ],
        "input_model_parameters": {ft2: {"weight": 0.25}},
        "parameters": {"weight": 0.1},
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    b = tensors(models["base"])
    fts = [tensors(models[k]) for k in ("ft1", "ft2", "ft3")]
    for name, y in out.items():
        level2 = 0.5 if "self_attn" in name else None
        w1 = 0.9 if "mlp" in name else level2 if level2 is not None else 0.1
        w2 = level2 if level2 is not None else 0.25
        w3 = level2 if level2 is not None else 0.1
        expected = task_vectors(
            b[name], [f[name] for f in fts], [w1, w2, w3], [1, 1, 1], consensus=False, normalize=False
        )
        close(y, expected, name)


def test_passthrough_scale_filter(models, tmp_path):
    """The docs' passthrough example uses a bare {filter, value} mapping (mergekit crashes on it)."""
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models["ft1"]), "layer_range": [0, LAYERS]}]}],
        "parameters": {"scale": {"filter": "o_proj", "value": 0.0}},
    }
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    src = tensors(models["ft1"])
    for name, y in out.items():
        if "o_proj" in name:
            assert torch.count_nonzero(y) == 0, name
        else:
            assert torch.equal(y, src[name]), name


def test_task_arithmetic_ignores_density_like_mergekit(models, tmp_path, caplog):
    """mergekit declares `density` for task_arithmetic and never applies it: same tensors, a warning per place."""

    def recipe(density):
        params = {"weight": 0.5} | ({"density": density} if density else {})
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(models["base"]),
            "models": [{"model": str(models[k]), "parameters": params} for k in ("ft1", "ft2")],
        }

    with caplog.at_level("WARNING"):
        merge(recipe(0.3), tmp_path / "with")
    noted = [r.message for r in caplog.records if "'density' has no effect on task_arithmetic" in r.message]
    assert [m.split(":")[0] for m in noted] == ["models[0].parameters.density", "models[1].parameters.density"]
    merge(recipe(None), tmp_path / "without")
    a, b = tensors(tmp_path / "with"), tensors(tmp_path / "without")
    assert all(torch.equal(a[n], b[n]) for n in a)
