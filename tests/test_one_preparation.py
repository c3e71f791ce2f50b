"""Every command that merges prepares through `prepare_merge` (issue #18, item 1): search's in-memory
merges and `eval` of a `base+adapter` reference hold exactly the tensors `mergesmith run` writes, with
the same options (LoRA merge dtype and cache), instead of loading models their own way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import merge, run_cli, tensors
from lora_adapters import build_adapter

from mergesmith.preparation import MergeOptions
from mergesmith.search.inmemory import InMemoryMerger


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "lora"
    build_adapter(models["base"], out, seed=4, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    return out


def test_in_memory_merge_of_an_adapter_uses_runs_options(
    models: dict[str, Path], adapter: Path, tmp_path: Path
) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": f"{models['base']}+{adapter}", "parameters": {"weight": 0.6}},
            {"model": str(models["ft1"]), "parameters": {"weight": 0.4}},
        ],
    }
    file_cache = tmp_path / "file-cache"
    merge(recipe, tmp_path / "full", "--lora-merge-dtype", "bfloat16", "--lora-merge-cache", str(file_cache))
    written = tensors(tmp_path / "full")

    cache = tmp_path / "cache"
    merger = InMemoryMerger(recipe, [], options=MergeOptions(lora_merge_dtype="bfloat16", lora_merge_cache=str(cache)))
    merger.load_weights(recipe)
    resident = merger.model.state_dict()
    for name, value in written.items():
        torch.testing.assert_close(resident[name], value, rtol=0, atol=0, msg=name)
    (entry,) = list(cache.iterdir())  # the LoRA cache option reached the in-memory preparation
    assert {t.dtype for t in tensors(entry).values()} == {torch.bfloat16}

    plain = InMemoryMerger(recipe, [])  # without the option the adapter is folded in float32: other values
    plain.load_weights(recipe)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain.model.state_dict()[q], resident[q])


def test_eval_of_base_plus_adapter_is_runs_merge(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    from mergesmith.eval import load_model

    ref = f"{models['base']}+{adapter}"
    merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "out")
    written = tensors(tmp_path / "out")
    model, _ = load_model(ref)
    state = model.state_dict()
    for name, value in written.items():
        assert torch.equal(state[name], value), name
    base = tensors(models["base"])
    assert not torch.equal(written["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


def test_search_cli_takes_the_lora_options(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    import yaml

    tasks = tmp_path / "task.jsonl"
    tasks.write_text('{"prompt": "a b", "answer": " c"}\n')
    genome = {
        "genome": {
            "models": [f"{models['base']}+{adapter}", str(models["ft1"])],
            "merge_method": "linear",
            "layer_granularity": 0,
        },
        "tasks": [{"path": str(tasks)}],
    }
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    cache = tmp_path / "cache"
    result = run_cli(
        "search", tmp_path / "genome.yml", "--storage-path", tmp_path / "search", "--max-evals", "2", "--quiet",
        "--lora-merge-cache", cache, "--lora-merge-dtype", "bfloat16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (entry,) = list(cache.iterdir())
    assert (entry / "model.safetensors").exists()
