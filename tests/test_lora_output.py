"""`run` options around LoRA: `--lora-merge-dtype` (the dtype of base+adapter tensors and of their
cache), and `--as-lora` side files (tokenizer, model card) and summary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import merge, run_cli, tensors
from lora_adapters import build_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora_out") / "a"
    return out, build_adapter(models["base"], out, seed=3, r=4, lora_alpha=8, target_modules=TARGETS)


def recipe(models: dict[str, Path], adapter: Path, **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": f"{models['base']}+{adapter}", "parameters": {"weight": 1.0}}],
        **extra,
    }


def test_lora_merge_dtype_sets_the_applied_and_cached_dtype(models: dict[str, Path], adapter, tmp_path: Path) -> None:
    path, expected = adapter  # peft's merge_and_unload, float32
    base = tensors(models["base"])
    cache = tmp_path / "cache"
    r = recipe(models, path, dtype="float32")
    merge(r, tmp_path / "cached", "--lora-merge-dtype", "bf16", "--lora-merge-cache", str(cache))
    (entry,) = list(cache.iterdir())
    cached = tensors(entry)
    assert entry.name.endswith("_bfloat16") and {v.dtype for v in cached.values()} == {torch.bfloat16}
    for name, value in cached.items():
        torch.testing.assert_close(value.float(), expected[name], rtol=2**-8, atol=1e-6, msg=name)
        if not any(t in name for t in TARGETS):  # untouched by the adapter: the base, rounded to bfloat16
            assert torch.equal(value, base[name].to(torch.bfloat16)), name
    # the recipe's dtype (float32) is applied after: the values are the bfloat16 ones, exactly
    got = tensors(tmp_path / "cached")
    streamed = merge(r, tmp_path / "streamed", "--lora-merge-dtype", "bfloat16")  # no cache: same values
    assert streamed.exit_code == 0
    for name, value in tensors(tmp_path / "streamed").items():
        assert value.dtype == torch.float32 and got[name].dtype == torch.float32
        assert torch.equal(value, cached[name].float()) and torch.equal(got[name], value), name
    # without the flag the applied tensors stay float32 (the base's dtype)
    merge(r, tmp_path / "plain")
    plain = tensors(tmp_path / "plain")
    assert any(not torch.equal(plain[n], got[n]) for n in plain)
    assert all(torch.equal(plain[n].to(torch.bfloat16).float(), got[n]) for n in plain)


def test_unknown_lora_merge_dtype_is_one_error(models: dict[str, Path], adapter, tmp_path: Path) -> None:
    import yaml

    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe(models, adapter[0])))
    result = run_cli("run", tmp_path / "r.yml", tmp_path / "out", "--quiet", "--lora-merge-dtype", "float8")
    assert result.exit_code == 2 and "--lora-merge-dtype" in result.output and "float8" in result.output
    assert not (tmp_path / "out").exists()


def test_as_lora_writes_tokenizer_card_and_report_summary(models: dict[str, Path], adapter, tmp_path: Path) -> None:
    import json

    from mergesmith.output.card import front_matter

    r = {**recipe(models, adapter[0]), "merge_method": "task_arithmetic", "base_model": str(models["base"])}
    result = merge(r, tmp_path / "out", "--as-lora", "2")
    out = tmp_path / "out"
    copied = [p.name for p in models["base"].iterdir() if p.name.startswith("tokenizer")]
    assert copied
    for name in copied:
        assert (out / name).read_bytes() == (models["base"] / name).read_bytes()
    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert front == {"library_name": "peft", "tags": ["merge", "mergesmith", "lora"]}  # a local base: no hub id
    assert (tmp_path / "out.yml").read_text().strip() in card
    report = [m for m in json.loads((out / "lora_report.json").read_text())["modules"] if m["kind"] != "full"]
    errors = [m["error"] for m in report]
    assert len(report) == 4 * len(TARGETS) and {m["rank"] for m in report} == {2}  # the modules the adapter moved
    line = result.output.strip().splitlines()[-1]
    assert f"rel. error mean {sum(errors) / len(errors):.3e} max {max(errors):.3e}" in line, line
    assert f"adapter: {len(report)} LoRA modules, rank 2," in line and f"Adapter: {len(report)} LoRA modules" in card

    merge(r, tmp_path / "bare", "--as-lora", "2", "--no-copy-tokenizer", "--no-write-model-card")
    assert not (tmp_path / "bare" / "README.md").exists()
    assert not any((tmp_path / "bare" / name).exists() for name in copied)


def test_adapter_card_names_a_hub_base() -> None:
    from mergesmith.lora.builder import ModuleReport
    from mergesmith.lora.card import adapter_card, report_summary
    from mergesmith.output.card import front_matter
    from mergesmith.sources.refs import ModelRef

    reports = [
        ModuleReport("a", "linear", [4, 4], 2, 0.1),
        ModuleReport("b", "conv1d", [4, 4], 4, 0.3),
        ModuleReport("n", "full", [4], -1, 0.0),
    ]
    summary = report_summary(reports)
    assert summary == "2 LoRA modules, rank 2-4, rel. error mean 2.000e-01 max 3.000e-01, 1 kept whole"
    base = ModelRef("org/base-model")
    card = adapter_card(
        "out", "ties", base, [base, ModelRef("org/base-model", None, ModelRef("org/a"))], "x: 1", summary
    )
    assert front_matter(card) == {
        "base_model": "org/base-model",
        "library_name": "peft",
        "tags": ["merge", "mergesmith", "lora"],
    }
    assert "```yaml\nx: 1\n```" in card and "* org/base-model+org/a" in card


def test_as_lora_of_a_union_recipe_carries_the_union_tokenizer_and_rows(tmp_path: Path) -> None:
    """Issue #18: `--as-lora` of a `tokenizer: {source: union}` recipe used to write the base's tokenizer and
    embedding rows on the base's vocabulary. The adapter must hold the union's tokens, and the embedding and
    head rows of the full merge (kept whole: they change shape), so base resized + adapter == full merge."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mergesmith.toymodels import make_base, make_vocab_variant

    base = make_base(tmp_path / "base", layers=2, hidden=32, vocab=96, seed=0)
    chat = make_vocab_variant(base, tmp_path / "chat", seed=1, added=("<|im_start|>", "<|im_end|>"))
    r = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(chat), "parameters": {"weight": 0.5}}],
        "tokenizer": {"source": "union"},
        "dtype": "float32",
    }
    merge(r, tmp_path / "full")
    merge(r, tmp_path / "adapter", "--as-lora", "8")
    full, out = tmp_path / "full", tmp_path / "adapter"

    def vocab(d: Path) -> dict[str, int]:
        return json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] | {
            t["content"]: t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]
        }

    assert vocab(out) == vocab(full)
    assert {"<|im_start|>", "<|im_end|>"} <= set(vocab(out)) and "<|im_end|>" not in vocab(base)
    merged = tensors(full)
    saved = load_file(str(out / "adapter_model.safetensors"))
    rows = len(vocab(full))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        kept = saved[f"base_model.model.{name}"]
        assert kept.shape[0] == merged[name].shape[0] >= rows
        torch.testing.assert_close(kept, merged[name], rtol=0, atol=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    model.resize_token_embeddings(merged["model.embed_tokens.weight"].shape[0])
    applied = PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(applied[name], merged[name], rtol=0, atol=0)
    head = tensors(base)["lm_head.weight"]
    start, end = vocab(full)["<|im_start|>"], vocab(full)["<|im_end|>"]
    assert max(start, end) >= head.shape[0]  # the added tokens' rows exist only in the union
