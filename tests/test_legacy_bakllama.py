"""mergekit-legacy command lines and bakllama configs: the recipes they build and the tensors they give."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import run_cli, tensors
from formulas import slerp, task_vectors

from mergesmith.toymodels import make_base


def test_legacy_ties_recipe_and_values(models, tmp_path):
    b, f1, f2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    out = tmp_path / "out"
    args = ["legacy", out, "--base-model", b, "--merge", f1, "--merge", f2, "--weight", "0.6", "--weight", "0.4"]
    result = run_cli(*args, "--density", "0.5", "--no-bf16", "--print-yaml", "--quiet")
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(result.output.split("merged in")[0])
    assert recipe == {
        "merge_method": "ties",
        "base_model": b,
        "models": [
            {"model": f1, "parameters": {"density": 0.5, "weight": 0.6}},
            {"model": f2, "parameters": {"density": 0.5, "weight": 0.4}},
            {"model": b, "parameters": {"density": 0.5}},
        ],
        "parameters": {"normalize": True},
    }
    y, base, x1, x2 = tensors(out), tensors(b), tensors(f1), tensors(f2)
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        want = task_vectors(base[name], [x1[name], x2[name]], [0.6, 0.4], [0.5, 0.5], consensus=True, normalize=True)
        torch.testing.assert_close(y[name].double(), want, rtol=1e-5, atol=1e-6)


def test_legacy_slerp_single_weight_is_t_and_bf16_default(models, tmp_path):
    b, f1 = str(models["base"]), str(models["ft1"])
    out = tmp_path / "out"
    result = run_cli("legacy", out, "--method", "slerp", "--base-model", b, "--merge", f1, "--weight", "0.25")
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((out / "mergesmith_config.yml").read_text())
    assert recipe == {
        "merge_method": "slerp",
        "base_model": b,
        "models": [{"model": f1}, {"model": b}],
        "parameters": {"t": 0.25},
        "dtype": "bfloat16",
    }
    name = "model.layers.0.self_attn.q_proj.weight"
    y = tensors(out)[name]
    assert y.dtype == torch.bfloat16
    want = slerp(0.25, tensors(b)[name], tensors(f1)[name]).to(torch.bfloat16)
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-3)
    # Two weights for slerp are refused with a clear message.
    bad = run_cli("legacy", tmp_path / "x", "--method", "slerp", "--merge", f1, "--weight", "0.1", "--weight", "0.2")
    assert bad.exit_code == 2 and "slerp takes exactly one --weight" in bad.output


def test_legacy_print_only(models, tmp_path):
    f1, f2 = str(models["ft1"]), str(models["ft2"])
    result = run_cli(
        "legacy", tmp_path / "o", "--method", "linear", "--merge", f1, "--merge", f2, "--print-yaml", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == {
        "merge_method": "linear",
        "models": [{"model": f1}, {"model": f2}],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    assert not (tmp_path / "o").exists()


def test_bakllama_recipe_scale_and_sources(models, tmp_path):
    b, f1, f2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    config = {
        "layer_slices": [
            {"model": b, "start": 0, "end": 2},
            {"model": f1, "start": 1, "end": 4, "scale": 0.5},
        ],
        "embedding_source": f2,
        "lm_head_source": f2,
    }
    path = tmp_path / "bak.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("bakllama", path, out, "--print-yaml")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output.split("merged in")[0])
    assert printed == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}]},
            {"sources": [{"model": f1, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]},
        ],
    }
    y, base, x1, x2 = tensors(out), tensors(b), tensors(f1), tensors(f2)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    for out_i, (src, src_i, scale) in enumerate([(base, 0, 1), (base, 1, 1), (x1, 1, 0.5), (x1, 2, 0.5), (x1, 3, 0.5)]):
        name = "model.layers.{}.mlp.down_proj.weight"
        torch.testing.assert_close(y[name.format(out_i)], src[name.format(src_i)] * scale)
    # Honoured: embeddings and lm_head from ft2, unscaled; the final norm from the last slice (scaled).
    assert torch.equal(y["model.embed_tokens.weight"], x2["model.embed_tokens.weight"])
    assert torch.equal(y["lm_head.weight"], x2["lm_head.weight"])
    torch.testing.assert_close(y["model.norm.weight"], x1["model.norm.weight"] * 0.5)


def test_bakllama_without_sources_is_plain_passthrough(models, tmp_path):
    b = str(models["base"])
    path = tmp_path / "bak.yml"
    path.write_text(yaml.safe_dump({"layer_slices": [{"model": b, "start": 0, "end": 2}] * 2}))
    out = tmp_path / "out"
    assert run_cli("bakllama", path, out).exit_code == 0
    y, x = tensors(out), tensors(b)
    assert torch.equal(y["model.layers.3.self_attn.k_proj.weight"], x["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(y["lm_head.weight"], x["lm_head.weight"])


def test_bakllama_lm_head_from_tied_model(models, tmp_path):
    tied = make_base(tmp_path / "tied", layers=4, hidden=32, vocab=96, seed=9, tie=True)
    b = str(models["base"])
    path = tmp_path / "bak.yml"
    path.write_text(yaml.safe_dump({"layer_slices": [{"model": b, "start": 0, "end": 4}], "lm_head_source": str(tied)}))
    out = tmp_path / "out"
    assert run_cli("bakllama", path, out).exit_code == 0
    assert torch.equal(tensors(out)["lm_head.weight"], tensors(tied)["model.embed_tokens.weight"])
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"layer_slices": [{"model": b, "start": 0, "end": 4}], "embeding_source": b}))
    result = run_cli("bakllama", bad, tmp_path / "x")
    assert result.exit_code == 2 and "did you mean 'embedding_source'" in result.output
