"""What mergekit accepts, mergesmith runs: ignored keys and parameters are warnings (errors with
`--strict`), YAML 1.1 numbers are numbers, a base+LoRA merges alone, any model may give the tokenizer."""

from __future__ import annotations

import json

import torch
from conftest import merge, run_cli, tensors
from lora_adapters import build_adapter

from mergesmith.toymodels import load_state_dict

QUIRKY = """\
merge_method: dare_ties
base_model: {base}
int8_mask: true          # misplaced: it belongs under parameters
dype: float32            # misspelt
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft1}
        layer_range: [0, 4]
        revision: dpo-v0   # mergekit reads no such key
        parameters:
          weight: "0.6"
          density: 0.5
          int_space: "cs"  # not a parameter of dare_ties
      - model: {ft2}
        layer_range: [0, 4]
        parameters:
          weight: 0.4
          desnity: 0.3     # misspelt: mergekit merges at density 1
parameters:
  normalize: 'true'
  int8_mask: true
"""

CLEAN = """\
merge_method: dare_ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft1}
        layer_range: [0, 4]
        parameters:
          weight: 0.6
          density: 0.5
      - model: {ft2}
        layer_range: [0, 4]
        parameters:
          weight: 0.4
parameters:
  normalize: true
"""

EXPECTED = [
    "int8_mask: unknown key 'int8_mask', ignored, as mergekit does; 'int8_mask' is a merge parameter: put it under"
    " 'parameters'",
    "dype: unknown key 'dype', ignored, as mergekit does; did you mean 'dtype'?",
    "slices[0].sources[1].revision: unknown key 'revision', ignored, as mergekit does; a revision goes in the model"
    " reference: 'model: NAME@REVISION'",
    "slices[0].sources[1].parameters.int_space: unknown parameter 'int_space' for dare_ties, ignored, as mergekit"
    " does (dare_ties takes: weight, density, normalize, rescale, lambda, int8_mask)",
    "slices[0].sources[2].parameters.desnity: unknown parameter 'desnity' for dare_ties, ignored, as mergekit does;"
    " did you mean 'density'?",
]


def write(tmp_path, name, text, models):
    path = tmp_path / name
    path.write_text(text.format(**{k: models[k] for k in ("base", "ft1", "ft2")}))
    return path


