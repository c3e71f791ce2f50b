"""Layer stacking: output layer count, config.json, and logits equal to a hand-assembled model."""

from __future__ import annotations

import json

import torch
from conftest import merge, tensors
from transformers import AutoModelForCausalLM


def test_llama_frankenmerge_loads_and_matches(models, tmp_path):
    base, ft1 = models["base"], models["ft1"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(ft1), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(merged.model.layers) == 6

    # Assemble the same model by hand: layers 0-2 of base, then layers 1-3 of ft1 renumbered 3-5;
    # embeddings from the first slice (base), final norm and lm_head from the last (ft1).
    b, f = tensors(base), tensors(ft1)
    state = {}
    for name, value in b.items():
        if ".layers." not in name and ("embed" in name):
            state[name] = value
    for name, value in f.items():
        if ".layers." not in name and "embed" not in name:
            state[name] = value
    for out_i, (src, src_i) in enumerate([(b, 0), (b, 1), (b, 2), (f, 1), (f, 2), (f, 3)]):
        for name, value in src.items():
            if f".layers.{src_i}." in name:
                state[name.replace(f".layers.{src_i}.", f".layers.{out_i}.")] = value
    ref = AutoModelForCausalLM.from_pretrained(base, num_hidden_layers=6)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits)
    # The merged model also generates.
    assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_gpt2_stacked_twice(models, tmp_path):
    g = models["gpt2"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(g), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(g), "layer_range": [0, 3]}]},
        ],
    }
    merge(recipe, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["n_layer"] == 6
    out = tensors(tmp_path / "out")
    src = tensors(g)
    for i in range(6):
        for name, value in src.items():
            if f".h.{i % 3}." in name:
                assert torch.equal(out[name.replace(f".h.{i % 3}.", f".h.{i}.")], value)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.transformer.h) == 6
    assert "lm_head.weight" not in out  # tied: written once, as the embedding
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
