"""Parameter settings: scalars, gradients and filtered values, evaluated per tensor.

Forms a recipe may use for a parameter value (SPEC §2):
- scalar: `0.5`, `true` (every scalar becomes a float, `true` -> 1.0); a string is read as the
  parameter's declared type reads it (`tol: 1e-10`, a string under YAML 1.1, is the number 1e-10;
  `normalize: "true"` is true), as mergekit's pydantic configuration model reads it
- gradient: `[0, 0.5, 1]`, interpolated over the layer position t in [0, 1]
- filtered: `[{filter: self_attn, value: 0.3}, {value: 0.7}]`: the first entry whose filter is
  absent, `"*"` or a substring of the tensor name; its value may itself be a gradient
- a bare `{filter, value}` mapping (mergekit crashes on it; we treat it as a one-entry list)

Keys of a filtered entry other than `filter` and `value` are ignored, as mergekit does (the recipe
check in `recipe/leniency.py` reports them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mergesmith.errors import MergeError


@dataclass(frozen=True)
class Scalar:
    value: float

    def evaluate(self, name: str, t: float) -> float | None:
        return self.value


@dataclass(frozen=True)
class Gradient:
    values: tuple[float, ...]

    def evaluate(self, name: str, t: float) -> float | None:
        k = len(self.values)
        s = t * (k - 1)
        i = math.floor(s)
        i = min(max(i, 0), k - 1)
        j = min(k - 1, i + 1)
        frac = s - i
        return (1 - frac) * self.values[i] + frac * self.values[j]


@dataclass(frozen=True)
class Filtered:
    entries: tuple[tuple[str | None, Setting], ...]

    def evaluate(self, name: str, t: float) -> float | None:
        for pattern, setting in self.entries:
            if pattern is None or pattern == "*" or pattern in name:
                return setting.evaluate(name, t)
        return None


Setting = Scalar | Gradient | Filtered


Reader = Callable[[Any, str], float]
"""Reads one scalar of a recipe value (a number, or a string in the parameter type's spelling)."""

_FLOAT: TypeAdapter[float] = TypeAdapter(float)
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def read_number(value: Any, where: str) -> float:
    """A number, or a string pydantic reads as one (`"1e-10"`, `" 3 "`): mergekit's model does the same."""
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return _FLOAT.validate_python(value)
        except ValidationError:
            pass
    raise MergeError(f"expected a number, got {value!r}", where)


def read_flag(value: Any, where: str) -> float:
    """A boolean parameter: a number, or a string pydantic reads as a boolean (`"true"`, `"off"`, `"1"`)."""
    if isinstance(value, str):
        try:
            return float(_BOOL.validate_python(value))
        except ValidationError:
            raise MergeError(f"expected true or false (or a number), got {value!r}", where) from None
    return read_number(value, where)


def parse_setting(raw: Any, where: str, read: Reader = read_number) -> Setting:
    """Turn a recipe value into a Setting, or raise MergeError naming `where`. `read` reads each
    scalar (the parameter's declared type decides the spellings it accepts)."""
    if isinstance(raw, bool | int | float | str):
        return Scalar(read(raw, where))
    if isinstance(raw, dict):
        return Filtered((_filtered_entry(raw, where, read),))
    if isinstance(raw, list):
        if not raw:
            raise MergeError("an empty list is not a value; give a number or a list of numbers", where)
        if all(isinstance(v, dict) for v in raw):
            return Filtered(tuple(_filtered_entry(v, f"{where}[{i}]", read) for i, v in enumerate(raw)))
        if any(isinstance(v, dict | list) for v in raw):
            raise MergeError("a list must be all numbers (a gradient) or all {filter, value} entries", where)
        return Gradient(tuple(read(v, f"{where}[{i}]") for i, v in enumerate(raw)))
    raise MergeError(f"expected a number, a list of numbers or {{filter, value}} entries, got {raw!r}", where)


def _filtered_entry(raw: dict[str, Any], where: str, read: Reader) -> tuple[str | None, Setting]:
    if "value" not in raw:
        raise MergeError("a filtered entry needs a 'value'", where)
    pattern = raw.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        raise MergeError(f"'filter' must be a string, got {pattern!r}", f"{where}.filter")
    value = parse_setting(raw["value"], f"{where}.value", read)
    return pattern, value


def reader_for(kind: type) -> Reader:
    """How a parameter of declared type `kind` (float, int or bool) reads a recipe scalar."""
    return read_flag if kind is bool else read_number