def test_published_quirks_run_with_one_warning_each_and_mergekits_tensors(models, tmp_path):
    quirky = write(tmp_path, "quirky.yml", QUIRKY, models)
    result = run_cli("run", quirky, tmp_path / "quirky", "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line.removeprefix("WARNING: ") for line in result.output.splitlines() if line.startswith("WARNING: ")]
    assert warnings == EXPECTED
    merge(write(tmp_path, "clean.yml", CLEAN, models).read_text(), tmp_path / "clean")
    a, b = tensors(tmp_path / "quirky"), tensors(tmp_path / "clean")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    listed = run_cli("validate", quirky)  # validate lists the same lines and passes
    assert listed.exit_code == 0, listed.output
    assert [line for line in listed.output.splitlines() if line.startswith("warning: ")] == [
        f"warning: {w}" for w in EXPECTED
    ]
    assert "note: parameters.int8_mask" not in listed.output  # storage-only: shown with -v only
    assert "note: parameters.int8_mask: 'int8_mask' has no effect here" in run_cli("validate", quirky, "-v").output
    strict = run_cli("validate", quirky, "--strict")
    assert strict.exit_code == 2 and "5 problem(s)" in strict.output


def test_strict_stops_before_any_model_is_opened(models, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {tmp_path / 'not-there'}\n    parameters: {{weight: 1, desnity: 0.5}}\n"
    )
    result = run_cli("run", recipe, tmp_path / "out", "--strict")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert "--strict: 1 key(s) or parameter(s) would be ignored" in result.output
    assert "models[0].parameters.desnity" in result.output and "did you mean 'density'?" in result.output
    assert "model directory not found" not in result.output  # nothing was opened
    lenient = run_cli("run", recipe, tmp_path / "out")  # without --strict the missing model is the error
    assert lenient.exit_code == 2 and "model directory not found" in lenient.output


def test_yaml_11_numbers_are_numbers(models, tmp_path):
    """`tol: 1e-10` loads as a string under YAML 1.1 (PyYAML); every karcher recipe in the corpus has it."""
    body = "merge_method: karcher\nmodels:\n" + "".join(f"  - model: {models[k]}\n" for k in ("ft1", "ft2", "ft3"))
    merge(body + "parameters:\n  max_iter: '20'\n  tol: 1e-10\n", tmp_path / "string")
    merge(body + "parameters:\n  max_iter: 20\n  tol: 1.0e-10\n", tmp_path / "float")
    a, b = tensors(tmp_path / "string"), tensors(tmp_path / "float")
    assert all(torch.equal(a[n], b[n]) for n in a)
    bad = tmp_path / "bad.yml"
    bad.write_text(body + "parameters:\n  tol: small\n")
    result = run_cli("run", bad, tmp_path / "bad", "--quiet")
    assert result.exit_code == 2 and "parameters.tol: expected a number, got 'small'" in result.output


def test_a_lora_applied_alone_writes_base_plus_lora(models, tmp_path):
    """'Lorablation': the only source is base+adapter, the method task_arithmetic: the output is base + B A s."""
    adapter = tmp_path / "adapter"
    want = build_adapter(models["base"], adapter, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ref = f"{models['base']}+{adapter}"
    recipe = (
        f"base_model: {ref}\ndtype: float32\nmerge_method: task_arithmetic\nparameters:\n  normalize: false\n"
        f"slices:\n- sources:\n  - layer_range: [0, 4]\n    model: {ref}\n    parameters:\n      weight: 1.0\n"
    )
    merge(recipe, tmp_path / "out")
    got = tensors(tmp_path / "out")
    base = load_state_dict(models["base"])
    assert got.keys() == base.keys()
    changed = [n for n in got if not torch.equal(got[n], base[n])]
    assert changed and all(("q_proj" in n or "down_proj" in n) for n in changed)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6)


def test_tokenizer_source_may_be_a_model_that_is_not_merged(models, tmp_path):
    from mergesmith.toymodels import make_vocab_variant

    other = make_vocab_variant(models["base"], tmp_path / "chat", seed=7, added=("<|im_start|>", "<|im_end|>"))
    recipe = (
        f"merge_method: linear\ntokenizer_source: {other}\nmodels:\n"
        f"  - model: {models['ft1']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['ft2']}\n    parameters: {{weight: 1}}\n"
    )
    merge(recipe, tmp_path / "out")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert vocab == Tokenizer.from_file(str(other / "tokenizer.json")).get_vocab(with_added_tokens=True)
    got = tensors(tmp_path / "out")
    a, b = load_state_dict(models["ft1"]), load_state_dict(models["ft2"])
    embed = "model.embed_tokens.weight"
    n = a[embed].shape[0]
    assert got[embed].shape[0] == n + 2  # the source's two added tokens: no merged model has them
    torch.testing.assert_close(got[embed][:n], (a[embed] + b[embed]) / 2)
    assert torch.equal(got[embed][n:], torch.zeros(2, a[embed].shape[1]))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == n + 2


def test_storage_only_parameters_come_from_the_declarations() -> None:
    """`int8_mask` is a note because the task-vector methods declare it storage-only, not by name."""
    import pytest

    from mergesmith.methods.registry import METHODS, get_method, merge_method
    from mergesmith.recipe.leniency import storage_only

    get_method("ties")  # registers every method
    declaring = sorted(n for n, m in METHODS.items() if "int8_mask" in m.storage_only)
    for name in ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce"):
        assert name in declaring
        assert "int8_mask" in METHODS[name].params  # still accepted, still shown by `mergesmith methods`
    assert set(storage_only()) == {"int8_mask"}
    with pytest.raises(TypeError, match="undeclared"):

        @merge_method("storage_only_probe", summary="x", storage_only={"int8_mask": "why"})
        def probe(xs: list, *, weight: float = 1.0) -> None:  # declares no int8_mask
            return None

    assert "storage_only_probe" not in METHODS
