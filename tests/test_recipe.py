"""Parameter settings (scalars, gradients, filters) and model references, without any model."""

from __future__ import annotations

import pytest

from mergesmith.errors import MergeError
from mergesmith.recipe.settings import parse_setting, reader_for
from mergesmith.sources.refs import parse_ref


def test_scalar_and_bool_become_floats():
    assert parse_setting(3, "p").evaluate("x", 0.3) == 3.0
    assert parse_setting(True, "p").evaluate("x", 0.3) == 1.0


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)])
def test_gradient_interpolates(t, expected):
    assert parse_setting([0, 1, 0], "p").evaluate("x", t) == pytest.approx(expected)


def test_gradient_two_points():
    s = parse_setting([0.2, 0.6], "p")
    assert s.evaluate("x", 1 / 3) == pytest.approx(0.2 + 0.4 / 3)


def test_filters_first_match_substring_and_fallthrough():
    s = parse_setting([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0, 1]}], "p")
    assert s.evaluate("model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert s.evaluate("model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert s.evaluate("model.norm.weight", 0.5) is None
    star = parse_setting([{"filter": "*", "value": 2}], "p")
    assert star.evaluate("anything", 0) == 2.0


def test_bare_filter_mapping_accepted():
    s = parse_setting({"filter": "o_proj", "value": 0.0}, "p")
    assert s.evaluate("a.o_proj.weight", 0) == 0.0 and s.evaluate("a.q_proj.weight", 0) is None


def test_strings_read_as_the_declared_type_reads_them():
    """YAML 1.1 reads `1e-10` (no decimal point) as a string; mergekit's pydantic model makes it a number."""
    assert parse_setting("1e-10", "p").evaluate("x", 0) == 1e-10
    assert parse_setting(" 0.5 ", "p").evaluate("x", 0) == 0.5
    assert parse_setting(["0", "1"], "p").evaluate("x", 0.25) == pytest.approx(0.25)
    assert parse_setting([{"filter": "mlp", "value": "3"}], "p").evaluate("a.mlp.b", 0) == 3.0
    flags = [parse_setting(v, "p", reader_for(bool)).evaluate("x", 0) for v in ("true", "off", "1", False, 1)]
    assert flags == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(MergeError, match="expected true or false"):
        parse_setting("maybe", "p", reader_for(bool))


def test_unknown_keys_of_a_filtered_entry_are_skipped():
    s = parse_setting({"value": 1, "filtr": "a"}, "p")  # mergekit's model drops `filtr`: the entry matches all
    assert s.evaluate("anything", 0) == 1.0


@pytest.mark.parametrize("raw", ["x", "1e-10x", [], [1, {"value": 1}], {"filter": "a"}])
def test_bad_settings_name_the_path(raw):
    with pytest.raises(MergeError) as err:
        parse_setting(raw, "models[1].parameters.density")
    assert "models[1].parameters.density" in str(err.value)


def test_model_references():
    r = parse_ref("org/model@rev1+org/lora@rev2", "m")
    assert (r.path, r.revision, r.lora.path, r.lora.revision) == ("org/model", "rev1", "org/lora", "rev2")
    assert str(r) == "org/model@rev1+org/lora@rev2"
    m = parse_ref({"model": {"path": "a/b", "revision": "x"}, "lora": {"path": "c/d"}}, "m")
    assert str(m) == "a/b@x+c/d"
    for bad in ("a+b+c", "a@b@c", "@rev"):
        with pytest.raises(MergeError):
            parse_ref(bad, "m")
