"""Every family merges into a model that loads in its own class: decoder-only, vision-language,
encoder-decoder and encoder models, built by transformers from tiny configs (tests/arch_models.py).

Each output must load with no missing, unexpected or mismatched keys, run a forward pass, and equal
the per-tensor formula written here (tests/formulas.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from arch_models import FAMILIES, VLMS, build, dummy_inputs, finetune, model_class
from conftest import merge, run_cli, tensors
from formulas import linear, task_vectors

DECODERS = [f for f in FAMILIES if f not in VLMS and not f.startswith("t5") and f != "bert"]
OTHERS = [*VLMS, "t5", "t5_gated", "bert"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    """family -> (base, ft1, ft2), each family built on first use and kept for the session."""
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path]:
        if family not in built:
            base = build(family, root / family / "base", seed=0)
            built[family] = (
                base,
                finetune(base, family, root / family / "ft1", seed=1),
                finetune(base, family, root / family / "ft2", seed=2),
            )
        return built[family]

    return get


def load_clean(family: str, out: Path) -> torch.nn.Module:
    """The merged model in its own class: every weight found, none left over, every shape right."""
    model, info = model_class(family).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(**dummy_inputs(family, model)).logits
    assert torch.isfinite(logits).all()
    return model


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, name
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-4), name


def count_of(cfg: dict, key: str) -> int:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("family", DECODERS + OTHERS)
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_loads_and_matches_formula(zoo, tmp_path, family, method):
    base, ft1, ft2 = zoo(family)
    if method == "linear":
        recipe = {
            "merge_method": "linear",
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.3}},
                {"model": str(ft2), "parameters": {"weight": 0.7}},
            ],
        }
    else:
        recipe = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.7}},
            ],
        }
    recipe["dtype"] = "float32"
    merge(recipe, tmp_path / "out")
    load_clean(family, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["audit"]["config_problems"] == []
    out, b, a1, a2 = (tensors(p) for p in (tmp_path / "out", base, ft1, ft2))
    assert set(out) == set(b)
    for name, y in out.items():
        if method == "linear":
            want = linear([a1[name], a2[name]], [0.3, 0.7])
        else:
            want = task_vectors(b[name], [a1[name], a2[name]], [0.6, 0.4], [0.5, 0.7], consensus=True, normalize=True)
        close(y, want, name)
    # Only the dtype may change in config.json: every stack keeps its count, the vocabulary its size.
    donor = ft1 if method == "linear" else base
    cfg_in = json.loads((donor / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg_out.pop("dtype", None), cfg_in.pop("dtype", None)
    assert cfg_out == cfg_in


@pytest.mark.parametrize("family", [*DECODERS, *VLMS, "bert"])
def test_frankenmerge_grows_only_the_text_stack(zoo, tmp_path, family):
    """Top-level slices on a VLM apply to the text decoder; the other modules are the donor's."""
    base, ft1, _ = zoo(family)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(ft1), "layer_range": [1, 2]}]},
        ],
    }
    merge(recipe, tmp_path / "out")
    check_frankenmerge(family, base, ft1, tmp_path / "out")
    if family in VLMS:  # the audit says why ft1's vision layers are not in the output
        report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
        (reasons,) = [v["dropped"] for k, v in report["inputs"].items() if k.endswith("ft1")]
        assert "the output's vision_tower is taken from another model" in reasons.values()


