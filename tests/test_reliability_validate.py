"""`mergesmith validate` and `run --dry-run`: every problem at once, each with its YAML path and a
suggestion; estimates for a valid recipe; never a traceback on any YAML (hypothesis)."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergesmith.toymodels import load_state_dict

PROBLEM_LINE = re.compile(r"^  \S.*?: .+ -> .+$")


@pytest.fixture(autouse=True, scope="module")
def offline():
    """Random strings may look like hub ids: never go to the network for them."""
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield
    huggingface_hub.constants.HF_HUB_OFFLINE = before


def validate_text(tmp_path, text: str, *flags: str):
    path = tmp_path / "r.yml"
    path.write_text(text)
    return run_cli("validate", path, *flags)


def assert_problems(result) -> list[str]:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if not line.startswith(("warning: ", "note: "))]
    assert re.match(r"^\d+ problem\(s\) in ", lines[0]), result.output
    assert lines[1:] and all(PROBLEM_LINE.match(line) for line in lines[1:]), result.output
    return lines[1:]


def test_every_problem_is_reported_at_once(models, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "nope"),
        "models": [
            {"model": str(models["ft1"]), "paramters": {"weight": 1}},
            {"model": str(tmp_path / "missing")},
        ],
        "dtype": "bf17",
    }
    result = validate_text(tmp_path, yaml.safe_dump(recipe))
    lines = assert_problems(result)
    text = "\n".join(lines)
    assert "dtype: unknown dtype 'bf17'" in text
    assert f"base_model: model directory not found: {tmp_path / 'nope'}" in text
    assert f"models[1].model: model directory not found: {tmp_path / 'missing'}" in text
    assert len(lines) == 3
    # mergekit ignores the misspelt key: a warning beside the problems, a problem with --strict
    warning = "models[0].paramters: unknown key 'paramters', ignored, as mergekit does; did you mean 'parameters'?"
    assert f"warning: {warning}" in result.output.splitlines()
    strict = assert_problems(validate_text(tmp_path, yaml.safe_dump(recipe), "--strict"))
    assert len(strict) == 4 and any(warning in line for line in strict)


def test_parameters_and_layer_ranges_all_reported(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "parameters": {"wieght": 1},
        "slices": [
            {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 6], "parameters": {"weigth": 1}}]},
            {"sources": [{"model": str(models["ft2"]), "layer_range": [2, 9], "parameters": {"weight": 1}}]},
        ],
    }
    result = validate_text(tmp_path, yaml.safe_dump(recipe))
    text = "\n".join(assert_problems(result))
    assert (
        "warning: parameters.wieght: unknown parameter 'wieght' for linear, ignored, as mergekit does; did you mean 'weight'?"
        in result.output
    )
    assert "warning: slices[0].sources[0].parameters.weigth: unknown parameter 'weigth' for linear" in result.output
    assert "slices[0].sources[0].layer_range: layer_range [0, 6] goes beyond the model, which has 4 layers" in text
    assert "slices[1].sources[0].layer_range: layer_range [2, 9] goes beyond the model, which has 4 layers" in text


def test_shape_mismatch_and_method_requirements(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1}}, {"model": str(models["gpt2"])}],
    }
    text = "\n".join(assert_problems(validate_text(tmp_path, yaml.safe_dump(recipe))))
    assert "models[1].model" in text or "shape mismatch" in text or "layer counts" in text
    recipe = {"merge_method": "ties", "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1}}]}
    text = "\n".join(assert_problems(validate_text(tmp_path, yaml.safe_dump(recipe))))
    assert "ties needs a base_model" in text and "add 'base_model: <model>'" in text


def test_valid_recipe_prints_plan_and_estimates(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models[k]), "parameters": {"weight": 1}} for k in ("ft1", "ft2")],
    }
    result = validate_text(tmp_path, yaml.safe_dump(recipe), "--cuda")
    assert result.exit_code == 0, result.output
    state = load_state_dict(models["ft1"])
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert f"read {2 * size / 1e9:.3f} GB, write {size / 1e9:.3f} GB" in result.output
    largest = max(t.numel() for t in state.values())
    vram = 4 * largest * 3 + 4 * largest  # two float32 inputs, the float32 result, the float32 output copy
    assert f"peak VRAM (estimate): {vram / 1e9:.3f} GB" in result.output
    assert "peak RAM (estimate)" in result.output and "disk needed" in result.output
    # run --dry-run shows the same and writes nothing
    path = tmp_path / "r.yml"
    result = run_cli("run", path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0 and "plan: linear" in result.output and "peak RAM" in result.output
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_every_problem(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models["ft1"]), "parameters": {"wieght": 1}}, {"model": str(tmp_path / "gone")}],
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, "--dry-run")
    lines = assert_problems(result)
    assert any("models[1].model" in line for line in lines)


KEYS = ["merge_method", "models", "slices", "modules", "base_model", "parameters", "model", "sources"]
KEYS += ["layer_range", "weight", "density", "t", "dtype", "filter", "value", "tokenizer", "chat_template"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["linear", "ties", "slerp", "passthrough", "./nope", "bfloat16", "x", "", "@", "a+b", "*"]),
    st.text(max_size=8),
)
STRUCTURES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=STRUCTURES)
def test_fuzz_random_yaml_structures(tmp_path, data):
    result = validate_text(tmp_path, yaml.safe_dump(data))
    assert_problems(result)


def leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))
    yield path


def corrupt(recipe, path, how):
    if not path:
        return {"merge_method": recipe} if how == "wrap" else [recipe]
    *parents, last = path
    node = recipe
    for p in parents:
        node = node[p]
    if how == "rename" and isinstance(last, str):
        node[last + "x"] = node.pop(last)
    else:
        node[last] = {"zz": [None]} if how != "wrap" else [[node[last]]]
    return recipe


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10_000), how=st.sampled_from(["rename", "junk", "wrap"]), which=st.integers(0, 2))
def test_fuzz_corrupted_real_recipes(models, tmp_path, pick, how, which):
    recipes = [
        {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": [
                {"model": str(models[k]), "parameters": {"weight": [0.2, 0.8], "density": 0.5}} for k in ("ft1", "ft2")
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        {
            "merge_method": "slerp",
            "base_model": str(models["ft1"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(models["ft1"]), "layer_range": [0, 4]},
                        {"model": str(models["ft2"]), "layer_range": [0, 4]},
                    ]
                }
            ],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
        },
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(models["ft2"]), "layer_range": [1, 4]}]},
            ],
        },
    ]
    recipe = recipes[which]
    paths = list(leaves(recipe))
    recipe = corrupt(recipe, paths[pick % len(paths)], how)
    result = validate_text(tmp_path, yaml.safe_dump(recipe))
    if result.exit_code == 0:  # a few corruptions stay valid (a gradient wrapped in a list is a filter list...)
        assert "no problems found" in result.output
        return
    assert_problems(result)
