"""The search genome (mergekit-evolve's format, SPEC section 7) and the genotype -> recipe decoding.

A genotype is a float array: first one value per layer group, searched model, filter (the last
entry is the unfiltered default) and searched per-model parameter (`weight`, then whichever of
`density`, `gamma`, `epsilon` the method reads: a parameter the method declares inert, like
`task_arithmetic`'s `density`, gets no gene), shape `(groups, models, len(filters) + 1, params)`;
then the global genes: `lambda` (`search_lambda`), LiNeS' `alpha` and `beta` (`search_lines`).
Every gene has search bounds (`Genome.bounds`): the optimisers start at their centre and step a
fraction of their width. Decoding is pure: it returns a plain recipe mapping that `mergesmith run`
accepts, with every value rounded so the recipe written to disk is exactly the one that was scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergesmith.errors import MergeError
from mergesmith.recipe.schema import validation_error_to_merge_error
from mergesmith.search.fitness import AGGREGATIONS, DEFAULT

#: Per-model parameters the genome searches, in genotype order, with their decoding bounds.
SEARCHED = {"weight": (0.0, math.inf), "density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 0.5)}
#: Where the optimisers look, per gene (weights in [-1, 1] with `allow_negative_weights`).
BOUNDS = {
    "weight": (0.0, 1.0),
    "density": (0.0, 1.0),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.2),
    "lambda": (0.0, 2.0),
    "lines_alpha": (0.0, 1.5),
    "lines_beta": (0.0, 1.5),
}
DIGITS = 6  # decoded values are rounded: the recipe on disk is the recipe that was scored


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenomeDefinition(_Strict):
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False
    dtype: str = "bfloat16"  # mergesmith extension: mergekit-evolve always merges in bfloat16
    search_lambda: bool = False  # mergesmith extension: one more gene, the method's global `lambda`
    search_lines: bool = False  # mergesmith extension: two more genes, LiNeS' alpha and beta (`post:`)


class TaskDefinition(_Strict):
    name: str | None = None
    path: str | None = None
    python: str | None = None  # mergesmith extension: "module:factory" returning a Task
    args: dict[str, Any] | None = None  # keyword arguments for the python factory
    weight: float = 1.0
    metric: str | None = None  # default: "acc,none" for eval tasks, the only metric of a python task


class SearchDefinition(_Strict):
    genome: GenomeDefinition
    tasks: list[TaskDefinition] = Field(min_length=1)
    fitness: Literal[AGGREGATIONS] = DEFAULT  # mergesmith extension: how task scores combine (search/fitness.py)
    # accepted from mergekit-evolve's format and passed to the eval adapter
    limit: int | None = None
    num_fewshot: int | None = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True


def load_search_definition(path: str | Path) -> SearchDefinition:
    from mergesmith.recipe.schema import load_yaml

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise MergeError(f"a genome file must be a YAML mapping, got {type(data).__name__}", str(path))
    try:
        return SearchDefinition.model_validate(data)
    except ValidationError as err:
        raise validation_error_to_merge_error(err, SearchDefinition, str(path)) from None


@dataclass(frozen=True)
class Genome:
    """A validated genome: which models and parameters are searched, and over how many layer groups."""

    definition: GenomeDefinition
    num_layers: int
    params: tuple[str, ...]
    searched_models: tuple[str, ...]

    @classmethod
    def build(cls, definition: GenomeDefinition, num_layers: int) -> Genome:
        """Check the genome against the registry and the models' layer count; raises MergeError."""
        from mergesmith.methods.registry import METHODS, get_method

        d = definition
        method = get_method(d.merge_method, "genome.merge_method")
        if method.name == "slerp":
            params: tuple[str, ...] = ("weight",)
            if len(d.models) < 2:
                raise MergeError("slerp needs at least two models to choose from", "genome.models")
            if d.smooth:
                raise MergeError("smooth is not supported with slerp (each layer group picks two models)", "genome")
        else:
            per_model = method.per_model_params
            if "weight" not in per_model and not (d.search_lambda or d.search_lines):
                searchable = sorted(n for n, m in METHODS.items() if "weight" in m.per_model_params) + ["slerp"]
                raise MergeError(
                    f"{method.name} has no per-model weights to search (searchable: {', '.join(searchable)};"
                    " or set search_lambda / search_lines for a method with a lambda)",
                    "genome.merge_method",
                )
            params = tuple(p for p in SEARCHED if p in per_model and p not in method.inert)
        if method.base == "required" and d.base_model is None and method.name != "slerp":
            raise MergeError(f"{method.name} needs a base_model", "genome.base_model")
        if d.search_lambda and "lambda" not in method.global_params:
            raise MergeError(f"{method.name} has no 'lambda' to search", "genome.search_lambda")
        if d.search_lines and "lambda" not in method.global_params:
            raise MergeError(f"LiNeS scales a merged task vector; {method.name} has none", "genome.search_lines")
        if d.layer_granularity < 0:
            raise MergeError("layer_granularity must be 0 (one group) or a positive layer count", "genome")
        if d.layer_granularity > 0 and num_layers % d.layer_granularity != 0:
            raise MergeError(
                f"layer_granularity {d.layer_granularity} does not divide the models' {num_layers} layers"
                f" (try one of {', '.join(str(k) for k in range(1, num_layers + 1) if num_layers % k == 0)})",
                "genome.layer_granularity",
            )
        uses_base = method.base != "input" and method.name != "slerp"
        models = tuple(m for m in d.models if not (uses_base and m == d.base_model))
        if not models:
            raise MergeError("no models to merge besides the base model", "genome.models")
        return cls(d, num_layers, params, models)

    @property
    def granularity(self) -> int:
        g = self.definition.layer_granularity
        return self.num_layers if g <= 0 else g

    @property
    def shape(self) -> tuple[int, int, int, int]:
        groups = self.num_layers // self.granularity
        return (groups, len(self.searched_models), len(self.definition.filters or []) + 1, len(self.params))

    @property
    def global_genes(self) -> tuple[str, ...]:
        d = self.definition
        return (("lambda",) if d.search_lambda else ()) + (("lines_alpha", "lines_beta") if d.search_lines else ())

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) + len(self.global_genes)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's search range (`BOUNDS`), in genotype order: (lows, highs)."""
        lo, hi = np.empty(self.shape), np.empty(self.shape)
        for k, p in enumerate(self.params):
            lo[..., k], hi[..., k] = BOUNDS[p]
            if p == "weight" and self.definition.allow_negative_weights:
                lo[..., k] = -1.0
        extra = [BOUNDS[g] for g in self.global_genes]
        lows = np.concatenate([lo.ravel(), [b[0] for b in extra]])
        highs = np.concatenate([hi.ravel(), [b[1] for b in extra]])
        return lows, highs

    def initial(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """The centre of every gene's bounds (uniform in them with `random_init`). Signed weights
        start at 0.5, not at their centre 0: a merge of zero weights is no merge at all."""
        lows, highs = self.bounds()
        if rng is not None:
            return rng.uniform(lows, highs)
        x = (lows + highs) / 2
        if self.definition.allow_negative_weights and "weight" in self.params:
            w = np.zeros(self.shape, dtype=bool)
            w[..., self.params.index("weight")] = True
            x[: w.size][w.ravel()] = 0.5
        return x

    def decode_values(self, flat: np.ndarray) -> np.ndarray:
        """Genes -> parameter values: |x| (weights keep their sign if allowed), clamped to each bound."""
        x = np.asarray(flat, dtype=np.float64)[: int(np.prod(self.shape))].reshape(self.shape)
        out = np.empty_like(x)
        for k, p in enumerate(self.params):
            lo, hi = SEARCHED[p]
            v = x[..., k]
            if p == "weight" and self.definition.allow_negative_weights:
                out[..., k] = v
            else:
                out[..., k] = np.clip(np.abs(v), lo, hi)
        return np.round(out, DIGITS)

    def decode(self, flat: np.ndarray) -> dict[str, Any]:
        """The recipe (a plain `mergesmith run` mapping) for one genotype."""
        d = self.definition
        values = self.decode_values(flat)
        if d.merge_method == "slerp":
            body = self._slerp(values)
        elif self.shape[0] == 1 or d.smooth:
            models = self.searched_models
            body = {"models": [self._entry(m, self._model_params(values, i)) for i, m in enumerate(models)]}
        else:
            body = {"slices": [self._slice(values, g) for g in range(self.shape[0])]}
        recipe: dict[str, Any] = {"merge_method": d.merge_method, **body}
        if d.base_model is not None and d.merge_method != "slerp":
            recipe["base_model"] = d.base_model
        normalize = d.normalize
        if normalize is None and d.merge_method in ("linear", "ties", "dare_ties"):
            normalize = True
        from mergesmith.methods.registry import get_method

        globals_ = get_method(d.merge_method).global_params
        parameters: dict[str, Any] = {}
        if normalize is not None and "normalize" in globals_:
            parameters["normalize"] = normalize
        genes = dict(
            zip(self.global_genes, np.asarray(flat, dtype=np.float64)[int(np.prod(self.shape)) :], strict=True)
        )
        if "lambda" in genes:
            parameters["lambda"] = round(abs(float(genes["lambda"])), DIGITS)
        if parameters:
            recipe["parameters"] = parameters
        if "lines_alpha" in genes:
            alpha, beta = (round(abs(float(genes[g])), DIGITS) for g in ("lines_alpha", "lines_beta"))
            recipe["post"] = [{"lines": {"alpha": alpha, "beta": beta}}]
        recipe["dtype"] = d.dtype
        if d.tokenizer_source is not None:
            recipe["tokenizer_source"] = d.tokenizer_source
        return recipe

    def _value(self, values: np.ndarray, model: int, p: int, group: int | None) -> Any:
        filters = self.definition.filters or []

        def one(f: int) -> Any:
            if group is None:  # smooth: a gradient over the layer groups
                col = [float(v) for v in values[:, model, f, p]]
                return col[0] if len(col) == 1 else col
            return float(values[group, model, f, p])

        if not filters:
            return one(0)
        return [{"filter": flt, "value": one(f)} for f, flt in enumerate(filters)] + [{"value": one(len(filters))}]

    @staticmethod
    def _entry(model: str, params: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"model": model, **more, **({"parameters": params} if params else {})}

    def _model_params(self, values: np.ndarray, model: int, group: int | None = None) -> dict[str, Any]:
        return {p: self._value(values, model, k, group) for k, p in enumerate(self.params)}

    def _slice(self, values: np.ndarray, group: int) -> dict[str, Any]:
        g = self.granularity
        rng = [group * g, (group + 1) * g]
        sources = [
            self._entry(m, self._model_params(values, i, group), layer_range=list(rng))
            for i, m in enumerate(self.searched_models)
        ]
        base = self.definition.base_model
        if base is not None and base not in self.searched_models:
            sources.append({"model": base, "layer_range": list(rng)})
        return {"sources": sources}

    def _slerp(self, values: np.ndarray) -> dict[str, Any]:
        """Per layer group, the two largest weights: base = the largest, t = softmax(top two)[1]."""
        g = self.granularity
        slices = []
        for group in range(self.shape[0]):
            w = values[group, :, -1, 0]
            order = sorted(range(len(w)), key=lambda i: (-w[i], i))
            a, b = order[0], order[1]
            t = round(1.0 / (1.0 + math.exp(w[a] - w[b])), DIGITS)
            rng = [group * g, (group + 1) * g]
            ma, mb = self.searched_models[a], self.searched_models[b]
            slices.append(
                {
                    "sources": [{"model": ma, "layer_range": list(rng)}, {"model": mb, "layer_range": list(rng)}],
                    "base_model": ma,
                    "parameters": {"t": t},
                }
            )
        return {"slices": slices}
