"""The audit (merge_report.json, NaN/Inf scan, input accounting), `mergesmith verify` and determinism."""

from __future__ import annotations

import hashlib
import json
import shutil

import torch
from conftest import merge, run_cli

from mergesmith.sources import arch
from mergesmith.toymodels import load_state_dict, save_state_dict


def report(out):
    return json.loads((out / "merge_report.json").read_text())


def write_recipe(tmp_path, recipe):
    import yaml

    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*dirs):
    return {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}


def test_frankenmerge_accounts_for_every_input_tensor(models, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(models["ft2"]), "layer_range": [1, 4]}]},
        ],
    }
    result = merge(recipe, tmp_path / "out")
    inputs = report(tmp_path / "out")["inputs"]
    for key, layers, pre in ((str(models["ft1"]), {0, 1}, True), (str(models["ft2"]), {1, 2, 3}, False)):
        names = list(load_state_dict(key))
        used = [
            n
            for n in names
            if (p := arch.parse_layer_name(n)) is not None
            and p.index in layers
            or p is None
            and arch.is_pre_weight(n) == pre
        ]
        entry = inputs[key]
        assert entry["copied"] == len(used) and entry["merged"] == 0
        assert set(entry["dropped"]) == set(names) - set(used)
        assert entry["copied"] + len(entry["dropped"]) == len(names)
    assert (
        "layer 3 is outside the layer ranges"
        in inputs[str(models["ft1"])]["dropped"]["model.layers.3.mlp.up_proj.weight"]
    )
    assert "takes it from" in inputs[str(models["ft2"])]["dropped"]["model.embed_tokens.weight"]
    assert "input tensors: 0 merged, 48 copied, 30 dropped" in result.output


def test_report_of_a_plain_merge(models, tmp_path):
    merge(linear(models["ft1"], models["ft2"]), tmp_path / "out", "--random-seed", "7")
    data = report(tmp_path / "out")
    n = len(load_state_dict(models["ft1"]))
    assert data["audit"] == {"output_tensors": n, "checked_finite": n, "nonfinite": {}, "config_problems": []}
    assert all(v["merged"] == n and v["dropped"] == {} for v in data["inputs"].values())
    assert data["seed"] == 7 and data["versions"]["torch"] == torch.__version__


def nan_model(models, tmp_path):
    bad = tmp_path / "nanmodel"
    shutil.copytree(models["ft1"], bad)
    state = load_state_dict(bad)
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    state["model.layers.1.mlp.up_proj.weight"][5, 6] = float("inf")
    (bad / "model.safetensors").unlink()
    save_state_dict(bad, state)
    return bad


def test_nonfinite_output_fails_by_default(models, tmp_path):
    path = write_recipe(tmp_path, linear(models["ft1"], nan_model(models, tmp_path)))
    result = run_cli("run", path, tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    numel = load_state_dict(models["ft1"])["model.layers.1.mlp.up_proj.weight"].numel()
    assert f"tensor model.layers.1.mlp.up_proj.weight: 2 of {numel} values are NaN or Inf" in result.output
    assert "--allow-nonfinite" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_allow_nonfinite_keeps_going_and_verify_flags_it(models, tmp_path):
    path = write_recipe(tmp_path, linear(models["ft1"], nan_model(models, tmp_path)))
    result = run_cli("run", path, tmp_path / "out", "--quiet", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "1 with NaN/Inf" in result.output
    assert report(tmp_path / "out")["audit"]["nonfinite"] == {"model.layers.1.mlp.up_proj.weight": 2}
    result = run_cli("verify", tmp_path / "out")
    assert result.exit_code == 2 and "tensor model.layers.1.mlp.up_proj.weight has 2 NaN/Inf values" in result.output


def test_verify_a_good_merge_and_load_it(models, tmp_path):
    merge(linear(models["ft1"], models["ft2"]), tmp_path / "out", "--out-shard-size", "20k")
    result = run_cli("verify", tmp_path / "out", "--load")
    assert result.exit_code == 0, result.output
    assert "ok: " in result.output and "ran a forward pass" in result.output


def test_verify_finds_damage(models, tmp_path):
    out = tmp_path / "out"
    merge(linear(models["ft1"], models["ft2"]), out, "--out-shard-size", "20k")
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 7
    config["vocab_size"] = 100
    (out / "config.json").write_text(json.dumps(config))
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = run_cli("verify", out)
    assert result.exit_code == 2
    assert "config.json num_hidden_layers is 7 but the weights have 4 layers" in result.output
    assert "vocab_size is 100 but model.embed_tokens.weight has 96 rows" in result.output
    assert f"{shard}: named in the index but missing" in result.output
    assert "is in the index but in no file" in result.output


def test_verify_finds_truncated_shard(models, tmp_path):
    out = tmp_path / "out"
    merge(linear(models["ft1"], models["ft2"]), out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_cli("verify", out)
    assert result.exit_code == 2 and "truncated safetensors file" in result.output


def all_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_inputs_recipe_and_seed_give_byte_identical_files(models, tmp_path):
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.4}} for k in ("ft1", "ft2")],
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    merge(recipe, tmp_path / "a" / "out", "--random-seed", "5", "--out-shard-size", "20k")
    merge(recipe, tmp_path / "b" / "out", "--random-seed", "5", "--out-shard-size", "20k")
    a, b = all_hashes(tmp_path / "a" / "out"), all_hashes(tmp_path / "b" / "out")
    assert {"README.md", "config.json", "model.safetensors.index.json", "merge_report.json"} <= set(a)
    assert a == b
