"""`base+adapter` inputs: mergesmith applies the adapter in weight space exactly as peft merges it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import merge, tensors
from lora_adapters import build_adapter

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "plain": ("base", dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN + ["up_proj", "down_proj"])),
    "rslora": ("base", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=LLAMA_ATTN)),
    "patterns": (
        "base",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_ATTN + ["gate_proj"],
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"k_proj": 3, "gate_proj": 32},
        ),
    ),
    "dora": ("base", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "embedding": ("base", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "dora_embedding": ("base", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])),
    "modules_to_save": (
        "base",
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head", "norm"]),
    ),
    "gpt2_fan_in_fan_out": (
        "gpt2",
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
    "gpt2_bias": (
        "gpt2",
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"], lora_bias=True, bias="all"),
    ),
    "gpt2_dora": (
        "gpt2",
        dict(r=2, lora_alpha=4, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "c_proj"]),
    ),
}


def run_adapter(models: dict[str, Path], tmp_path: Path, base: str, config: dict, *flags: str) -> tuple[dict, dict]:
    expected = build_adapter(models[base], tmp_path / "adapter", **config)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{models[base]}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}],
    }
    merge(recipe, tmp_path / "out", *flags)
    return tensors(tmp_path / "out"), expected


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_applied_like_peft_merge_and_unload(models: dict[str, Path], tmp_path: Path, case: str) -> None:
    base, config = CASES[case]
    got, expected = run_adapter(models, tmp_path, base, config)
    original = tensors(models[base])
    changed = 0
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, original[name])
    assert changed > 0


def test_merge_cache_materialises_once_and_is_reused(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    got, expected = run_adapter(models, tmp_path, "base", CASES["plain"][1], "--lora-merge-cache", str(cache))
    (entry,) = list(cache.iterdir())
    assert (entry / "model.safetensors").exists() and (entry / "config.json").exists()
    for name, value in tensors(entry).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    recipe = (tmp_path / "out.yml").read_text()
    merge(recipe, tmp_path / "again", "--lora-merge-cache", str(cache))
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    for name, value in tensors(tmp_path / "again").items():
        assert torch.equal(value, got[name])
