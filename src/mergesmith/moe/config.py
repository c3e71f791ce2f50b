"""The mergekit-moe YAML schema: a base model, experts with prompts, a gate mode.

Errors name the YAML path and suggest the nearest valid key, as the `run` recipe schema does.
Checks that need no model file (expert counts, prompts) are made here, so `validate` can report
them without touching a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.recipe.leniency import Ignored, unknown_keys
from mergesmith.recipe.schema import (
    DTYPE_ALIASES,
    DTYPES,
    ModelRefLike,
    RecipeModel,
    read_yaml,
    validate_mapping,
)

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPTED_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


class ExpertSpec(RecipeModel):
    source_model: ModelRefLike
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(RecipeModel):
    base_model: ModelRefLike
    experts: list[ExpertSpec] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertSpec] | None = None
    architecture: str | None = None

    @field_validator("gate_mode")
    @classmethod
    def _gate_mode(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise ValueError(f"unknown gate mode '{v}'{did_you_mean(v, GATE_MODES)} (known: {', '.join(GATE_MODES)})")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        name = DTYPE_ALIASES.get(name, name)
        floats = sorted(DTYPES - {"int64"})
        if name not in floats:
            raise ValueError(f"unknown dtype '{v}'{did_you_mean(name, floats)} (known: {', '.join(floats)})")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        n = len(self.experts)
        if not 1 <= self.experts_per_token <= n:
            raise ValueError(
                f"experts_per_token must be between 1 and the number of experts ({n}), got {self.experts_per_token}"
            )
        if self.gate_mode in PROMPTED_MODES:
            groups = [("experts", self.experts), ("shared_experts", self.shared_experts or [])]
            missing = [f"{key}[{i}]" for key, group in groups for i, e in enumerate(group) if not e.positive_prompts]
            if missing:
                raise ValueError(
                    f"gate_mode '{self.gate_mode}' routes by prompts, but {', '.join(missing)} has no positive_prompts;"
                    " add prompts or use gate_mode 'random' / 'uniform_random'"
                )
            prompts = {
                tuple(e.positive_prompts or ()) + ("\0",) + tuple(e.negative_prompts or ()) for e in self.experts
            }
            if n > 1 and len(prompts) == 1:
                raise ValueError("every expert has the same prompts, so the router could not tell them apart")
        return self


def parse_moe_config(data: Any, source: str = "config") -> MoEConfig:
    return validate_mapping(MoEConfig, data, source, "an MoE config")


def load_moe_config(path: str | Path) -> tuple[MoEConfig, str]:
    """Parse an MoE config file; returns the config and its raw text (kept verbatim in the output)."""
    data, text = read_yaml(path)
    return parse_moe_config(data, str(path)), text


def is_moe_config(data: Any) -> bool:
    """True for a mergekit-moe document (it has `experts`, and no `merge_method`)."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def moe_ignored(path: str | Path) -> list[Ignored]:
    """The keys of an MoE config that mergekit-moe ignores (none when it does not parse)."""
    try:
        config, _ = load_moe_config(path)
    except MergeError:
        return []
    return list(unknown_keys(config))
