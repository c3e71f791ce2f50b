"""mergekit's old-style command line (`mergekit-legacy`), turned into a `models:` recipe.

The models are the `--merge` models, then the base model when it is not one of them. A single
`--weight` or `--density` is given to every model; otherwise the values go to the models in order.
For slerp the single weight is the interpolation factor `t`. Parameters the method does not take
(`normalize` for slerp, `int8_mask` for linear) are left out, so the recipe runs without warnings.
"""

from __future__ import annotations

from typing import Any

from mergesmith.errors import MergeError
from mergesmith.methods.registry import get_method


def legacy_recipe(
    merge: list[str],
    *,
    base_model: str | None = None,
    weight: list[float] | None = None,
    density: list[float] | None = None,
    method: str = "ties",
    normalize: bool = True,
    int8_mask: bool = False,
    bf16: bool = True,
) -> dict[str, Any]:
    if not merge:
        raise MergeError("give at least one model with --merge", "--merge")
    m = get_method(method, "--method")
    names = list(merge) + ([base_model] if base_model and base_model not in merge else [])
    models: list[dict[str, Any]] = [{"model": name, "parameters": {}} for name in names]
    parameters: dict[str, Any] = {}
    if density:
        _spread(models, "density", density, "--density")
    if m.name == "slerp":
        if weight and len(weight) != 1:
            raise MergeError(f"slerp takes exactly one --weight (its t), got {len(weight)}", "--weight")
        if weight:
            parameters["t"] = weight[0]
    elif weight:
        _spread(models, "weight", weight, "--weight")
    if int8_mask and "int8_mask" in m.params:
        parameters["int8_mask"] = True
    if "normalize" in m.params:
        parameters["normalize"] = normalize
    recipe: dict[str, Any] = {"merge_method": m.name}
    if base_model:
        recipe["base_model"] = base_model
    recipe["models"] = [
        {"model": e["model"], **({"parameters": e["parameters"]} if e["parameters"] else {})} for e in models
    ]
    if parameters:
        recipe["parameters"] = parameters
    if bf16:
        recipe["dtype"] = "bfloat16"
    return recipe


def _spread(models: list[dict[str, Any]], key: str, values: list[float], flag: str) -> None:
    """One value for every model, or one per model in order (the base may be left out)."""
    if len(values) == 1:
        values = values * len(models)
    if len(values) > len(models):
        raise MergeError(f"{len(values)} values for {len(models)} models", flag)
    for entry, value in zip(models, values, strict=False):
        entry["parameters"][key] = value
