"""Which input rows make each output embedding row (SPEC section 6). Pure: ids in, row recipes out.

A row recipe is a tuple of (model key, old row) pairs whose mean is the row; an empty tuple is a
row of zeros. A model's own row is used when it has the token and the token is not `force`d;
otherwise the token's default row:
  1. the source configured in `tokenizer.tokens.<token>.source`: a model (its row of the token),
     `{kind: model_token, model, token | token_id}`, or `{kind: zero}`;
  2. exactly one model has the token -> that row;
  3. no model has it -> zeros (with a warning);
  4. the base model has it -> the base row;
  5. otherwise the mean of the rows of the models that have it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError

Recipe = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class TokenSpec:
    source: Any = None  # None, ("zero",), ("model", key, token | None, token_id | None)
    force: bool = False


def parse_token_specs(raw: Mapping[str, Any] | None, resolve: Callable[[Any, str], str]) -> dict[str, TokenSpec]:
    """`tokenizer.tokens` from the recipe; `resolve(ref, where)` turns a model reference into its key."""
    specs: dict[str, TokenSpec] = {}
    for token, value in (raw or {}).items():
        where = f"tokenizer.tokens.{token}"
        value = value or {}
        if not isinstance(value, dict):
            raise MergeError("expected a mapping with 'source' and/or 'force'", where)
        unknown = set(value) - {"source", "force"}
        if unknown:
            raise MergeError(f"unknown key(s) {sorted(unknown)} (known: source, force)", where)
        specs[token] = TokenSpec(
            _parse_source(value.get("source"), resolve, f"{where}.source"), bool(value.get("force"))
        )
    return specs


def _parse_source(src: Any, resolve: Callable[[Any, str], str], where: str) -> Any:
    if src is None:
        return None
    if isinstance(src, dict) and "kind" in src:
        if src["kind"] == "zero":
            return ("zero",)
        if src["kind"] == "model_token":
            if ("token" in src) == ("token_id" in src):
                raise MergeError("model_token needs exactly one of 'token' or 'token_id'", where)
            token_id = src.get("token_id")
            if token_id is not None and (not isinstance(token_id, int) or token_id < 0):
                raise MergeError(f"token_id must be a non-negative integer, got {token_id!r}", where)
            return ("model", resolve(src.get("model"), f"{where}.model"), src.get("token"), token_id)
        raise MergeError(f"unknown kind '{src['kind']}' (known: model_token, zero)", f"{where}.kind")
    return ("model", resolve(src, where), None, None)


def default_row(
    token: str,
    new_id: int,
    maps: Mapping[str, list[int]],
    vocabs: Mapping[str, Mapping[str, int]],
    rows: Mapping[str, int],
    base: str,
    spec: TokenSpec | None,
) -> tuple[Recipe, str]:
    """The default row of `token` and a short description of the rule that chose it."""
    if spec is not None and spec.source is not None:
        where = f"tokenizer.tokens.{token}.source"
        if spec.source[0] == "zero":
            return (), "zero"
        _, key, by_token, by_id = spec.source
        if by_id is not None:
            if by_id >= rows[key]:
                raise MergeError(f"token_id {by_id} is past the {rows[key]} embedding rows of {key}", where)
            return ((key, by_id),), f"{key} row {by_id}"
        name = by_token if by_token is not None else token
        if name not in vocabs[key]:
            raise MergeError(f"model {key} has no token '{name}'", where)
        return ((key, vocabs[key][name]),), f"{key} token {name!r}"
    having = [(k, m[new_id]) for k, m in maps.items() if m[new_id] >= 0]
    if len(having) == 1:
        return tuple(having), f"only {having[0][0]}"
    if not having:
        return (), "zero (no model has it)"
    if maps[base][new_id] >= 0:
        return ((base, maps[base][new_id]),), "base"
    return tuple(having), "mean of " + ", ".join(k for k, _ in having)


def row_recipes(
    vocab: Mapping[str, int],
    maps: Mapping[str, list[int]],
    vocabs: Mapping[str, Mapping[str, int]],
    rows: Mapping[str, int],
    base: str,
    specs: Mapping[str, TokenSpec],
) -> tuple[dict[str, dict[int, Recipe]], dict[str, str]]:
    """Per model, the output rows it does not take from its own row (new id -> recipe), and per such
    token the rule used (for the report)."""
    per_model: dict[str, dict[int, Recipe]] = {k: {} for k in maps}
    rules: dict[str, str] = {}
    for token, new_id in vocab.items():
        spec = specs.get(token)
        forced = spec is not None and spec.force
        lacking = [k for k, m in maps.items() if forced or m[new_id] < 0]
        if not lacking:
            continue
        recipe, rule = default_row(token, new_id, maps, vocabs, rows, base, spec)
        rules[token] = rule
        for k in lacking:
            per_model[k][new_id] = recipe
    return per_model, rules
