"""The `--workers` schedule from metadata only: a 405B-shaped merge planned without a tensor read.

The two input models are Llama-3.1-405B-shaped (126 layers, hidden 16384, intermediate 53248,
vocab 128256, 128 heads, 8 KV heads, bf16): real safetensors headers over sparse files of the full
length (`truncate`), so they take no disk and any read of weight data would see only zeros."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from mergesmith.engine.schedule import schedule
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import load_config
from mergesmith.shard_layout import layout_shards

LAYERS, HIDDEN, INTER, VOCAB, HEADS, KV = 126, 16384, 53248, 128256, 128, 8
KV_DIM = HIDDEN // HEADS * KV
PARAMS = (
    2 * VOCAB * HIDDEN + HIDDEN + LAYERS * (2 * HIDDEN * HIDDEN + 2 * KV_DIM * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
)


def layer(i: int) -> dict[str, list[int]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": [HIDDEN, HIDDEN],
        p + "self_attn.k_proj.weight": [KV_DIM, HIDDEN],
        p + "self_attn.v_proj.weight": [KV_DIM, HIDDEN],
        p + "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
        p + "mlp.gate_proj.weight": [INTER, HIDDEN],
        p + "mlp.up_proj.weight": [INTER, HIDDEN],
        p + "mlp.down_proj.weight": [HIDDEN, INTER],
        p + "input_layernorm.weight": [HIDDEN],
        p + "post_attention_layernorm.weight": [HIDDEN],
    }


def sparse_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A real header, then the data section as a hole of its full length."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def make_405b(directory: Path) -> Path:
    directory.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    files: list[dict[str, list[int]]] = [{"model.embed_tokens.weight": [VOCAB, HIDDEN]}]
    files += [
        {k: v for i in range(start, min(start + 9, LAYERS)) for k, v in layer(i).items()}
        for start in range(0, LAYERS, 9)
    ]
    files.append({"model.norm.weight": [HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]})
    weight_map = {}
    for k, tensors in enumerate(files, start=1):
        name = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        sparse_safetensors(directory / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 2 * PARAMS}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def recipe_405b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("405b")
    a, b = make_405b(root / "a"), make_405b(root / "b")
    assert sum(p.stat().st_blocks for p in a.iterdir()) * 512 < 50_000_000  # sparse: no disk used
    recipe = {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_the_405b_schedule_balances_tasks_and_sums_to_the_plan(recipe_405b):
    config, _ = load_config(recipe_405b)
    plan, _ = prepare_merge(config, MergeOptions())
    assert plan.bytes_written == 2 * PARAMS  # ~811 GB of bf16
    assert plan.bytes_read == 2 * plan.bytes_written  # two models, each tensor read once
    shards = layout_shards([(t.name, t.dtype, t.shape) for t in plan.tensors], 5_000_000_000)
    tasks = schedule(plan, shards, 8)
    assert len(tasks) == 8
    assert sorted(f for t in tasks for f in t.files) == sorted(s.file for s in shards)  # each shard once
    assert sum(t.bytes_read for t in tasks) == plan.bytes_read
    assert sum(t.bytes_written for t in tasks) == plan.bytes_written
    for t in tasks:
        assert t.bytes_read == 2 * t.bytes_written  # a linear merge of two models reads each output byte twice
    loads = [t.bytes_read + t.bytes_written for t in tasks]
    assert max(loads) - min(loads) <= 3 * 5_000_000_000  # balanced to within one shard's read + write


UNITS = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1}
SIZE = r"([\d.]+ (?:TB|GB|MB|kB|B))"


def nbytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def test_dry_run_prints_the_schedule_and_the_wall_time(recipe_405b):
    result = run_cli("run", recipe_405b, "--dry-run", "--workers", "8", "--bandwidth", "2B")
    assert result.exit_code == 0, result.output
    tasks = re.findall(
        rf"^task (\d+): shards ([\d,]+) \(\d+ file\(s\)\), read {SIZE}, write {SIZE}$", result.output, re.M
    )
    assert [int(t[0]) for t in tasks] == list(range(8))
    shard_numbers = sorted(int(n) for t in tasks for n in t[1].split(","))
    assert shard_numbers == list(range(1, len(shard_numbers) + 1)) and len(shard_numbers) > 8
    assert sum(nbytes(t[2]) for t in tasks) == pytest.approx(4 * PARAMS, rel=1e-4)  # shown to 3 decimals
    total = re.search(
        rf"schedule: 8 task\(s\), read {SIZE}, write {SIZE}; estimated wall time ([\d.]+) s at 2.000 GB/s per worker",
        result.output,
    )
    assert total is not None, result.output
    assert nbytes(total[1]) == pytest.approx(4 * PARAMS, rel=1e-3)
    assert nbytes(total[2]) == pytest.approx(2 * PARAMS, rel=1e-3)
    slowest = max(nbytes(t[2]) + nbytes(t[3]) for t in tasks) / 2e9
    assert float(total[3]) == pytest.approx(slowest, rel=0.01)  # the slowest task's bytes at 2 GB/s