def check_frankenmerge(family: str, base: Path, ft1: Path, out_dir: Path) -> None:
    """Output text layers 0, 1 are base's 0, 1; layer 2 is ft1's layer 1; everything else base's
    (post weights, the final norm and head, from the last slice: ft1)."""
    from mergesmith.sources.structure import find_structure

    out, b, f = tensors(out_dir), tensors(base), tensors(ft1)
    cfg_in = json.loads((base / "config.json").read_text())
    cfg_out = json.loads((out_dir / "config.json").read_text())
    structure = find_structure(cfg_in, list(b))
    text = structure.stack_of("text_decoder") or structure.stack_of("default")
    assert text is not None and text.count_key is not None
    assert count_of(cfg_out, text.count_key) == 3
    for stack in structure.stacks:
        if stack is not text:
            assert count_of(cfg_out, stack.count_key) == count_of(cfg_in, stack.count_key)
    head = text.prefix + "."
    expected = {}
    for name in b:
        if name.startswith(head):
            index, rest = name[len(head) :].split(".", 1)
            expected[name] = b[name]
            if index == "1":
                expected[f"{head}2.{rest}"] = f[name]
        elif structure.module_of(name) == text.module and not _is_pre(name):
            expected[name] = f[name]  # post weights of the text decoder: the last slice's
        else:
            expected[name] = b[name]
    assert set(out) == set(expected)
    for name, y in out.items():
        assert torch.equal(y, expected[name]), name
    model = load_clean(family, out_dir)
    assert model is not None


def _is_pre(name: str) -> bool:
    from mergesmith.sources import arch

    return arch.is_pre_weight(name)


@pytest.mark.parametrize("family", VLMS)
def test_vlm_modules_frankenmerge_changes_only_text_layers(zoo, tmp_path, family):
    base, ft1, _ = zoo(family)
    recipe = {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(ft1), "layer_range": [1, 2]}]},
                ]
            },
            "vision_tower": {"models": [{"model": str(base)}]},
            "multi_modal_projector": {"models": [{"model": str(base)}]},
        },
    }
    merge(recipe, tmp_path / "out")
    check_frankenmerge(family, base, ft1, tmp_path / "out")


@pytest.mark.parametrize("family", ["t5", "t5_gated"])
def test_t5_slices_need_modules_and_modules_merge_each_stack(zoo, tmp_path, family):
    base, ft1, ft2 = zoo(family)
    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": str(ft1), "layer_range": [0, 2]}, {"model": str(ft2), "layer_range": [0, 2]}]}
        ],
        "parameters": {"weight": 0.5},
    }
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, tmp_path / "bad", "--quiet")
    assert result.exit_code != 0
    assert "several layer stacks" in result.output and "modules:" in result.output
    assert not (tmp_path / "bad").exists()
    # Per module: encoder 0.5/0.5 (module parameters), decoder 0.2/0.8 (source parameters), shared copied.
    sources = [{"model": str(ft1), "layer_range": [0, 2]}, {"model": str(ft2), "layer_range": [0, 2]}]
    weighted = [{**s, "parameters": {"weight": w}} for s, w in zip(sources, (0.2, 0.8), strict=True)]
    recipe = {
        "merge_method": "linear",
        "modules": {
            "encoder": {"slices": [{"sources": sources}], "parameters": {"weight": 0.5}},
            "decoder": {"slices": [{"sources": weighted}]},
        },
        "parameters": {"weight": 1.0},
    }
    merge(recipe, tmp_path / "out")
    load_clean(family, tmp_path / "out")
    out, a1, a2 = tensors(tmp_path / "out"), tensors(ft1), tensors(ft2)
    assert set(out) == set(a1)
    for name, y in out.items():
        if name.startswith("encoder."):
            close(y, linear([a1[name], a2[name]], [0.5, 0.5]), name)
        elif name.startswith("decoder."):
            close(y, linear([a1[name], a2[name]], [0.2, 0.8]), name)
        else:
            assert torch.equal(y, a1[name]), name  # shared: not in the recipe, the donor's (ft1)


def test_unknown_module_and_different_structures_are_refused(zoo, tmp_path):
    base, ft1, _ = zoo("llava")
    llama, *_ = zoo("llama")
    recipe = {"merge_method": "linear", "modules": {"text_decodr": {"models": [{"model": str(base)}]}}}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, tmp_path / "o", "--quiet")
    assert result.exit_code != 0 and "no module 'text_decodr'" in result.output and "text_decoder" in result.output
    recipe = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(llama)}]}
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, tmp_path / "o", "--quiet")
    assert result.exit_code != 0 and "built differently" in result.output and "vision_tower" in result.output
    assert not (tmp_path / "o").exists()


