"""`mergesmith moe`: real tiny dense models -> MoE models that stock transformers loads and runs.

Every expectation is computed here independently: expert tensors from the source files, gate
rows from transformers' hidden states or the embedding matrix, logits from the dense base.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.toymodels import load_state_dict, make_base, make_finetune

FLAG = "--i-understand-this-is-not-useful-without-training"
PROMPTS = [["hello world"], ["the cat and the dog"], ["one two three", "four five"], ["red green blue"]]


def moe(recipe: dict, out: Path, *flags: str, ok: bool = True):
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run_cli("moe", path, out, "--quiet", *flags)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def experts(*models: Path, **extra: object) -> list[dict]:
    return [
        {"source_model": str(m), "positive_prompts": PROMPTS[i % len(PROMPTS)], **extra} for i, m in enumerate(models)
    ]


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load(path)(ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 44]])


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_models")
    out: dict[str, Path] = {}
    out["qwen2"] = make_base(root / "qwen2", family="qwen2", layers=2, tie=True, seed=11)
    out["qwen2_ft1"] = make_finetune(out["qwen2"], root / "qwen2_ft1", seed=12, scale=0.05)
    out["qwen2_ft2"] = make_finetune(out["qwen2"], root / "qwen2_ft2", seed=13, scale=0.05)
    out["qwen3"] = make_base(root / "qwen3", family="qwen3", layers=2, seed=14)
    out["qwen3_ft"] = make_finetune(out["qwen3"], root / "qwen3_ft", seed=15, scale=0.05)
    out["granite"] = make_base(root / "granite", family="granite", layers=2, seed=16)
    out["granite_ft"] = make_finetune(out["granite"], root / "granite_ft", seed=17, scale=0.05)
    return out


def dense_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


# --- Mixtral ---------------------------------------------------------------------------------------


def test_mixtral_from_llama_loads_generates_and_holds_each_expert(models, tmp_path):
    srcs = [models["base"], models["ft1"], models["ft2"], models["ft3"]]
    recipe = {"base_model": str(models["base"]), "gate_mode": "hidden", "experts": experts(*srcs)}
    recipe["experts"][2]["residual_scale"] = 0.5
    out = tmp_path / "mixtral"
    moe(recipe, out, "--out-shard-size", "40k")
    assert (out / "model.safetensors.index.json").is_file()
    got = tensors(out)
    base = load_state_dict(models["base"])
    for e, src in enumerate(srcs):
        sd = load_state_dict(src)
        scale = 0.5 if e == 2 else 1.0
        for layer in range(4):
            pre, moe_pre = f"model.layers.{layer}.mlp", f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            assert torch.equal(got[f"{moe_pre}.w1.weight"], sd[f"{pre}.gate_proj.weight"])
            assert torch.equal(got[f"{moe_pre}.w3.weight"], sd[f"{pre}.up_proj.weight"])
            assert torch.allclose(got[f"{moe_pre}.w2.weight"], sd[f"{pre}.down_proj.weight"] * scale, atol=0, rtol=1e-6)
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name

    model = load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    # The fused parameter transformers builds on load is [gate; up]: each expert computes its source's MLP.
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    experts_mod = model.model.layers[1].mlp.experts
    for e, src in enumerate(srcs):
        sd = load_state_dict(src)
        want = dense_mlp(x, *(sd[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")))
        gate, up = (x @ experts_mod.gate_up_proj[e].T).chunk(2, dim=-1)
        have = (torch.nn.functional.silu(gate) * up) @ experts_mod.down_proj[e].T
        assert torch.allclose(have, want * (0.5 if e == 2 else 1.0), atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tok("hello world", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] >= 3
    card = (out / "README.md").read_text()
    assert "Mixtral" in card and "the cat and the dog" in card and str(models["ft3"]) in card
    assert (out / "mergesmith_moe_config.yml").read_text() == (tmp_path / "mixtral.yml").read_text()


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"])
def test_experts_all_base_give_base_logits(models, tmp_path, mode):
    b = models["base"]
    recipe = {"base_model": str(b), "gate_mode": mode, "experts": experts(b, b, b)}
    out = tmp_path / mode
    moe(recipe, out, FLAG, "--random-seed", "3")
    assert torch.allclose(logits(out, IDS), logits(b, IDS), atol=1e-5)


def independent_hidden_rows(base: Path, prompts: list[str], average: bool) -> torch.Tensor:
    """The state entering each layer at the last token (or mean over positions), mean over prompts."""
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    batch = tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    layers = len(hs) - 1
    rows = []
    for layer in range(layers):
        h = hs[layer].float()  # entering layer `layer`
        per_prompt = h.mean(dim=1) if average else h[:, -1, :]
        rows.append(per_prompt.mean(dim=0))
    return torch.stack(rows)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_router_rows_are_prompt_states(models, tmp_path, mode):
    b = models["base"]
    negative = ["yes no", "good bad"]
    recipe = {"base_model": str(b), "gate_mode": mode, "experts": experts(models["ft1"], models["ft2"], models["ft3"])}
    recipe["experts"][1]["negative_prompts"] = negative
    out = tmp_path / "hidden"
    moe(recipe, out)
    got = tensors(out)
    for e in range(3):
        want = independent_hidden_rows(b, PROMPTS[e], mode == "hidden_avg")
        if e == 1:
            want = want - independent_hidden_rows(b, negative, mode == "hidden_avg")
        want = unit(want)
        for layer in range(4):
            row = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            assert torch.allclose(row, want[layer], atol=1e-5), (e, layer)


def test_cheap_embed_rows_are_normalised_embedding_sums(models, tmp_path):
    b = models["base"]
    recipe = {"base_model": str(b), "gate_mode": "cheap_embed", "experts": experts(models["ft1"], models["ft2"])}
    recipe["experts"][0]["negative_prompts"] = ["yes no"]
    out = tmp_path / "cheap"
    moe(recipe, out)
    embed = load_state_dict(b)["model.embed_tokens.weight"].double()
    tok = AutoTokenizer.from_pretrained(b)

    def summed(prompts: list[str]) -> torch.Tensor:
        ids = [i for p in prompts for i in tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]]
        return unit(embed[ids].sum(dim=0))

    want = [unit(summed(PROMPTS[0]) - summed(["yes no"])), summed(PROMPTS[1])]
    got = tensors(out)
    for layer in range(4):
        rows = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        for e in range(2):
            assert torch.allclose(rows[e], want[e], atol=1e-6)


def test_random_gates_follow_the_seed(models, tmp_path):
    b = models["base"]
    recipe = {"base_model": str(b), "gate_mode": "uniform_random", "experts": [{"source_model": str(b)}] * 2}
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        moe(recipe, tmp_path / name, FLAG, "--random-seed", seed)
        runs[name] = tensors(tmp_path / name)["model.layers.0.block_sparse_moe.gate.weight"]
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])
    assert float(runs["a"].abs().max()) <= 1 / math.sqrt(32) and float(runs["a"].abs().max()) > 0.5 / math.sqrt(32)


def test_noise_scale_is_seeded_gaussian(models, tmp_path):
    b = models["base"]
    recipe = {"base_model": str(b), "gate_mode": "random", "experts": [{"source_model": str(b), "noise_scale": 0.01}]}
    recipe["experts"].append({"source_model": str(models["ft1"])})
    moe(recipe, tmp_path / "n1", "--random-seed", "4")
    moe(recipe, tmp_path / "n2", "--random-seed", "4")
    a, c = tensors(tmp_path / "n1"), tensors(tmp_path / "n2")
    w = load_state_dict(b)["model.layers.0.mlp.up_proj.weight"]
    noise = a["model.layers.0.block_sparse_moe.experts.0.w3.weight"] - w
    assert torch.equal(
        a["model.layers.0.block_sparse_moe.experts.0.w3.weight"],
        c["model.layers.0.block_sparse_moe.experts.0.w3.weight"],
    )
    assert 0.007 < float(noise.std()) < 0.013


def test_similar_prompts_warn_naming_layer_and_experts(models, tmp_path):
    recipe = {"base_model": str(models["base"]), "gate_mode": "cheap_embed"}
    recipe["experts"] = [
        {"source_model": str(models["ft1"]), "positive_prompts": ["hello world"]},
        {"source_model": str(models["ft2"]), "positive_prompts": ["hello world hello"]},
        {"source_model": str(models["ft3"]), "positive_prompts": ["red green blue"]},
    ]
    path = tmp_path / "warn.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("moe", path, tmp_path / "warn")
    assert result.exit_code == 0, result.output
    assert "layer 0: gate matrix is ill-conditioned" in result.output
    assert f"experts[0] ({models['ft1']}) ~ experts[1] ({models['ft2']})" in result.output


# --- Qwen2-MoE, Qwen3-MoE, GraniteMoE ------------------------------------------------------------


def test_qwen2_moe_with_one_shared_expert_and_tied_embeddings(families, tmp_path):
    q, ft1, ft2 = families["qwen2"], families["qwen2_ft1"], families["qwen2_ft2"]
    recipe = {
        "base_model": str(q),
        "gate_mode": "cheap_embed",
        "experts": experts(q, ft1),
        "shared_experts": [{"source_model": str(ft2), "positive_prompts": ["one two three"], "residual_scale": 0.5}],
    }
    out = tmp_path / "qwen2moe"
    moe(recipe, out)
    got = tensors(out)
    assert "lm_head.weight" not in got
    src, base = load_state_dict(ft2), load_state_dict(q)
    for p in ("gate_proj", "up_proj"):
        assert torch.equal(got[f"model.layers.1.mlp.shared_expert.{p}.weight"], src[f"model.layers.1.mlp.{p}.weight"])
    down = src["model.layers.1.mlp.down_proj.weight"] * 0.5
    assert torch.allclose(got["model.layers.1.mlp.shared_expert.down_proj.weight"], down, rtol=1e-6, atol=0)
    assert torch.equal(got["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"])
    embed = base["model.embed_tokens.weight"].double()
    tok = AutoTokenizer.from_pretrained(q)
    ids = tok(tok.bos_token + "one two three", add_special_tokens=False)["input_ids"]
    assert torch.allclose(
        got["model.layers.0.mlp.shared_expert_gate.weight"][0].double(), unit(embed[ids].sum(0)), atol=1e-6
    )
    model = load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.tie_word_embeddings
    assert model.config.norm_topk_prob and model.config.shared_expert_intermediate_size == 64
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.isfinite(model(IDS).logits).all()


def test_qwen2_moe_two_shared_experts_sum_their_mlps(families, tmp_path):
    q, ft1, ft2 = families["qwen2"], families["qwen2_ft1"], families["qwen2_ft2"]
    recipe = {
        "base_model": str(q),
        "gate_mode": "random",
        "experts": [{"source_model": str(ft1)}, {"source_model": str(ft2)}],
        "shared_experts": [{"source_model": str(ft1)}, {"source_model": str(ft2)}],
    }
    out = tmp_path / "qwen2moe2"
    moe(recipe, out)
    model = load(out)
    assert model.config.shared_expert_intermediate_size == 128
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    want = sum(
        dense_mlp(x, *(load_state_dict(m)[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")))
        for m in (ft1, ft2)
    )
    with torch.no_grad():
        assert torch.allclose(model.model.layers[0].mlp.shared_expert(x), want, atol=1e-5)
        assert torch.isfinite(model(IDS).logits).all()


def test_qwen2_moe_from_llama_gets_zero_attention_biases(models, tmp_path):
    recipe = {
        "base_model": str(models["base"]),
        "architecture": "qwen",
        "gate_mode": "random",
        "experts": [{"source_model": str(models["ft1"])}, {"source_model": str(models["ft2"])}],
        "shared_experts": [{"source_model": str(models["base"])}],
    }
    out = tmp_path / "q2llama"
    moe(recipe, out)
    got = tensors(out)
    assert torch.equal(got["model.layers.2.self_attn.k_proj.bias"], torch.zeros(16))
    assert type(load(out)).__name__ == "Qwen2MoeForCausalLM"


def test_qwen3_moe_of_base_experts_matches_base(families, tmp_path):
    q = families["qwen3"]
    recipe = {"base_model": str(q), "gate_mode": "hidden", "experts": experts(q, q)}
    out = tmp_path / "qwen3moe"
    moe(recipe, out, FLAG)
    assert type(load(out)).__name__ == "Qwen3MoeForCausalLM"
    assert torch.allclose(logits(out, IDS), logits(q, IDS), atol=1e-5)
    recipe["experts"] = experts(q, families["qwen3_ft"])
    moe(recipe, tmp_path / "qwen3moe_ft")
    got, src = tensors(tmp_path / "qwen3moe_ft"), load_state_dict(families["qwen3_ft"])
    assert torch.equal(got["model.layers.1.mlp.experts.1.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(
        got["model.layers.1.self_attn.q_norm.weight"], load_state_dict(q)["model.layers.1.self_attn.q_norm.weight"]
    )


def test_granitemoe_of_base_experts_matches_base(families, tmp_path):
    g, ft = families["granite"], families["granite_ft"]
    recipe = {"base_model": str(g), "gate_mode": "cheap_embed", "experts": experts(g, ft)}
    out = tmp_path / "granitemoe"
    moe(recipe, out)
    got, sd = tensors(out), load_state_dict(ft)
    fused = got["model.layers.0.block_sparse_moe.input_linear.weight"][1]
    assert torch.equal(
        fused, torch.cat([sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]])
    )
    assert type(load(out)).__name__ == "GraniteMoeForCausalLM"
    recipe["experts"] = experts(g, g)
    moe(recipe, tmp_path / "granite_same", FLAG)
    assert torch.allclose(logits(tmp_path / "granite_same", IDS), logits(g, IDS), atol=1e-5)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts_per_token": 5}, "experts_per_token must be between 1 and the number of experts (4), got 5"),
        ({"gate_mode": "hiden"}, "unknown gate mode 'hiden'; did you mean 'hidden'?"),
        ({"architecture": "deepseek"}, "DeepSeek MoE needs remote code"),
        ({"architecture": "qwen3"}, "Qwen3 MoE is built from qwen3 models, these are 'llama'"),
    ],
)
def test_bad_configs_are_refused_with_one_message(models, tmp_path, change, message):
    recipe = {
        "base_model": str(models["base"]),
        "experts": experts(models["ft1"], models["ft2"], models["base"], models["ft3"]),
    }
    recipe.update(change)
    out = tmp_path / "bad"
    result = moe(recipe, out, ok=False)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_keys_mergekit_moe_ignores_are_warnings_or_refused_with_strict(models, tmp_path):
    recipe = {
        "base_model": str(models["base"]),
        "gate_mode": "random",
        "gate_mod": "hidden",  # a typo mergekit-moe ignores
        "tokenizer": {"source": "union"},  # published moe configs carry it; mergekit-moe reads no such key
        "experts": experts(models["ft1"], models["ft2"]),
    }
    result = moe(recipe, tmp_path / "strict", "--strict", ok=False)
    assert result.exit_code == 2 and not (tmp_path / "strict").exists()
    assert "--strict: 2 key(s)" in result.output and "gate_mod: unknown key 'gate_mod'" in result.output
    result = moe(recipe, tmp_path / "lenient")
    assert "gate_mod: unknown key 'gate_mod', ignored, as mergekit does; did you mean 'gate_mode'?" in result.output
    assert "tokenizer: unknown key 'tokenizer', ignored, as mergekit does" in result.output
    assert (tmp_path / "lenient" / "config.json").is_file()


def test_missing_prompts_with_hidden_are_refused(models, tmp_path):
    recipe = {
        "base_model": str(models["base"]),
        "experts": experts(models["ft1"]) + [{"source_model": str(models["ft2"])}],
    }
    result = moe(recipe, tmp_path / "bad", ok=False)
    assert result.exit_code == 2 and "experts[1] has no positive_prompts" in result.output
    assert not (tmp_path / "bad").exists()


def test_unsupported_family_lists_what_is_supported(models, tmp_path):
    gpt2 = [{"source_model": str(models["gpt2"])}, {"source_model": str(models["gpt2_ft"])}]
    recipe = {"base_model": str(models["gpt2"]), "gate_mode": "random", "experts": gpt2}
    result = moe(recipe, tmp_path / "bad", ok=False)
    assert result.exit_code == 2
    assert "no supported MoE class can be built from 'gpt2' models" in result.output
    for name in ("Mixtral", "Qwen MoE", "Qwen3 MoE", "GraniteMoE"):
        assert name in result.output
    assert not (tmp_path / "bad").exists()


def test_same_model_everywhere_needs_the_flag(models, tmp_path):
    b = str(models["base"])
    recipe = {"base_model": b, "gate_mode": "random", "experts": [{"source_model": b}, {"source_model": b}]}
    result = moe(recipe, tmp_path / "bad", ok=False)
    assert result.exit_code == 2 and FLAG in result.output


def test_validate_moe_config_reports_without_building(models, tmp_path):
    from mergesmith.moe import validate_moe_config

    good = tmp_path / "good.yml"
    good.write_text(
        yaml.safe_dump({"base_model": str(models["base"]), "experts": experts(models["ft1"], models["ft2"])})
    )
    assert validate_moe_config(good) == []
    bad = tmp_path / "bad.yml"
    gpt2 = [{"source_model": str(models["gpt2"])}, {"source_model": str(models["gpt2_ft"])}]
    bad.write_text(yaml.safe_dump({"base_model": str(models["gpt2"]), "gate_mode": "random", "experts": gpt2}))
    (err,) = validate_moe_config(bad)
    assert "Supported:" in str(err)


def test_expert_with_a_differently_padded_vocab(models, tmp_path):
    padded = make_base(tmp_path / "padded", layers=4, hidden=32, vocab=128, seed=21)
    recipe = {"base_model": str(models["base"]), "gate_mode": "cheap_embed", "experts": experts(models["ft1"], padded)}
    out = tmp_path / "padded_moe"
    moe(recipe, out)
    got, src = tensors(out), load_state_dict(padded)
    assert got["model.embed_tokens.weight"].shape == (96, 32) and load(out).config.vocab_size == 96
    assert torch.equal(
        got["model.layers.3.block_sparse_moe.experts.1.w2.weight"], src["model.layers.3.mlp.down_proj.weight"]
    )


def test_validate_command_accepts_moe_configs(models, tmp_path):
    from conftest import run_cli

    good = tmp_path / "good.yml"
    good.write_text(
        yaml.safe_dump({"base_model": str(models["base"]), "experts": experts(models["ft1"], models["ft2"])})
    )
    result = run_cli("validate", good)
    assert result.exit_code == 0 and "MoE config: no problems found" in result.output
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump(
            {"base_model": str(models["base"]), "experts_per_tok": 2, "experts": experts(models["ft1"], models["ft2"])}
        )
    )
    result = run_cli("validate", bad)  # mergekit-moe ignores the misspelt key: a warning
    assert result.exit_code == 0 and "warning: experts_per_tok: unknown key" in result.output
    assert "did you mean 'experts_per_token'?" in result.output
    result = run_cli("validate", bad, "--strict")
    assert result.exit_code == 2 and "experts_per_tok" in result.output and "experts_per_token" in result.output
