"""Search quality: the fitness aggregations, genes only for what a method reads, bounded CMA-ES
started at the bounds' centre, spectral/LiNeS genomes, and the search-vs-held-out report."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_search import cli_env, read_history, trio  # noqa: F401  (trio is a fixture)

from mergesmith.errors import MergeError
from mergesmith.plan import plan_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.search.fitness import aggregate
from mergesmith.search.genome import Genome, GenomeDefinition
from mergesmith.search.optimizers import CMAES
from mergesmith.sources.model import load_model_info
from mergesmith.sources.refs import parse_ref


def build(**kw: object) -> Genome:
    return Genome.build(GenomeDefinition.model_validate(kw), num_layers=4)


def test_aggregations_match_their_formulas():
    s, w = [0.9, 0.5, 0.2], [1.0, 2.0, 1.0]
    mean = (0.9 + 1.0 + 0.2) / 4
    std = math.sqrt((1 * (0.9 - mean) ** 2 + 2 * (0.5 - mean) ** 2 + 1 * (0.2 - mean) ** 2) / 4)
    assert aggregate(s, w, "weighted") == pytest.approx(0.9 + 1.0 + 0.2)
    assert aggregate(s, w, "mean") == pytest.approx(mean)
    assert aggregate(s, w, "mean_minus_std") == pytest.approx(mean - std)
    assert aggregate(s, w, "min") == pytest.approx(0.2)
    eps = 1e-3
    geo = ((0.9 + eps) * (0.5 + eps) ** 2 * (0.2 + eps)) ** (1 / 4) - eps
    assert aggregate(s, w, "geometric") == pytest.approx(geo)
    assert aggregate([-0.4], [1.0]) == pytest.approx(-0.4)  # one task: the default is the score itself
    with pytest.raises(MergeError, match="geometric.*>= 0"):
        aggregate([-0.1, 0.5], [1, 1], "geometric")


def test_the_default_does_not_let_a_task_collapse():
    collapsed, balanced, w = [1.0, 1.0, 1.0, 0.03], [0.75] * 4, [1.0] * 4
    assert aggregate(collapsed, w, "weighted") > aggregate(balanced, w, "weighted")  # the old sum's failure
    for how in ("mean_minus_std", "geometric", "min"):
        assert aggregate(balanced, w, how) > aggregate(collapsed, w, how), how


def test_unknown_fitness_is_a_clear_error(tmp_path):
    from mergesmith.search.genome import load_search_definition

    path = tmp_path / "g.yml"
    path.write_text(
        yaml.safe_dump(
            {"genome": {"models": ["a"], "merge_method": "linear"}, "tasks": [{"name": "t"}], "fitness": "median"}
        )
    )
    with pytest.raises(MergeError, match="fitness"):
        load_search_definition(path)


def test_genes_only_for_parameters_the_method_reads(models):
    fts, base = [str(models["ft1"]), str(models["ft2"])], str(models["base"])
    ta = build(models=fts, merge_method="task_arithmetic", base_model=base)
    assert ta.params == ("weight",) and ta.size == 2
    recipe = ta.decode(ta.initial())
    assert all(set(m["parameters"]) == {"weight"} for m in recipe["models"])
    assert "int8_mask" not in recipe.get("parameters", {})
    ties = build(models=fts, merge_method="ties", base_model=base)
    assert ties.params == ("weight", "density")
    with pytest.raises(MergeError, match="no per-model weights"):
        build(models=fts, merge_method="tsv", base_model=base)


def test_start_is_the_centre_of_the_bounds_and_cma_stays_inside(models):
    g = build(
        models=[str(models["ft1"]), str(models["ft2"])],
        merge_method="breadcrumbs",
        base_model=str(models["base"]),
        search_lambda=True,
    )
    lows, highs = g.bounds()
    assert g.params == ("weight", "density", "gamma")
    np.testing.assert_array_equal(lows, [0, 0, 0] * 2 + [0])
    np.testing.assert_array_equal(highs, [1, 1, 0.2] * 2 + [2])
    np.testing.assert_allclose(g.initial(), (lows + highs) / 2)
    es = CMAES(g.initial(), (lows, highs), seed=0, popsize=400)
    xs = np.array(es.ask())
    assert (xs >= lows - 1e-12).all() and (xs <= highs + 1e-12).all()
    np.testing.assert_allclose(xs.mean(axis=0), g.initial(), atol=0.06 * (highs - lows).max())
    # step 0.2 x width per gene (a little less near the bounds, where cma folds samples back)
    ratio = xs.std(axis=0) / (highs - lows)
    assert ((ratio > 0.14) & (ratio < 0.23)).all(), ratio
    signed = build(models=["a", "b"], merge_method="linear", allow_negative_weights=True)
    assert signed.bounds()[0].tolist() == [-1.0, -1.0] and signed.initial().tolist() == [0.5, 0.5]


def test_lambda_and_lines_genome_for_a_spectral_method(models):
    g = build(
        models=[str(models["ft1"]), str(models["ft2"])],
        merge_method="iso_c",
        base_model=str(models["base"]),
        search_lambda=True,
        search_lines=True,
    )
    assert g.size == 3 and g.params == ()
    recipe = g.decode(np.array([0.8, 0.25, -0.5]))
    assert recipe["parameters"] == {"lambda": 0.8}
    assert recipe["post"] == [{"lines": {"alpha": 0.25, "beta": 0.5}}]
    assert recipe["models"] == [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]
    infos = {k: load_model_info(parse_ref(k, "m")) for k in (str(models[n]) for n in ("base", "ft1", "ft2"))}
    plan = plan_merge(parse_config(recipe), infos)
    lam = {t.name: t.params["lambda"] for t in plan.tensors}
    assert lam["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.8 * 0.25)
    assert lam["model.layers.3.mlp.up_proj.weight"] == pytest.approx(0.8 * 0.75)
    with pytest.raises(MergeError, match="LiNeS"):
        build(models=["a", "b"], merge_method="linear", search_lines=True)


def test_search_through_the_console_script_reports_search_vs_held_out(trio, tmp_path, monkeypatch):  # noqa: F811
    """Two tasks (KL to two fine-tunes), a tsv genome with lambda and LiNeS genes, two paired
    held-out tasks; the report's fitness is checked against the formula on independent scores."""
    monkeypatch.setenv("MERGESMITH_TEST_HOLDOUT_TARGET", str(trio["ft2"]))
    spec = {
        "genome": {
            "models": [str(trio["ft1"]), str(trio["ft2"])],
            "merge_method": "tsv",
            "base_model": str(trio["base"]),
            "dtype": "float32",
            "search_lambda": True,
            "search_lines": True,
        },
        "tasks": [
            {"python": "search_tasks:kl_to_target", "args": {"target": str(trio["ft1"])}, "weight": 1.0},
            {"python": "search_tasks:kl_to_target", "args": {"target": str(trio["ft2"])}, "weight": 1.0},
        ],
    }
    path = tmp_path / "genome.yml"
    path.write_text(yaml.safe_dump(spec))
    store = tmp_path / "search"
    exe = shutil.which("mergesmith")
    cmd = [exe] if exe else [sys.executable, "-m", "mergesmith.cli"]
    hold = "python:search_tasks:kl_to_holdout_target"
    done = subprocess.run(
        [*cmd, "search", str(path), "--storage-path", str(store), "--max-evals", "6", "--quiet",
         "--cpus-per-worker", "1", "--holdout", hold, "--holdout", hold],
        capture_output=True, text=True, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    history = read_history(store)
    assert len(history) == 6
    for e in history:
        assert e["recipe"]["post"][0]["lines"].keys() == {"alpha", "beta"}
        assert e["fitness"] == pytest.approx(aggregate(list(e["scores"].values()), [1.0, 1.0]))
    stored = json.loads((store / "holdout.json").read_text())
    best = max(history, key=lambda e: (e["fitness"], -e["index"]))
    assert stored["index"] == best["index"] and stored["paired"] is True
    held = list(stored["holdout"].values())
    assert len(held) == 2 and held[0] == held[1]
    mean = sum(best["scores"].values()) / 2
    spread = abs(list(best["scores"].values())[0] - mean)
    assert stored["fitness"]["search"] == pytest.approx(mean - spread)
    assert stored["fitness"]["holdout"] == pytest.approx(held[0])  # equal scores: no spread
    assert stored["fitness"]["aggregation"] == "mean_minus_std"
    assert "fitness (mean_minus_std): search" in done.stdout and "held out" in done.stdout
