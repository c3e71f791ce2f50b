"""Declaring merge methods: the function is the declaration.

A merge method is a plain function on float32 tensors::

    @merge_method("nearswap", base="required", models=(1, 1), paper=..., summary=...)
    def nearswap(xs: list[Tensor], base: Tensor, *, t: float = REQUIRED) -> Tensor:
        ...

- `xs` are the non-base inputs (in recipe order), `base` the base model's tensor (or None).
  Both are float32 tensors owned by the call: a method may overwrite them in place.
- Keyword-only parameters are the method's recipe parameters. Their annotation gives the type a
  recipe value is coerced to (`float`, `bool`, `int`); `PerModel` marks a per-model parameter,
  passed as a list aligned with `xs`. A default of `REQUIRED` makes it mandatory. A trailing
  underscore is dropped from the recipe name (`lambda_` is the recipe's `lambda`).
- A keyword-only parameter named `rng` receives a `TensorRNG` keyed by (seed, tensor name), for
  methods that draw random masks.
- A method declared with `observes` (below) takes a keyword-only `stream` (`methods.stream.Stream`):
  the engine calls it on each row chunk, `stream` None for a whole tensor. On the CPU the engine
  may give the task-vector family the files' raw values (`kernels.Raw`) when its observation can
  run on them (`Observation.fusable`).

The decorator also declares the method's shape, from which the engine picks how to run it (it
never names a method or a parameter):
- `elementwise`: output element j depends only on input elements j, so row chunks merge alike
  (True, or a predicate on the resolved parameters: task_arithmetic is, unless it prunes);
- `identity`: a predicate on the parameters under which the output is the single input unchanged
  (passthrough unscaled): the engine may copy the input file's bytes;
- `whole_when`: a predicate giving why, with these parameters, a streaming method needs whole
  tensors (None: it streams), so `mergesmith validate` can say so before a merge;
- `observes`: what the method needs of the whole tensor before it merges a chunk, a factory of an
  `Observation` (`methods.stream.Observes`) from its arguments, RNG and count of inputs; the engine
  feeds it every chunk and passes it finished as `stream.seen` (observe-then-apply). Any other
  method gets whole tensors;
- `joins`: its inputs are consecutive blocks of the output (joined along an axis), not aligned
  with it, so the engine gives it whole inputs and never fits their shapes to the output's.

A method declared `internal` is planned by a command (`mergesmith moe`), never named by a recipe:
it lives in `INTERNAL`, not in the catalogue `METHODS` that recipes, `mergesmith methods` and
the search read, and recipes naming it are refused.

The engine does loading, slicing, dtype, device and memory; a method only does the maths.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.methods.stream import Observation, Observes

#: A method's parameters for one tensor, recipe-named and resolved: globals, per-model lists.
Params = dict[str, Any]


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()

#: Annotation of a per-model parameter: the method receives one float per entry of `xs`.
PerModel = Annotated[list[float], "per-model"]

BaseRole = Literal["required", "optional", "input"]
"""How a method treats `base_model`:
required: must be given, passed as `base`; optional: passed as `base` when given;
input: no special role, a listed or appended base is just one more entry of `xs` (linear, karcher).
"""


@dataclass(frozen=True)
class Param:
    name: str  # as written in recipes
    arg: str  # the function's argument name (`lambda_` for `lambda`)
    type: type
    default: Any
    per_model: bool

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Recipe values are numbers (mergekit turns every scalar into a float, `true` into 1.0)."""
        if isinstance(value, bool | int | float):
            if self.type is bool:
                return bool(value)
            if self.type is int:
                return int(value)
            return float(value)
        raise MergeError(f"parameter '{self.name}' must be a number, got {value!r}", where)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Any]
    params: dict[str, Param]
    base: BaseRole
    models: tuple[int, int | None]  # allowed count of non-base inputs (min, max or None)
    summary: str
    paper: str | None = None
    pretty: str = ""
    uses_rng: bool = False
    # What it needs of the whole tensor (`methods.stream.Observes`): observe-then-apply, in row chunks.
    observes: Observes | None = field(default=None, repr=False)
    formula: str = field(default="", repr=False)
    # Parameters accepted (declared, as mergekit declares them) but without effect, with why.
    inert: dict[str, str] = field(default_factory=dict)
    # Statistics of the models it needs (`calibration`: "gram", "fisher"), passed as `stats`, or None.
    calibration: str | None = None
    # The shape (see the module docstring): when chunks merge alike, when it is a copy, when whole.
    elementwise_when: Callable[[Params], bool] | None = field(default=None, repr=False)
    identity_when: Callable[[Params], bool] | None = field(default=None, repr=False)
    whole_when: Callable[[Params], str | None] | None = field(default=None, repr=False)
    joins: bool = False
    internal: bool = False

    @property
    def streams(self) -> bool:
        """Whether it observes then applies (the engine may then run it in row chunks)."""
        return self.observes is not None

    def observation(self, params: Params, rng: Any, count: int) -> Observation | None:
        """Its `Observation` of a tensor of `count` non-base inputs, with `params` (None: nothing)."""
        assert self.observes is not None
        args = {p.arg: p.default for p in self.params.values() if not p.required}
        return self.observes({**args, **self._kwargs(params)}, rng, count)

    def elementwise(self, params: Params) -> bool:
        """Whether, with `params`, row chunks of a tensor merge alike (element j from elements j)."""
        return self.elementwise_when is not None and self.elementwise_when(params)

    def identity(self, params: Params) -> bool:
        """Whether, with `params`, the output is the single input unchanged."""
        return self.identity_when is not None and self.identity_when(params)

    def whole_reason(self, params: Params) -> str | None:
        """Why, with `params`, this method needs whole tensors (None: it streams or is element-wise)."""
        if self.elementwise(params):
            return None
        if not self.streams:
            return f"{self.name} takes whole tensors"
        return self.whole_when(params) if self.whole_when is not None else None

    # Parameters declared only for mergekit's storage (no value changes anywhere), with why: notes.
    storage_only: dict[str, str] = field(default_factory=dict)

    @property
    def global_params(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if not p.per_model}

    @property
    def per_model_params(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if p.per_model}

    # The same merge over raw values by a compiled kernel (`fused`), or None: see `fused_variant`.
    fused: Callable[..., None] | None = None

    def __call__(
        self,
        xs: Sequence[Any],
        base: Any,
        params: dict[str, Any],
        rng: Any = None,
        stream: Any = None,
        stats: Sequence[Any] | None = None,
    ) -> Any:
        """Apply to tensors with recipe-named, already resolved `params`."""
        kwargs = self._kwargs(params)
        if self.calibration is not None:
            if stats is None:
                raise MergeError(f"{self.name} needs calibration statistics; this merge path has none")
            kwargs["stats"] = list(stats)
        if self.uses_rng:
            kwargs["rng"] = rng
        if stream is not None:
            kwargs["stream"] = stream
        return self.fn(list(xs), base, **kwargs)

    def call_fused(self, out: Any, xs: Sequence[Any], base: Any, params: dict[str, Any]) -> None:
        """The fused variant on raw values (`kernels.Raw`): writes `out`."""
        assert self.fused is not None
        self.fused(out, list(xs), base, **self._kwargs(params))

    def _kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        return {self.params[k].arg: v for k, v in params.items() if k in self.params}


