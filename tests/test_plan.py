"""The planner as a pure function: metadata in, output tensors out; no tensor is read."""

from __future__ import annotations

from pathlib import Path

from mergesmith.plan import plan_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.sources.model import ModelInfo, TensorMeta
from mergesmith.sources.refs import parse_ref


def fake_model(name: str, names: list[str], config: dict | None = None) -> ModelInfo:
    ref = parse_ref(name, "test")
    tensors = {n: TensorMeta((4, 4), "bfloat16", "model.safetensors") for n in names}
    return ModelInfo(
        ref=ref, directory=Path("/nonexistent"), config=config or {}, tensors=tensors, format="safetensors"
    )


def llama_names(layers: int, prefix: str = "model") -> list[str]:
    names = [f"{prefix}.embed_tokens.weight"]
    for i in range(layers):
        names += [f"{prefix}.layers.{i}.self_attn.q_proj.weight", f"{prefix}.layers.{i}.mlp.up_proj.weight"]
    return names + [f"{prefix}.norm.weight", "lm_head.weight"]


def test_two_layer_stacks_keep_their_names():
    names = llama_names(2) + ["vision.blocks.0.attn.weight", "vision.blocks.1.attn.weight"]
    models = {k: fake_model(k, names) for k in ("a", "b")}
    config = parse_config(
        {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1}}
    )
    plan = plan_merge(config, models)
    assert sorted(t.name for t in plan.tensors) == sorted(names)
    assert all(x.name == t.name for t in plan.tensors for x in t.inputs)


def test_frankenmerge_renumbers_and_sets_t_per_slice():
    layer_types = ["full", "sliding", "full", "sliding"]
    cfg = {"num_hidden_layers": 4, "layer_types": layer_types}
    models = {"a": fake_model("a", llama_names(4), cfg), "b": fake_model("b", llama_names(4), cfg)}
    config = parse_config(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 3]}]},
                {"sources": [{"model": "b", "layer_range": [1, 4]}], "parameters": {"scale": [0.0, 1.0]}},
            ],
        }
    )
    plan = plan_merge(config, models)
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.4.mlp.up_proj.weight"].inputs[0].name == "model.layers.2.mlp.up_proj.weight"
    assert by_name["model.layers.4.mlp.up_proj.weight"].inputs[0].model == "b"
    # scale is a gradient over the second slice only: layers 3, 4, 5 get 0, 0.5, 1.
    assert [by_name[f"model.layers.{i}.mlp.up_proj.weight"].per_model["scale"] for i in (3, 4, 5)] == [
        (0.0,),
        (0.5,),
        (1.0,),
    ]
    # Embeddings come from the first slice, the final norm and lm_head from the last.
    assert by_name["model.embed_tokens.weight"].inputs[0].model == "a"
    assert by_name["lm_head.weight"].inputs[0].model == "b"
    assert plan.config_updates["num_hidden_layers"] == 6
    assert plan.config_updates["layer_types"] == ["full", "sliding", "full", "sliding", "full", "sliding"]
    assert plan.bytes_written == len(plan.tensors) * 4 * 4 * 2


def test_describe_lists_inputs_and_parameters():
    models = {k: fake_model(k, llama_names(1)) for k in ("base", "x")}
    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": "x", "parameters": {"weight": 0.5, "density": 0.3}}],
        }
    )
    lines = plan_merge(config, models).describe()
    assert lines[0].startswith("model.embed_tokens.weight [4, 4] bfloat16 <- ties(x:model.embed_tokens.weight, base ")
    assert "weight=[0.5]" in lines[0] and "density=[0.3]" in lines[0]
