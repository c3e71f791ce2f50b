"""Calling merge methods the way the engine does: through the registry, defaults filled in."""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods import METHODS
from mergesmith.rng import TensorRNG


def resolve(name: str, n_models: int, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe-named params for `name`: given values, else defaults; per-model scalars become lists."""
    method = METHODS[name]
    unknown = set(params) - set(method.params)
    assert not unknown, f"{name} has no parameters {unknown}"
    resolved = {}
    for pname, p in method.params.items():
        if pname in params:
            value = params[pname]
        else:
            assert not p.required, f"{name}: test forgot required parameter {pname}"
            value = p.default
        if p.per_model and not isinstance(value, list | tuple):
            value = [value] * n_models
        resolved[pname] = list(value) if p.per_model else value
    return resolved


def call(
    name: str,
    xs: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    key: str = "model.layers.0.mlp.up_proj.weight",
    **params: Any,
) -> torch.Tensor:
    """Run method `name` on float32 copies of the inputs (methods may overwrite them)."""
    copies = [x.detach().to(torch.float32).clone() for x in xs]
    b = None if base is None else base.detach().to(torch.float32).clone()
    method = METHODS[name]
    stats = [None] * len(xs) if method.calibration else None  # data-aware: no statistics, the weighted mean
    out = method(copies, b, resolve(name, len(xs), params), rng=TensorRNG(seed, key), stats=stats)
    assert out.dtype == torch.float32
    assert out.shape == (xs[0] if xs else base).shape
    return out


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale
