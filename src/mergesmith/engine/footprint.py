"""How much working memory the executor needs for one planned tensor, from metadata only.

Most merges stream (row chunks of `CHUNK_ELEMENTS` values: memory independent of the tensor's
size). A few parameter choices need whole tensors, and the memory then grows with the largest
tensor: `whole_tensor_reason` names them, so `mergesmith validate` can say so before a merge.
The methods declare when (`merge_method(whole_when=...)`); keep those in step with their
observations (`merge_method(observes=...)`: `gram.WholeTensors`, `Pruner.streams`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.engine.chunks import CHUNK_ELEMENTS
from mergesmith.engine.context import method_params
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor

#: Chunks in flight at once: the computing workers' and the writer's ring (see engine/executor.py).
CHUNKS_IN_FLIGHT = 3


@dataclass(frozen=True)
class Footprint:
    bytes: int  # working memory (float32 buffers of the inputs and the result, state kept between passes)
    whole: str | None  # why the tensor is merged whole (None: it streams)


def whole_tensor_reason(t: OutputTensor) -> str | None:
    """Why `t` (of two or more dimensions) is merged from whole tensors, or None when it streams."""
    if any(x.shape != t.shape for x in t.inputs):
        return "its inputs differ in shape (vocabulary sizes), so they are fitted whole"
    return get_method(t.method).whole_reason(method_params(t))


def footprint(t: OutputTensor) -> Footprint:
    n = numel(t.shape)
    inputs = len(t.inputs) + 1  # and the result
    reason = whole_tensor_reason(t) if len(t.shape) >= 2 else None
    if len(t.shape) < 2 or reason is not None:  # 0-/1-D tensors are whole too, and small
        return Footprint(4 * n * inputs + t.nbytes, reason)
    per_row = max(numel(t.shape[1:]), 1)
    rows = min(max(1, CHUNK_ELEMENTS // per_row), t.shape[0])  # per chunk
    in_flight = min(CHUNKS_IN_FLIGHT, -(-t.shape[0] // rows))
    random = get_method(t.method).uses_rng
    masks = n // 8 * len(t.others) if random else 0  # DARE/DELLA keep each model's mask as bits between passes
    return Footprint(in_flight * rows * per_row * (4 * inputs + DTYPE_BYTES[t.dtype]) + masks, None)