def test_validate_prints_the_stacks_of_a_vlm(zoo, tmp_path):
    base, ft1, _ = zoo("qwen2_5_vl")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(base)}, {"model": str(ft1)}],
        "parameters": {"weight": 1},
    }
    path = tmp_path / "vlm.yml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(["mergesmith", "validate", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "structure from transformers Qwen2_5_VLForConditionalGeneration" in done.stdout
    assert "text_decoder: 2 layers (model.layers.N, text_config.num_hidden_layers)" in done.stdout
    assert "vision_tower: 3 layers (visual.blocks.N, vision_config.depth)" in done.stdout
    assert "multi_modal_projector: no layers" in done.stdout


def test_plain_decoder_plan_imports_neither_torch_nor_transformers(tmp_path):
    """One stack that the names and config.json agree on: the plan never asks transformers."""
    code = """
import sys
from pathlib import Path
from mergesmith.plan import plan_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.sources.model import ModelInfo, TensorMeta
from mergesmith.sources.refs import parse_ref
names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
names += [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}
models = {
    k: ModelInfo(parse_ref(k, ""), Path("/x"), cfg, {n: TensorMeta((4, 4), "float32", "m") for n in names}, "safetensors")
    for k in ("a", "b")
}
recipe = {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": "a", "layer_range": [0, 3]}]}, {"sources": [{"model": "b", "layer_range": [1, 3]}]}]}
plan = plan_merge(parse_config(recipe), models)
assert plan.config_updates["num_hidden_layers"] == 5, plan.config_updates
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_tensor_no_output_takes_is_an_error():
    """Model b alone has `extra.weight` and sits in a middle slice: nothing would write it."""
    from test_plan import fake_model, llama_names

    from mergesmith.errors import MergeError
    from mergesmith.plan import plan_merge
    from mergesmith.recipe.schema import parse_config

    cfg = {"num_hidden_layers": 2}
    models = {
        "a": fake_model("a", llama_names(2), cfg),
        "b": fake_model("b", [*llama_names(2), "extra.weight"], cfg),
    }
    slices = [{"sources": [{"model": k, "layer_range": [0, 1]}]} for k in ("a", "b", "a")]
    with pytest.raises(MergeError, match=r"1 tensor\(s\) of b would be dropped: no output takes them \(extra.weight\)"):
        plan_merge(parse_config({"merge_method": "passthrough", "slices": slices}), models)


def test_default_module_is_the_single_stack():
    """mergekit's `modules: {default: ...}` on a single-stack model plans as plain `slices:` do."""
    from test_plan import fake_model, llama_names

    from mergesmith.plan import plan_merge
    from mergesmith.recipe.schema import parse_config

    cfg = {"num_hidden_layers": 4}
    models = {k: fake_model(k, llama_names(4), cfg) for k in ("a", "b")}
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [2, 4]}]},
    ]
    plain = plan_merge(parse_config({"merge_method": "passthrough", "slices": slices}), models)
    recipe = {"merge_method": "passthrough", "modules": {"default": {"slices": slices}}}
    moduled = plan_merge(parse_config(recipe), models)
    assert moduled.tensors == plain.tensors
    assert moduled.config_updates == plain.config_updates == {"num_hidden_layers": 5}
    assert plain.structure == [
        "structure from tensor names (one layer stack):",
        "  default: 4 layers (model.layers.N, num_hidden_layers)",
    ]


@pytest.mark.parametrize("family", ["llava", "t5_gated", "bert"])
def test_verify_load_uses_the_class_config_json_names(zoo, tmp_path, family):
    base, ft1, _ = zoo(family)
    merge(
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(ft1)}],
            "parameters": {"t": 0.5},
        },
        tmp_path / "out",
    )
    result = run_cli("verify", tmp_path / "out", "--load")
    assert result.exit_code == 0, result.output
    assert f"loaded {model_class(family).__name__} and ran a forward pass" in result.output
