"""Executing a plan: stream one output tensor at a time through its merge method.

Inputs are read from memory-mapped files, cast to the recipe's `dtype` (if any), then to float32
for the arithmetic; the result is cast once to the output dtype and handed to the writer, which
puts it straight into its shard. Memory holds one tensor's inputs and result at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mergesmith.errors import MergeError
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor, Plan
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorSource


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def fit_shape(x: torch.Tensor, shape: tuple[int, ...], filler: torch.Tensor | None) -> torch.Tensor:
    """Cut `x` to `shape` (vocabulary mismatch); rows/columns it lacks come from `filler` (the base)."""
    if tuple(x.shape) == shape:
        return x
    cut = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape, strict=True))]
    if tuple(cut.shape) == shape:
        return cut
    out = filler.clone() if filler is not None else torch.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, s) for s in cut.shape)] = cut
    return out


class Executor:
    def __init__(
        self,
        plan: Plan,
        readers: Mapping[str, TensorSource],
        *,
        dtype: str | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.plan = plan
        self.readers = readers
        self.dtype = torch_dtype(dtype) if dtype else None
        self.device = torch.device(device)
        self.seed = seed

    def compute(self, t: OutputTensor) -> torch.Tensor:
        raw = [self.readers[x.model].get(x.name) for x in t.inputs]
        if self.dtype is not None and raw[0].is_floating_point():
            raw = [r.to(self.dtype) for r in raw]
        base_raw = raw[t.base] if t.base is not None else None
        if base_raw is not None:
            base_raw = fit_shape(base_raw, t.shape, None)
        raw = [fit_shape(r, t.shape, base_raw) for r in raw]
        out_dtype = torch_dtype(t.dtype)
        if not raw[0].is_floating_point():
            return raw[t.base if t.base is not None else 0].to(out_dtype)
        xs = [r.to(self.device, torch.float32, copy=True) for r in raw]
        base = xs[t.base] if t.base is not None else None
        others = [x for i, x in enumerate(xs) if i != t.base]
        method = get_method(t.method)
        params = {**t.params, **{k: list(v) for k, v in t.per_model.items()}}
        try:
            rng = TensorRNG(self.seed, t.name, tuple(x.model for x in t.others))
            result = method(others, base, params, rng=rng)
        except MergeError as err:
            raise MergeError(err.message, err.where or f"tensor {t.name}") from None
        except (ValueError, RuntimeError) as err:
            raise MergeError(f"{t.method} failed: {err}", f"tensor {t.name}") from None
        return result.to("cpu", out_dtype)

    def run(
        self, write: Callable[[str, torch.Tensor], None], progress: Callable[[OutputTensor], None] | None = None
    ) -> None:
        for t in self.plan.tensors:
            write(t.name, self.compute(t))
            if progress is not None:
                progress(t)
