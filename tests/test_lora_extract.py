"""extract-lora and run --as-lora: factors against float64 SVDs computed here, and peft loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import merge, run_cli, tensors
from lora_adapters import build_adapter

PREFIX = "base_model.model."


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Module -> scale * B @ A in the [out, in] orientation, read with peft's own conventions."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in sd.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = sd[key.replace("lora_A", "lora_B")]
            r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), module), cfg["r"])
            alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), module), cfg["lora_alpha"])
            assert a.shape[0] == r
            out[module] = (b.double() @ a.double()) * (alpha / r)
    return out


def optimum(delta: torch.Tensor, k: int) -> float:
    if delta.dim() < 2:  # kept whole: exact
        return 0.0
    s = torch.linalg.svdvals(delta.double())
    if float(s.sum()) == 0:
        return 0.0
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def extract(models: dict[str, Path], tmp_path: Path, ft: str, base: str, *flags: str) -> Path:
    out = tmp_path / f"lora_{ft}"
    result = run_cli("extract-lora", "--model", models[ft], "--base-model", models[base], "--out-path", out, *flags)
    assert result.exit_code == 0, result.output
    return out


def test_full_rank_reconstructs_the_finetune(models: dict[str, Path], tmp_path: Path) -> None:
    out = extract(models, tmp_path, "ft1", "base", "--max-rank", "1000")
    ft, base = tensors(models["ft1"]), tensors(models["base"])
    deltas = lora_deltas(out)
    assert len(deltas) == 4 * 7 + 1  # every projection and lm_head
    for module, d in deltas.items():
        true = ft[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        assert float((d - true).norm() / true.norm()) < 1e-4, module
    from safetensors.torch import load_file

    sd = load_file(out / "adapter_model.safetensors")
    assert torch.equal(sd[f"{PREFIX}model.norm.weight"], ft["model.norm.weight"])  # kept whole
    report = json.loads((out / "lora_report.json").read_text())["modules"]
    assert all(m["error"] < 1e-4 for m in report)


def test_rank_k_error_is_the_eckart_young_optimum(models: dict[str, Path], tmp_path: Path) -> None:
    out = extract(models, tmp_path, "ft1", "base", "--max-rank", "3", "-i", r"self_attn", "-e", "k_proj")
    ft, base = tensors(models["ft1"]), tensors(models["base"])
    deltas = lora_deltas(out)
    report = {m["module"]: m for m in json.loads((out / "lora_report.json").read_text())["modules"]}
    assert set(deltas) == {f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj", "o_proj")}
    for module, d in deltas.items():
        true = ft[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        best = optimum(true, 3)
        assert float((d - true).norm() / true.norm()) == pytest.approx(best, rel=1e-4)
        assert report[module]["rank"] == 3 and report[module]["error"] == pytest.approx(best, rel=1e-4)


def test_energy_picks_the_smallest_rank_per_module(models: dict[str, Path], tmp_path: Path) -> None:
    out = extract(models, tmp_path, "ft1", "base", "--energy", "0.5", "-i", "mlp", "--skip-undecomposable")
    ft, base = tensors(models["ft1"]), tensors(models["base"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None
    for module, d in lora_deltas(out).items():
        s = torch.linalg.svdvals(ft[f"{module}.weight"].double() - base[f"{module}.weight"].double())
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        assert d.shape and torch.linalg.matrix_rank(d.float()) == int((share < 0.5).sum()) + 1


@pytest.mark.parametrize("family", ["base", "gpt2"])
def test_peft_loads_the_extracted_adapter(models: dict[str, Path], tmp_path: Path, family: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft = "ft1" if family == "base" else "gpt2_ft"
    # GPT-2 ties its head to wte: the changed embedding is saved with the head tied to it (ensure_weight_tying)
    out = extract(models, tmp_path, ft, family, "--max-rank", "4")
    ft_sd, base_sd = tensors(models[ft]), tensors(models[family])
    expected = dict(base_sd)  # base + the truncated differences, built here from the SVD
    for name, w in base_sd.items():
        if (
            name.endswith(".weight")
            and w.dim() == 2
            and "embed" not in name
            and "wte" not in name
            and "wpe" not in name
        ):
            d = ft_sd[name].double() - w.double()
            conv = family == "gpt2"
            u, s, vh = torch.linalg.svd(d.T if conv else d)
            low = (u[:, :4] * s[:4]) @ vh[:4]
            expected[name] = (w.double() + (low.T if conv else low)).float()
        else:
            expected[name] = ft_sd[name]  # biases, norms, embeddings: exact (lora_B.bias / modules_to_save)
    reference = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)
    reference.load_state_dict(expected, strict=False)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models[family]), out)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_run_as_lora_equals_the_full_merge(models: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "v_proj", "down_proj"]
    build_adapter(models["base"], tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=targets)
    build_adapter(models["base"], tmp_path / "a2", seed=2, r=2, lora_alpha=4, target_modules=targets, use_dora=True)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": f"{models['base']}+{tmp_path / 'a1'}", "parameters": {"weight": 0.7}},
            {"model": f"{models['base']}+{tmp_path / 'a2'}", "parameters": {"weight": 0.5}},
        ],
    }
    merge(recipe, tmp_path / "full")
    full, base = tensors(tmp_path / "full"), tensors(models["base"])
    for rank in (64, 2):
        out = tmp_path / f"adapter{rank}"
        merge(recipe, out, "--as-lora", str(rank))
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), out)
        got = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
        for name, want in full.items():
            err = float((got[name].double() - want.double()).norm())
            bound = optimum(want.double() - base[name].double(), rank) * float((want - base[name]).double().norm())
            assert err <= bound * (1 + 1e-3) + 1e-5, (name, rank, err, bound)
            if rank == 2 and bound > 0:
                assert err == pytest.approx(bound, rel=1e-3)
