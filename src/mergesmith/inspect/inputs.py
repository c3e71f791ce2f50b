"""What to inspect: a base, its task models in order, the density each model's tensors get, and
optionally a finished merge; from a recipe (`inspect RECIPE`) or a list (`inspect --base B MODEL...`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.sources.model import ModelInfo, load_model_info
from mergesmith.sources.refs import ModelRef, parse_ref


@dataclass
class Subject:
    base: ModelInfo
    models: list[ModelInfo]  # the task models, in recipe (or command-line) order
    merged: ModelInfo | None = None
    densities: dict[tuple[str, str], float] = field(default_factory=dict)  # (model key, tensor) -> density
    default_density: float | None = None
    method: str | None = None

    def density(self, model: ModelInfo, tensor: str) -> float | None:
        return self.densities.get((model.ref.key, tensor), self.default_density)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _load(ref: ModelRef, cache_dir: str | None) -> ModelInfo:
    return load_model_info(ref, cache_dir)


def from_models(
    base: str, models: list[str], *, merged: str | None, density: float | None, cache_dir: str | None
) -> Subject:
    """`inspect --base B MODEL...`: every model is a task model of B; `--density` for all of them."""
    if not models:
        raise MergeError("give the task models to compare with the base: inspect --base BASE MODEL...", "MODEL")
    base_info = _load(parse_ref(base, "--base"), cache_dir)
    infos = [_load(parse_ref(m, f"MODEL {m}"), cache_dir) for m in models]
    merged_info = _load(parse_ref(merged, "--merged"), cache_dir) if merged else None
    return Subject(base_info, infos, merged_info, default_density=density)


def from_recipe(
    path: str | Path, *, base: str | None, merged: str | None, density: float | None, cache_dir: str | None
) -> Subject:
    """`inspect RECIPE`: the recipe's models against its `base_model` (or `--base`), each tensor at the
    density the recipe gives it (planned exactly as `mergesmith run` would), unless `--density`."""
    from mergesmith.methods.registry import get_method
    from mergesmith.plan import plan_merge, referenced_models
    from mergesmith.recipe.schema import load_config

    config, _ = load_config(path)
    method = get_method(config.merge_method)
    refs = referenced_models(config)
    if base is not None:
        base_ref = parse_ref(base, "--base")
    elif config.base_model is not None:
        base_ref = parse_ref(config.base_model, "base_model")
    else:
        raise MergeError(
            "inspect compares task vectors with a base model and the recipe has no base_model; give --base",
            f"{path}: base_model",
        )
    infos = {ref.key: _load(ref, cache_dir) for ref in refs}
    if base_ref.key not in infos:
        infos[base_ref.key] = _load(base_ref, cache_dir)
    models = [infos[r.key] for r in refs if r.key != base_ref.key]
    if not models:
        raise MergeError("the recipe names no model besides the base", f"{path}: models")
    subject = Subject(infos[base_ref.key], models, default_density=density, method=method.name)
    if merged:
        subject.merged = _load(parse_ref(merged, "--merged"), cache_dir)
    if density is None and "density" in method.per_model_params and "density" not in method.inert:
        plan = plan_merge(config, infos)
        for t in plan.tensors:
            for x, d in zip(t.others, t.per_model.get("density", ()), strict=False):
                subject.densities.setdefault((x.model, x.name), float(d))
    return subject
