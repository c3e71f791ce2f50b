"""How much working memory the executor needs for one planned tensor, from metadata only.

Most merges stream (row chunks of `CHUNK_ELEMENTS` values: memory independent of the tensor's
size). A few parameter choices need whole tensors, and the memory then grows with the largest
tensor: `whole_tensor_reason` names them, so `mergesmith validate` can say so before a merge.
Keep it in step with the methods' stream states (`gram.WholeTensors`, `Pruner.streams`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergesmith.engine.executor import CHUNK_ELEMENTS, elementwise
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor
from mergesmith.sources.model import DTYPE_BYTES

#: Chunks in flight at once: the computing workers' and the writer's ring (see engine/executor.py).
CHUNKS_IN_FLIGHT = 3
RESCALED_PRUNING = ("ties", "breadcrumbs", "breadcrumbs_ties")  # Magnitude/Outliers pruners: whole with rescale


@dataclass(frozen=True)
class Footprint:
    bytes: int  # working memory (float32 buffers of the inputs and the result, state kept between passes)
    whole: str | None  # why the tensor is merged whole (None: it streams)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def whole_tensor_reason(t: OutputTensor) -> str | None:
    """Why `t` (of two or more dimensions) is merged from whole tensors, or None when it streams."""
    if any(x.shape != t.shape for x in t.inputs):
        return "its inputs differ in shape (vocabulary sizes), so they are fitted whole"
    if elementwise(t):
        return None
    p = t.params
    if t.method == "nuslerp" and not p.get("nuslerp_flatten", True) and p.get("nuslerp_row_wise", False):
        return "nuslerp_row_wise: each column's slerp needs every row"
    if t.method == "sce" and p.get("select_topk", 1.0) < 1:
        return "select_topk < 1: the variance threshold over the whole tensor comes before the energies"
    if t.method in RESCALED_PRUNING and p.get("rescale") and any(d < 1 for d in t.per_model.get("density", (1.0,))):
        return "rescale: true with density < 1: the kept L1 norm needs the threshold first"
    if not get_method(t.method).streams:
        return f"{t.method} takes whole tensors"
    return None


def footprint(t: OutputTensor) -> Footprint:
    numel = _numel(t.shape)
    inputs = len(t.inputs) + 1  # and the result
    reason = whole_tensor_reason(t) if len(t.shape) >= 2 else None
    if len(t.shape) < 2 or reason is not None:  # 0-/1-D tensors are whole too, and small
        return Footprint(4 * numel * inputs + t.nbytes, reason)
    per_row = max(_numel(t.shape[1:]), 1)
    rows = min(max(1, CHUNK_ELEMENTS // per_row), t.shape[0])  # per chunk
    in_flight = min(CHUNKS_IN_FLIGHT, -(-t.shape[0] // rows))
    random = get_method(t.method).uses_rng
    masks = numel // 8 * len(t.others) if random else 0  # DARE/DELLA keep each model's mask as bits between passes
    return Footprint(in_flight * rows * per_row * (4 * inputs + DTYPE_BYTES[t.dtype]) + masks, None)
