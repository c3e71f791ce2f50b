"""What mergekit accepts and silently ignores: a warning each here, an error with `--strict`.

mergekit's configuration models ignore unknown keys at every level, and its methods read only the
parameters they declare. Published recipes are full of such keys (`int8_mask` at the top level,
`dype: float32`, `revision:` on a source, `int_space` on dare_ties), so they must run unchanged; but
a misspelled `desnity` merging silently is how broken merges get published. So every ignored key
is reported with its YAML path and, for a near miss, where it belongs. The checks read the recipe
only: no model is needed, so `validate` lists them even when a model is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.methods.registry import METHODS, MergeMethod, all_param_names, get_method
from mergesmith.recipe.schema import MergeConfig

IGNORED = "ignored, as mergekit does"


def storage_only() -> dict[str, str]:
    """Parameters some method declares as storage-only (`MergeMethod.storage_only`, e.g. `int8_mask`),
    with why. They change no value on any method, so set on any method they are a note, not a warning."""
    return {key: why for m in METHODS.values() for key, why in m.storage_only.items()}


@dataclass(frozen=True)
class Ignored:
    """One key or parameter the merge does not read. `note`s (storage-only options) never fail `--strict`."""

    where: str
    message: str
    level: Literal["warning", "note"] = "warning"

    def line(self) -> str:
        return f"{self.where}: {self.message}"


def check_recipe(config: MergeConfig) -> list[Ignored]:
    """Every key and parameter of `config` that the merge ignores, in recipe order."""
    found = list(unknown_keys(config))
    try:
        method = get_method(config.merge_method)
    except MergeError:
        return found  # the planner reports an unknown method
    return found + ignored_parameters(config, method)


def enforce(found: Iterable[Ignored], strict: bool, source: str) -> None:
    """With `--strict`, every warning is an error, listed at once before anything is read."""
    warnings = [f for f in found if f.level == "warning"]
    if strict and warnings:
        lines = "\n  ".join(f.line() for f in warnings)
        raise MergeError(f"--strict: {len(warnings)} key(s) or parameter(s) would be ignored:\n  {lines}", source)


# ---------------------------------------------------------------------------------------------
# Unknown keys


def unknown_keys(model: BaseModel, path: str = "") -> Iterator[Ignored]:
    """Keys a schema model kept as extras (schema models allow them, as mergekit's do), recursively."""
    fields = list(type(model).model_fields)
    for key in model.model_extra or {}:
        yield Ignored(_join(path, key), f"unknown key '{key}', {IGNORED}{_key_hint(str(key), fields)}")
    for name in fields:
        yield from _walk(getattr(model, name), _join(path, name))


def _walk(value: Any, path: str) -> Iterator[Ignored]:
    if isinstance(value, BaseModel):
        yield from unknown_keys(value, path)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            if isinstance(item, BaseModel):
                yield from unknown_keys(item, _join(path, str(k)))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_hint(key: str, fields: list[str]) -> str:
    near = did_you_mean(key, fields)
    if near:
        return near
    if key in all_param_names():
        return f"; '{key}' is a merge parameter: put it under 'parameters'"
    if key == "layer_range" and "layer_range" not in fields:
        return "; a layer range belongs to a slice source: use 'slices' to pick layers"
    if key == "revision":
        return "; a revision goes in the model reference: 'model: NAME@REVISION'"
    if key in MergeConfig.model_fields:
        return f"; '{key}' is a top-level recipe key"
    return ""


# ---------------------------------------------------------------------------------------------
# Parameters the method does not read


def parameter_blocks(config: MergeConfig) -> Iterator[tuple[str, Mapping[str, Any] | None, bool]]:
    """(YAML path, raw block, per-model only) for every parameter block of the recipe.

    Blocks under a model (`models[i]`, `sources[j]`, `input_model_parameters`) give per-model
    parameters only; the others give both kinds."""
    yield "parameters", config.parameters, False
    for key, block in (config.input_model_parameters or {}).items():
        yield f"input_model_parameters.{key}", block, True
    parts: list[tuple[str, Any, Any]] = [("", config.models, config.slices)]
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters, False
        parts.append((f"modules.{name}.", module.models, module.slices))
    for prefix, models, slices in parts:
        for i, m in enumerate(models or []):
            yield f"{prefix}models[{i}].parameters", m.parameters, True
        for i, s in enumerate(slices or []):
            yield f"{prefix}slices[{i}].parameters", s.parameters, False
            for j, src in enumerate(s.sources):
                yield f"{prefix}slices[{i}].sources[{j}].parameters", src.parameters, True


def ignored_parameters(config: MergeConfig, method: MergeMethod) -> list[Ignored]:
    found: list[Ignored] = []
    notes = storage_only()
    for where, block, per_model_only in parameter_blocks(config):
        for key, value in (block or {}).items():
            path = f"{where}.{key}"
            param = method.params.get(key)
            if key in notes:  # on any method: it changes no value anywhere
                found.append(Ignored(path, f"'{key}' has no effect here: {notes[key]}", "note"))
                continue
            if param is None:
                found.append(
                    Ignored(path, f"unknown parameter '{key}' for {method.name}, {IGNORED}{_param_hint(key, method)}")
                )
                continue
            if key in method.inert:
                found.append(Ignored(path, f"'{key}' has no effect on {method.name}, {IGNORED}: {method.inert[key]}"))
            elif per_model_only and not param.per_model:
                found.append(
                    Ignored(
                        path,
                        f"'{key}' takes one value per tensor, not per model: set here it is {IGNORED};"
                        f" put it under 'parameters' (or a slice's)",
                    )
                )
            found += _entry_keys(value, path)
    return found


def _param_hint(key: str, method: MergeMethod) -> str:
    near = did_you_mean(key, method.params)
    if near:
        return near
    owners = sorted(m.name for m in METHODS.values() if key in m.params)
    if key in MergeConfig.model_fields:
        return f"; '{key}' is a top-level recipe key, not a parameter"
    if 0 < len(owners) <= 3:
        return f"; it is a parameter of {', '.join(owners)}"
    return f" ({method.name} takes: {', '.join(method.params) or 'no parameters'})"


def _entry_keys(value: Any, path: str) -> list[Ignored]:
    """Keys of `{filter, value}` entries other than those two (mergekit's model drops them)."""
    entries = (
        [(path, value)]
        if isinstance(value, dict)
        else [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, list)
        else []
    )
    found = []
    for where, entry in entries:
        if isinstance(entry, dict):
            for key in entry:
                if key not in ("filter", "value"):
                    hint = did_you_mean(str(key), ["filter", "value"])
                    found.append(Ignored(f"{where}.{key}", f"unknown key '{key}' in a filtered value, {IGNORED}{hint}"))
    return found
