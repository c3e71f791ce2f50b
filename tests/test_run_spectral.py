"""tsv, iso_c, iso_cts and the LiNeS post-step from YAML, through the `mergesmith` console script,
against the float64 references of tests/methods/test_spectral.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tensors
from formulas import f64

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from test_spectral import ref_iso_c, ref_iso_cts, ref_tsv  # noqa: E402

from mergesmith.sources.arch import parse_layer_name  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def mergesmith(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mergesmith")
    cmd = [exe] if exe else [sys.executable, "-m", "mergesmith.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env)


def run_recipe(recipe: dict, out: Path) -> None:
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = mergesmith("run", path, out, "--quiet")
    assert done.returncode == 0, done.stderr


def recipe(models, method, keys=("ft1", "ft2", "ft3"), **extra):
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k])} for k in keys],
        "dtype": "float32",
        **extra,
    }


def check(out: Path, expected_fn) -> None:
    for name, y in tensors(out).items():
        torch.testing.assert_close(f64(y), expected_fn(name).reshape(y.shape), rtol=1e-4, atol=2e-5, msg=name)


def test_spectral_methods_from_yaml(models, tmp_path):
    b, a1, a2, a3 = (tensors(models[k]) for k in ("base", "ft1", "ft2", "ft3"))
    run_recipe(recipe(models, "tsv", parameters={"lambda": 0.8}), tmp_path / "tsv")
    check(tmp_path / "tsv", lambda n: ref_tsv(b[n], [a1[n], a2[n], a3[n]], lam=0.8))
    run_recipe(recipe(models, "iso_c", keys=("ft1", "ft2")), tmp_path / "iso_c")
    check(tmp_path / "iso_c", lambda n: ref_iso_c(b[n], [a1[n], a2[n]]))
    run_recipe(recipe(models, "iso_cts", parameters={"common_fraction": 0.5}), tmp_path / "iso_cts")
    check(tmp_path / "iso_cts", lambda n: ref_iso_cts(b[n], [a1[n], a2[n], a3[n]], 0.5))


def lines_scale(name: str, alpha: float, beta: float, n_layers: int = 4) -> float:
    """LiNeS, written from the paper: alpha + beta * l / (L - 1) in layer l, alpha outside the layers."""
    p = parse_layer_name(name)
    return alpha if p is None else alpha + beta * p.index / (n_layers - 1)


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c"])
def test_lines_post_step_scales_the_merged_task_vector_by_depth(models, tmp_path, method):
    weights = {"weight": 0.5} if method == "task_arithmetic" else {}
    r = recipe(models, method, keys=("ft1", "ft2"), parameters={"lambda": 0.9, **weights})
    plain, scaled = tmp_path / "plain", tmp_path / "lines"
    run_recipe(r, plain)
    run_recipe({**r, "post": [{"lines": {"alpha": 0.2, "beta": 0.6}}]}, scaled)
    b, y = tensors(models["base"]), tensors(plain)
    check(scaled, lambda n: f64(b[n]) + lines_scale(n, 0.2, 0.6) * (f64(y[n]) - f64(b[n])))
    assert (
        tensors(scaled)["model.layers.0.mlp.up_proj.weight"].sub(b["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0
    )


@pytest.mark.parametrize(
    ("post", "method", "phrase"),
    [
        ([{"lines": {"alpha": 0.5}}], "task_arithmetic", "post[0].lines.beta"),
        ([{"linez": {"alpha": 0.5, "beta": 0.5}}], "task_arithmetic", "did you mean 'lines'"),
        ([{"lines": {"alpha": 0.5, "beta": 0.5}}], "slerp", "slerp has none"),
        (["lines"], "task_arithmetic", "post[0]"),
    ],
)
def test_bad_post_steps_are_clear_errors(models, tmp_path, post, method, phrase):
    params = {"weight": 0.5} if method == "task_arithmetic" else {"t": 0.5}
    r = {**recipe(models, method, keys=("ft1",), parameters=params), "post": post}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(r))
    done = mergesmith("run", path, tmp_path / "out", "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert phrase in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
