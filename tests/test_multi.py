"""Multi-stage recipes: order, reuse, rewriting only model references, errors before anything runs."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import merge, run_cli, tensors

from mergesmith.errors import MergeError
from mergesmith.multi import parse_multi
from mergesmith.output import card
from mergesmith.recipe.leniency import check_recipe

TEMPLATE = "{% for m in messages %}{{ m['role'] + '@' + m['content'] + '@@' }}{% endfor %}+{{ 'a+b+c' }}"


def stages_text(models, final_name=None):
    """Three stages: `linear` = linear(ft1, ft2); `mix` = slerp(base, linear); final = ties over both."""
    b, f1, f2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    docs = [
        {
            "name": "mix",  # listed first but depends on `linear`: dependency order must run it second
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": "linear"}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        {
            "name": "linear",  # a stage named like a merge method
            "merge_method": "linear",
            "models": [{"model": f1, "parameters": {"weight": 0.7}}, {"model": f2, "parameters": {"weight": 0.3}}],
            "dtype": "float32",
        },
        {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": "linear", "parameters": {"weight": 0.5, "density": 0.6}},
                {"model": "mix", "parameters": {"weight": 0.8, "density": 0.4}},
            ],
            "dtype": "float32",
            "chat_template": TEMPLATE,
        },
    ]
    if final_name:
        docs[2]["name"] = final_name
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def test_three_stages_equal_hand_run_and_reuse(models, tmp_path):
    recipe = tmp_path / "stages.yml"
    recipe.write_text(stages_text(models))
    inter, out = tmp_path / "inter", tmp_path / "final"
    result = run_cli("multi", recipe, "-I", inter, "--out-path", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "3 stage(s) merged, 0 reused" in result.output

    # The same three recipes by hand, each stage's output fed to the next by its path.
    b, f1, f2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    hand = tmp_path / "hand"
    hand.mkdir()
    docs = list(yaml.safe_load_all(stages_text(models)))
    docs[1].pop("name")
    merge(docs[1], hand / "linear")
    docs[0].pop("name")
    docs[0]["models"][1]["model"] = str(hand / "linear")
    merge(docs[0], hand / "mix")
    docs[2]["models"][0]["model"] = str(hand / "linear")
    docs[2]["models"][1]["model"] = str(hand / "mix")
    merge(docs[2], hand / "final")
    got, want = tensors(out), tensors(hand / "final")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # And the hand run is what the formulas say for one tensor (linear then slerp then ties inputs).
    lin = tensors(hand / "linear")["model.norm.weight"]
    x1, x2 = tensors(models["ft1"])["model.norm.weight"], tensors(models["ft2"])["model.norm.weight"]
    torch.testing.assert_close(lin, 0.7 * x1 + 0.3 * x2)

    # The literal chat template with several '+' and '@' survived, and no method name was rewritten.
    tok_cfg = (out / "tokenizer_config.json").read_text() + (
        (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists() else ""
    )
    assert "'a+b+c'" in tok_cfg
    stage_recipe = yaml.safe_load((inter / "linear" / "mergesmith_config.yml").read_text())
    assert stage_recipe["merge_method"] == "linear"
    final_recipe = yaml.safe_load((out / "mergesmith_config.yml").read_text())
    assert final_recipe["chat_template"] == TEMPLATE
    assert final_recipe["models"][0]["model"] == str((inter / "linear").resolve())

    # Second run: every stage is reused (no file rewritten), the final one too.
    mtimes = {p: p.stat().st_mtime_ns for p in [*inter.rglob("*"), *out.rglob("*")] if p.is_file()}
    result = run_cli("multi", recipe, "-I", inter, "--out-path", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "0 stage(s) merged, 3 reused" in result.output
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # A stage with a broken output is rebuilt, and so is everything that reads it.
    (inter / "mix" / "config.json").unlink()
    result = run_cli("multi", recipe, "-I", inter, "--out-path", out, "--dry-run")
    lines = result.output.splitlines()
    assert lines[0].startswith("skip linear") and lines[1].startswith("run  mix") and lines[2].startswith("run  final")
    result = run_cli("multi", recipe, "-I", inter, "--out-path", out, "--quiet")
    assert "2 stage(s) merged, 1 reused" in result.output, result.output
    assert (inter / "linear" / "model.safetensors").stat().st_mtime_ns == mtimes[inter / "linear" / "model.safetensors"]
    assert all(torch.equal(v, want[k]) for k, v in tensors(out).items())

    # --no-lazy rebuilds everything.
    result = run_cli("multi", recipe, "-I", inter, "--out-path", out, "--quiet", "--no-lazy")
    assert "3 stage(s) merged, 0 reused" in result.output, result.output

    # The final card: front matter parses, lists no hub id (all inputs are local), shows the stage graph.
    text = (out / "README.md").read_text()
    front = card.front_matter(text)
    assert front["tags"] == ["merge", "mergesmith"] and "base_model" not in front
    assert "### Stages" in text and "**linear**" in text and "**mix**" in text and "```mermaid" in text
    assert "name: linear" in text  # the whole multi-document recipe


def test_named_final_and_order(models, tmp_path):
    multi = parse_multi(stages_text(models, final_name="last"), "s.yml", tmp_path / "i", None)
    assert [s.name for s in multi.stages] == ["linear", "mix", "last"]
    assert multi.stages[2].depends == {"linear": "models[0].model", "mix": "models[1].model"}
    with pytest.raises(MergeError, match="--out-path is for the unnamed"):
        parse_multi(stages_text(models, final_name="last"), "s.yml", tmp_path / "i", tmp_path / "o")
    with pytest.raises(MergeError, match="give --out-path"):
        parse_multi(stages_text(models), "s.yml", tmp_path / "i", None)


def test_only_model_references_are_rewritten(tmp_path):
    text = (
        yaml.safe_dump(
            {
                "name": "slerp",
                "merge_method": "linear",
                "models": [{"model": "org/a"}, {"model": "org/b"}],
            }
        )
        + "---\n"
        + yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": "slerp",
                "slices": [
                    {
                        "sources": [
                            {"model": "slerp", "layer_range": [0, 2]},
                            {"model": {"model": {"path": "slerp"}}, "layer_range": [0, 2]},
                        ]
                    }
                ],
                "parameters": {"t": 0.5},
                "tokenizer_source": "slerp",
                "input_model_parameters": {"slerp": {"t": 0.2}},
                "chat_template": "slerp+x@y+z@w {{ slerp }}",
            }
        )
    )
    multi = parse_multi(text, "s.yml", tmp_path, tmp_path / "out")
    final = multi.stages[-1].recipe
    d = str(tmp_path.resolve() / "slerp")
    assert final["merge_method"] == "slerp"
    assert final["base_model"] == d and final["tokenizer_source"] == d
    assert final["slices"][0]["sources"][0]["model"] == d
    assert final["slices"][0]["sources"][1]["model"] == {"model": {"path": d}}
    assert final["input_model_parameters"] == {d: {"t": 0.2}}
    assert final["chat_template"] == "slerp+x@y+z@w {{ slerp }}"


def two_docs(first: dict, second: dict) -> str:
    return yaml.safe_dump(first) + "---\n" + yaml.safe_dump(second)


def test_cycle_reported_with_document_and_key(tmp_path):
    a = {"name": "a", "merge_method": "linear", "models": [{"model": "org/x"}, {"model": "b"}]}
    b = {"name": "b", "merge_method": "linear", "models": [{"model": "a"}, {"model": "org/y"}]}
    with pytest.raises(MergeError) as err:
        parse_multi(two_docs(a, b), "s.yml", tmp_path, None)
    msg = str(err.value)
    assert "cycle: a -> b -> a" in msg and "document 2 ('b') models[0].model" in msg


def test_self_reference_is_a_cycle(tmp_path):
    a = {"name": "a", "merge_method": "linear", "models": [{"model": "org/x"}, {"model": "a"}]}
    with pytest.raises(MergeError, match="cycle: a -> a"):
        parse_multi(yaml.safe_dump(a), "s.yml", tmp_path, None)


def test_unknown_stage_and_nothing_runs(models, tmp_path):
    a = {"name": "stage_a", "merge_method": "linear", "models": [{"model": str(models["ft1"])}]}
    final = {"merge_method": "linear", "models": [{"model": "stage_a"}, {"model": "stage_b"}]}
    recipe = tmp_path / "s.yml"
    recipe.write_text(two_docs(a, final))
    result = run_cli("multi", recipe, "-I", tmp_path / "inter", "--out-path", tmp_path / "out")
    assert result.exit_code == 2
    assert "document 2 (unnamed) models[1].model: unknown stage 'stage_b'; did you mean 'stage_a'?" in result.output
    assert not (tmp_path / "inter").exists() and not (tmp_path / "out").exists()


def test_document_errors(tmp_path):
    a = {"name": "a", "merge_method": "linear", "models": [{"model": "org/x"}]}
    with pytest.raises(MergeError, match="used twice"):
        parse_multi(two_docs(a, a), "s.yml", tmp_path, None)
    u = {"merge_method": "linear", "models": [{"model": "org/x"}]}
    with pytest.raises(MergeError, match="only the final recipe may be unnamed"):
        parse_multi(two_docs(u, u), "s.yml", tmp_path, tmp_path / "o")
    bad = {"name": "b", "merge_method": "linear", "models": [{"model": "a"}], "paramters": {}}
    stages = parse_multi(two_docs(a, bad), "s.yml", tmp_path, None).stages  # mergekit ignores the key
    assert [f.line() for f in check_recipe(stages[1].config)] == [
        "paramters: unknown key 'paramters', ignored, as mergekit does; did you mean 'parameters'?"
    ]
