"""Genotype -> recipe decoding (SPEC section 7), checked against the rules written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergesmith.errors import MergeError
from mergesmith.plan import plan_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.search.genome import Genome, GenomeDefinition
from mergesmith.sources.model import load_model_info
from mergesmith.sources.refs import parse_ref


def build(**kw: object) -> Genome:
    return Genome.build(GenomeDefinition.model_validate(kw), num_layers=4)


def test_ties_per_layer_group_with_filters_decodes_abs_and_clamped_density(models):
    g = build(
        models=[str(models["ft1"]), str(models["ft2"])],
        merge_method="ties",
        base_model=str(models["base"]),
        layer_granularity=2,
        filters=["self_attn"],
    )
    assert g.shape == (2, 2, 2, 2)  # groups, models, filters + default, (weight, density)
    x = np.arange(16, dtype=float).reshape(g.shape) / 10 - 0.7
    recipe = g.decode(x.ravel())
    assert recipe["parameters"] == {"normalize": True}  # no int8_mask: no method reads it
    assert recipe["dtype"] == "bfloat16" and recipe["base_model"] == str(models["base"])
    slices = recipe["slices"]
    assert [s["sources"][0]["layer_range"] for s in slices] == [[0, 2], [2, 4]]
    for group in range(2):
        sources = slices[group]["sources"]
        assert sources[-1] == {"model": str(models["base"]), "layer_range": [2 * group, 2 * group + 2]}
        for m in range(2):
            p = sources[m]["parameters"]
            for f, entry in enumerate(p["weight"]):
                assert entry["value"] == round(abs(x[group, m, f, 0]), 6)
                assert entry.get("filter") == ("self_attn" if f == 0 else None)
            for f, entry in enumerate(p["density"]):
                assert entry["value"] == round(min(abs(x[group, m, f, 1]), 1.0), 6)
    # the recipe is a plain recipe the planner accepts
    config = parse_config(recipe)
    infos = {k: load_model_info(parse_ref(k, "m")) for k in (str(models[n]) for n in ("base", "ft1", "ft2"))}
    assert plan_merge(config, infos).tensors


def test_smooth_gives_gradients_and_negative_weights_keep_their_sign(models):
    g = build(
        models=[str(models["ft1"]), str(models["ft2"])],
        merge_method="linear",
        layer_granularity=1,
        smooth=True,
        allow_negative_weights=True,
    )
    x = np.linspace(-1, 1, g.size)
    recipe = g.decode(x)
    w = x.reshape(g.shape)[..., 0, 0]
    for m, entry in enumerate(recipe["models"]):
        assert entry["parameters"]["weight"] == [round(v, 6) for v in w[:, m]]


def test_slerp_takes_the_two_largest_weights_per_group(models):
    names = [str(models[n]) for n in ("ft1", "ft2", "ft3")]
    g = build(models=names, merge_method="slerp", layer_granularity=4)
    recipe = g.decode(np.array([0.1, 0.9, -0.5]))
    (s,) = recipe["slices"]
    assert s["base_model"] == names[1] and [x["model"] for x in s["sources"]] == [names[1], names[2]]
    assert s["parameters"]["t"] == pytest.approx(math.exp(0.5) / (math.exp(0.9) + math.exp(0.5)), abs=1e-6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"merge_method": "passthrough"}, "no per-model weights to search"),
        ({"merge_method": "ties"}, "ties needs a base_model"),
        ({"merge_method": "linear", "layer_granularity": 3}, "layer_granularity 3 does not divide"),
    ],
)
def test_genome_errors(kw, message):
    with pytest.raises(MergeError, match=message):
        build(models=["a", "b"], **kw)


def test_search_lambda_adds_one_global_gene(models):
    g = build(
        models=[str(models["ft1"]), str(models["ft2"])],
        merge_method="task_arithmetic",
        base_model=str(models["base"]),
        search_lambda=True,
    )
    assert g.size == 2 + 1  # weight per model (task_arithmetic ignores density: no gene), plus lambda
    assert g.initial()[-1] == 1.0  # the centre of lambda's bounds [0, 2]
    recipe = g.decode(np.array([0.3, 0.6, -0.75]))
    assert recipe["parameters"]["lambda"] == 0.75
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.3, 0.6]
    with pytest.raises(MergeError, match="no 'lambda'"):
        build(models=["a", "b"], merge_method="linear", search_lambda=True)