METHODS: dict[str, MergeMethod] = {}  # the catalogue: what recipes may name
INTERNAL: dict[str, MergeMethod] = {}  # planned by commands only (see the module docstring)


def merge_method(
    name: str,
    *,
    summary: str,
    base: BaseRole = "optional",
    models: tuple[int, int | None] = (1, None),
    paper: str | None = None,
    pretty: str | None = None,
    inert: dict[str, str] | None = None,
    calibration: str | None = None,
    elementwise: bool | Callable[[Params], bool] = False,
    identity: Callable[[Params], bool] | None = None,
    whole_when: Callable[[Params], str | None] | None = None,
    storage_only: dict[str, str] | None = None,
    observes: Observes | None = None,
    joins: bool = False,
    internal: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as merge method `name`; its keyword-only parameters are the recipe's, the
    other keywords its shape (module docstring)."""
    elementwise_when = (lambda params: True) if elementwise is True else (elementwise or None)

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        params: dict[str, Param] = {}
        uses_rng = takes_stream = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "rng":
                uses_rng = True
                continue
            if p.name == "stream":
                takes_stream = True
                continue
            if p.name == "stats":
                continue
            hint = _hint(fn, p)
            per_model = hint == PerModel
            typ = float if per_model else hint
            if typ not in (float, bool, int):
                raise TypeError(f"{fn.__name__}: parameter {p.name} must be float, bool, int or PerModel")
            default = REQUIRED if p.default is inspect.Parameter.empty else p.default
            recipe_name = p.name.rstrip("_")  # `lambda_` is the recipe's `lambda`
            params[recipe_name] = Param(recipe_name, p.name, typ, default, per_model)
        if takes_stream != (observes is not None):
            raise TypeError(f"{fn.__name__}: a method takes `stream` exactly when it declares `observes`")
        method = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            base=base,
            models=models,
            summary=summary,
            paper=paper,
            pretty=pretty or name.replace("_", " ").title(),
            uses_rng=uses_rng,
            observes=observes,
            formula=inspect.cleandoc(fn.__doc__ or ""),
            inert=dict(inert or {}),
            calibration=calibration,
            elementwise_when=elementwise_when,
            identity_when=identity,
            whole_when=whole_when,
            storage_only=dict(storage_only or {}),
            joins=joins,
            internal=internal,
        )
        if undeclared := set(method.storage_only) - set(params):
            raise TypeError(f"{fn.__name__}: storage_only names undeclared parameters {sorted(undeclared)}")
        if name in METHODS or name in INTERNAL:
            raise ValueError(f"merge method {name!r} registered twice")
        (INTERNAL if internal else METHODS)[name] = method
        return fn

    return register


def fused_variant(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(out, xs, base, **params)` as merge method `name`'s fused variant: the same merge
    on raw values (`kernels.Raw`, the bytes of the files) by a compiled kernel, writing `out`; same
    parameters, same result bit for bit. The engine uses it where the kernels can read the inputs."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        METHODS[name] = replace(METHODS[name], fused=fn)
        return fn

    return register


def _hint(fn: Callable[..., Any], p: inspect.Parameter) -> Any:
    """The annotation of a recipe parameter, evaluated (float when there is none). Only these are
    evaluated: the tensors' annotations name torch types, and evaluating them would import torch."""
    if p.annotation is inspect.Parameter.empty:
        return float
    return eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation  # noqa: S307


def get_method(name: str, where: str = "merge_method") -> MergeMethod:
    """The registered method `name`. The catalogue is full whenever this module is importable:
    importing `mergesmith.methods.registry` runs the package's `__init__` first, which imports
    (registers) every method."""
    try:
        return METHODS[name] if name in METHODS else INTERNAL[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method '{name}'{did_you_mean(name, METHODS)} (known: {', '.join(sorted(METHODS))})",
            where,
        ) from None


def all_param_names() -> set[str]:
    return {p for m in METHODS.values() for p in m.params}
