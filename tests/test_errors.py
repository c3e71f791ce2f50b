"""Bad input: exit code 2, one clear message naming the key/file/tensor, and no output left behind."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli

from mergesmith.toymodels import make_base


def run_bad(recipe, tmp_path, *flags):
    path = tmp_path / "r.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    result = run_cli("run", path, tmp_path / "out", "--quiet", *flags)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left either
    return result.output


def two(models, **params):
    return [{"model": str(models[k]), "parameters": dict(params)} for k in ("ft1", "ft2")]


def test_unknown_method_suggests(models, tmp_path):
    out = run_bad({"merge_method": "dare-ties", "models": two(models, weight=1)}, tmp_path)
    assert "unknown merge method 'dare-ties'; did you mean 'dare_ties'?" in out


def test_misspelled_parameter_is_ignored_with_a_warning_or_refused_with_strict(models, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(models["base"]), "models": two(models, weight=1, densty=0.5)}
    expected = (
        "models[0].parameters.densty: unknown parameter 'densty' for ties, ignored, as mergekit does;"
        " did you mean 'density'?"
    )
    out = run_bad(recipe, tmp_path, "--strict")
    assert "--strict: 2 key(s) or parameter(s) would be ignored" in out and expected in out
    path = tmp_path / "r.yml"
    result = run_cli("run", path, tmp_path / "out", "--quiet")  # mergekit merges it: so do we, saying so
    assert result.exit_code == 0, result.output
    assert f"WARNING: {expected}" in result.output and "models[1].parameters.densty" in result.output


def test_misspelled_key(models, tmp_path):
    recipe = {"merge_method": "linear", "modles": two(models, weight=1)}
    out = run_bad(recipe, tmp_path)
    assert (
        "a recipe needs exactly one of 'models', 'slices' or 'modules' ('modles' is not a key; did you mean 'models'?)"
        in out
    )


def test_misspelled_nested_key(models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(models["ft1"]), "paramters": {"weight": 1}}]}
    out = run_bad(recipe, tmp_path)  # without its parameters the model has no weight: still an error
    assert "models[0].paramters: unknown key 'paramters', ignored, as mergekit does; did you mean 'parameters'?" in out
    assert "linear needs parameter 'weight'" in out


def test_missing_model_directory(models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]}
    out = run_bad(recipe, tmp_path)
    assert "model directory not found" in out and "nope" in out


def test_layer_range_beyond_model(models, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models["ft1"]), "layer_range": [2, 9]}]}],
    }
    out = run_bad(recipe, tmp_path)
    assert "slices[0].sources[0].layer_range" in out and "4 layers" in out


def test_shape_mismatch(models, tmp_path):
    wide = make_base(tmp_path / "wide", hidden=48, vocab=96, seed=9)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 1}},
            {"model": str(wide), "parameters": {"weight": 1}},
        ],
    }
    out = run_bad(recipe, tmp_path)
    assert "shape mismatch" in out and "model.layers.0" in out


def test_missing_required_parameter(models, tmp_path):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
    }
    out = run_bad(recipe, tmp_path)
    assert "slerp needs parameter 't'" in out


def test_failure_during_merge_leaves_nothing(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 1}},
            {"model": str(models["ft2"]), "parameters": {"weight": -1}},
        ],
    }
    out = run_bad(recipe, tmp_path)
    assert "sum to zero" in out


@pytest.mark.parametrize(
    "text,expected",
    [
        ("merge_method: linear\nmodels: [", "not valid YAML"),
        ("- just a list", "must be a YAML mapping"),
        ("merge_method: linear\nmodels: []\n", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\ndtype: bf17\nmodels: [{model: x}]\n", "unknown dtype 'bf17'"),
    ],
)
def test_malformed_recipes(tmp_path, text, expected):
    assert expected in run_bad(text, tmp_path)


def test_existing_output_is_kept(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": two(models, weight=1)}))
    result = run_cli("run", path, tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    result = run_cli("run", path, tmp_path / "out", "--quiet", "--overwrite")
    assert result.exit_code == 0 and not (tmp_path / "out" / "precious.txt").exists()
