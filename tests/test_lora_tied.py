"""Extraction from a base that ties its output head to the input embedding (GPT-2, tied llama):
peft's model with the adapter gives the fine-tune's logits, the embedding change included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import merge, run_cli, tensors
from safetensors.torch import load_file

from mergesmith.toymodels import make_base, make_finetune

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 90]])


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    out = {}
    for family in ("llama", "gpt2"):
        base = make_base(root / family, family=family, layers=2, hidden=32, vocab=96, tie=True, seed=11)
        out[family], out[f"{family}_ft"] = base, make_finetune(base, root / f"{family}_ft", seed=12)
    return out


def logits(directory: Path, adapter: Path | None = None, merged: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        model = model.merge_and_unload() if merged else model
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("embed_lora", [False, True])
def test_tied_embedding_change_reaches_the_head(tied: dict[str, Path], tmp_path: Path, family: str, embed_lora: bool):
    base, ft, out = tied[family], tied[f"{family}_ft"], tmp_path / "lora"
    flags = ["--embed-lora"] if embed_lora else []
    result = run_cli("extract-lora", "--model", ft, "--base-model", base, "--out-path", out, "--max-rank", "64", *flags)
    assert result.exit_code == 0, result.output
    embedding = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    ft_sd = tensors(ft)
    assert not torch.equal(ft_sd[f"{embedding}.weight"], tensors(base)[f"{embedding}.weight"])  # the fine-tune moved it
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] is True and {embedding, "lm_head"} <= set(cfg["modules_to_save"])
    sd = load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model."
    assert torch.equal(sd[f"{prefix}lm_head.weight"], ft_sd[f"{embedding}.weight"])
    assert torch.equal(sd[f"{prefix}{embedding}.weight"], ft_sd[f"{embedding}.weight"])
    # one warning, naming the tensor, only where --embed-lora asked to factor it
    assert (f"'{embedding}.weight' is tied to the output head" in result.output) == embed_lora
    want = logits(ft)
    assert float((logits(base) - want).abs().max()) > 0.1  # the adapter has work to do
    torch.testing.assert_close(logits(base, out), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(base, out, merged=True), want, rtol=1e-4, atol=1e-4)


def test_mergesmith_reads_its_tied_adapter_back(tied: dict[str, Path], tmp_path: Path) -> None:
    base, ft = tied["gpt2"], tied["gpt2_ft"]
    result = run_cli("extract-lora", "--model", ft, "--base-model", base, "--out-path", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{tmp_path / 'lora'}", "parameters": {"weight": 1}}],
    }
    merge(recipe, tmp_path / "out")
    got, want = tensors(tmp_path / "out"), tensors(ft)
    assert set(got) == set(want)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=name)
