"""What a streamed method sees of the engine's passes over one tensor in row chunks: the narrow
interface it receives as its `stream` argument (the engine's `engine.streaming.Streaming` is it).

The engine runs the passes: "sample" (the inputs are a fixed strided sample of the whole inputs),
"observe" (each chunk, fed to the method's state only: no result), "apply" (each chunk merged
with the finished state). A method states what it needs from the whole tensor as state objects,
`Observation`s (norms and dot products: `gram.Gram`; the task-vector pruners' thresholds:
`sparsify.Pruner`), registered with `state()` before it touches the inputs; the engine asks them
whether to observe at all, finishes them, and gives them back in the apply pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, TypeVar

from mergesmith import kernels

Phase = Literal["sample", "observe", "apply"]


class Observation:
    """State a streamed method keeps about a whole tensor of `numel` values, fed chunk by chunk."""

    numel: int = 0
    needs_observe = False  # whether the observe pass must see every chunk before "apply"
    streams = True  # False: only whole tensors (the engine then gives it one chunk)
    fusable = False  # whether it runs in the raw lane, on the files' values (`kernels.Raw`)

    def setup(self, numel: int) -> None:
        self.numel = numel

    def finish(self) -> bool:
        """After every chunk was observed: False asks for one more observe pass."""
        return True


S = TypeVar("S", bound=Observation)


class Stream(Protocol):
    """This call's place in the passes: the phase, the chunk, the whole tensor's size; in the raw
    lane also the values per row (`cols`) and where "apply" writes (`out`)."""

    phase: Phase
    numel: int
    start: int  # the chunk's first flat element
    cols: int
    out: kernels.Raw | None

    def state(self, key: int, make: Callable[[int], S]) -> S:
        """The state `key` of this tensor (made by `make(key)` on the first call, in the sample pass)."""
        ...
