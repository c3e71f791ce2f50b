"""Output files: shards and index, model card, config, determinism, inputs in every format."""

from __future__ import annotations

import hashlib
import json

import torch
import yaml
from conftest import merge, tensors
from safetensors import safe_open

from mergesmith.engine.executor import Executor
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.sources.reader import TensorReader


def linear_recipe(models, *keys):
    return {
        "merge_method": "linear",
        "models": [{"model": str(models[k]), "parameters": {"weight": 1.0}} for k in keys],
    }


def test_sharding_and_index(models, tmp_path):
    merge(linear_recipe(models, "ft1", "ft2"), tmp_path / "out", "--out-shard-size", "20k")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    total = 0
    for file in files:
        with safe_open(out / file, "pt") as f:
            names = list(f.keys())
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names]
        # mergekit's rule: a shard is closed before a tensor that would push it past the limit.
        assert sum(sizes) <= 20_000 or len(names) == 1
        assert all(index["weight_map"][k] == file for k in names)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors(models["ft1"]))
    assert not list(out.glob("*.partial")) and not list(tmp_path.glob(".*partial"))


def test_no_sync_writes_the_same_bytes_through_the_page_cache(models, tmp_path, monkeypatch):
    """`run --no-sync`: the same files, written without direct I/O and without an fsync (mergekit's way:
    done once the page cache has them); the default syncs every shard it writes."""
    import os

    from mergesmith.output import shards

    synced, direct = [], []
    real_fsync, real_direct = os.fsync, shards._open_direct
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(shards, "_open_direct", lambda path: (direct.append(path), real_direct(path))[1])
    recipe = linear_recipe(models, "ft1", "ft2")
    merge(recipe, tmp_path / "synced", "--out-shard-size", "20k")
    shard_files = len(list((tmp_path / "synced").glob("*.safetensors")))
    assert shard_files > 1 and len(synced) >= shard_files and len(direct) == shard_files
    synced.clear(), direct.clear()
    merge(recipe, tmp_path / "cached", "--out-shard-size", "20k", "--no-sync")
    assert synced == [] and direct == []
    for f in sorted((tmp_path / "synced").iterdir()):
        if f.name not in ("merge_report.json", "README.md"):  # (they name the output)
            assert f.read_bytes() == (tmp_path / "cached" / f.name).read_bytes(), f.name
    assert tensors(tmp_path / "cached").keys() == tensors(models["ft1"]).keys()


def test_single_shard_and_side_files(models, tmp_path):
    merge(linear_recipe(models, "ft1", "ft3"), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "mergesmith_config.yml",
        "README.md",
    ):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "mergesmith"] and front["library_name"] == "transformers"
    assert "arxiv.org/abs/2203.05482" in card and "merge_method: linear" in card
    # .bin input (ft3) was read through the weights-only loader and merged.
    a, c, y = tensors(models["ft1"]), tensors(models["ft3"]), tensors(out)
    torch.testing.assert_close(y["lm_head.weight"], (a["lm_head.weight"] + c["lm_head.weight"]) / 2)


def test_no_tokenizer_no_card(models, tmp_path):
    merge(linear_recipe(models, "ft1", "ft2"), tmp_path / "out", "--no-copy-tokenizer", "--no-write-model-card")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"model.safetensors", "config.json", "mergesmith_config.yml", "merge_report.json"}


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_seeded_dare_is_bit_identical(models, tmp_path):
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.4}} for k in ("ft1", "ft2")],
    }
    merge(recipe, tmp_path / "a", "--random-seed", "11")
    merge(recipe, tmp_path / "b", "--random-seed", "11")
    merge(recipe, tmp_path / "c", "--random-seed", "12")
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "c")
    # Listing the models in the other order changes nothing: masks are keyed by model, not position.
    recipe["models"].reverse()
    merge(recipe, tmp_path / "d", "--random-seed", "11")
    a, d = tensors(tmp_path / "a"), tensors(tmp_path / "d")
    for name in a:
        torch.testing.assert_close(a[name], d[name], rtol=1e-6, atol=1e-7)


def test_dare_independent_of_tensor_order(models):
    """Processing tensors in reverse order gives bit-identical tensors."""
    recipe = parse_config(
        {
            "merge_method": "dare_linear",
            "base_model": str(models["base"]),
            "models": [
                {"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.3}} for k in ("ft1", "ft2")
            ],
        }
    )
    plan, infos = prepare_merge(recipe, MergeOptions())
    readers = {k: TensorReader(v) for k, v in infos.items()}
    forward = _Kept()
    Executor(plan, readers, seed=3).run(forward)
    plan.tensors.reverse()
    backward = _Kept()
    Executor(plan, readers, seed=3).run(backward)
    assert list(forward) != list(backward)
    assert all(torch.equal(forward[n], backward[n]) for n in forward)


class _Kept(dict):
    """A whole-tensor sink that keeps every tensor it is given."""

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor


def test_dry_run_reads_no_tensor(models, tmp_path):
    from conftest import run_cli

    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(linear_recipe(models, "ft1", "ft2")))
    result = run_cli("run", path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "plan: linear" in result.output and "output tensors" in result.output
    assert not (tmp_path / "out").exists()


def test_mergekit_flags_accepted_with_a_note(models, tmp_path):
    from conftest import run_cli

    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(linear_recipe(models, "ft1", "ft2")))
    flags = [
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--allow-crimes",
        "--clone-tensors",
        "--async-write",
        "--write-threads",
        "4",
        "--no-safe-serialization",
        "--trust-remote-code",
        "--out-shard-size",
        "1B",
        "-j",
        "2",
    ]
    result = run_cli("run", path, tmp_path / "out", "--quiet", *flags)
    assert result.exit_code == 0, result.output
    assert "note: --lazy-unpickle" in result.output and "note: --write-threads is ignored" in result.output
    assert (tmp_path / "out" / "model.safetensors").exists()
