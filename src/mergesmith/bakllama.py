"""bakllama: a layer-stacking config (`layer_slices` of model, start, end, scale) as a passthrough recipe.

`layer_slices[i]` becomes one output slice with layers [start, end) of `model`, scaled by `scale`.
The embeddings come from the first slice's model and the final norm and lm_head from the last, as in
any passthrough recipe, unless `embedding_source` or `lm_head_source` names another model: mergekit
accepts those keys and ignores them; here they are honoured by re-pointing those tensors of the plan
(copied unscaled from the named model).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesmith.errors import MergeError
from mergesmith.plan import InputTensor, Plan
from mergesmith.recipe.schema import MergeConfig, parse_config, validation_error_to_merge_error
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.refs import ModelRef, parse_ref

log = logging.getLogger("mergesmith")


class LayerSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    start: int
    end: int
    scale: float | None = None


class BakllamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layer_slices: list[LayerSlice]
    embedding_source: str | None = None
    lm_head_source: str | None = None


def load_bakllama(path: str | Path) -> BakllamaConfig:
    from mergesmith.recipe.schema import load_yaml

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise MergeError("a bakllama config must be a YAML mapping", str(path))
    try:
        config = BakllamaConfig.model_validate(data)
    except ValidationError as err:
        raise validation_error_to_merge_error(err, BakllamaConfig, str(path)) from None
    if not config.layer_slices:
        raise MergeError("layer_slices is empty", str(path))
    return config


def bakllama_recipe(config: BakllamaConfig, dtype: str | None = None) -> dict[str, Any]:
    slices = []
    for s in config.layer_slices:
        source: dict[str, Any] = {"model": s.model, "layer_range": [s.start, s.end]}
        if s.scale is not None:
            source["parameters"] = {"scale": s.scale}
        slices.append({"sources": [source]})
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        recipe["dtype"] = dtype
    return recipe


def extra_refs(config: BakllamaConfig) -> dict[str, ModelRef]:
    out = {}
    for key in ("embedding_source", "lm_head_source"):
        value = getattr(config, key)
        if value is not None:
            out[key] = parse_ref(value, key)
    return out


def retarget(plan: Plan, models: dict[str, ModelInfo], sources: dict[str, ModelRef]) -> Plan:
    """The plan with its embedding tensors taken from `embedding_source` and lm_head from `lm_head_source`."""
    tensors = []
    warnings = list(plan.warnings)
    if "lm_head_source" in sources and not any(arch.is_lm_head(t.name) for t in plan.tensors):
        warnings.append("lm_head_source is ignored: the output ties lm_head to its embeddings")
    for t in plan.tensors:
        key = None
        if arch.parse_layer_name(t.name) is None:
            if arch.is_lm_head(t.name):
                key = "lm_head_source"
            elif arch.is_pre_weight(t.name):
                key = "embedding_source"
        ref = sources.get(key) if key else None
        if ref is None:
            tensors.append(t)
            continue
        info = models[ref.key]
        name = t.name if t.name in info.tensors else None
        if name is None and key == "lm_head_source":
            name = arch.embedding_for_lm_head(info.tensors)  # a tied model's head is its embedding
        if name is None:
            raise MergeError(f"{ref} has no tensor '{t.name}'", key)
        meta = info.tensors[name]
        if meta.shape != t.shape:
            raise MergeError(
                f"{ref}'s '{name}' has shape {list(meta.shape)}, the merge needs {list(t.shape)}", key or ""
            )
        per_model = {k: (1.0,) for k in t.per_model}
        tensors.append(
            dataclasses.replace(t, inputs=(InputTensor(ref.key, name, meta.shape, meta.dtype),), per_model=per_model)
        )
    return dataclasses.replace(plan, tensors=tensors, warnings=warnings)


def run_bakllama(config: BakllamaConfig, out: str | Path, options: Any, dtype: str | None = None) -> Any:
    """Plan the passthrough recipe, re-point embeddings/lm_head, write atomically; returns a MergeSummary."""
    from mergesmith.merge import run_merge
    from mergesmith.sources.model import load_model_info

    recipe = bakllama_recipe(config, dtype)
    merge_config: MergeConfig = parse_config(recipe, "layer_slices")
    text = yaml.safe_dump(recipe, sort_keys=False)
    sources = extra_refs(config)
    for key, ref in sources.items():
        text += f"# bakllama {key}: {ref} (applied to the plan; not a recipe key)\n"

    def retarget_sources(plan: Plan, models: dict[str, ModelInfo]) -> Plan:
        for ref in sources.values():
            if ref.key not in models:
                models[ref.key] = load_model_info(ref, options.transformers_cache)
        return retarget(plan, models, sources)

    return run_merge(merge_config, text, out, options, plan_transform=retarget_sources)
