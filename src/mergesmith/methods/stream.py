"""What an observe-then-apply method sees of the engine's passes over one tensor in row chunks.

A method states what it needs from the whole tensor in its declaration (`merge_method(observes=...)`):
a factory of one `Observation` (norms and dot products: `gram.Gram`; the task-vector pruners'
thresholds: `task_vectors.Pruners`) made from its arguments. The engine runs the passes itself: the
observation's `sample` on a fixed strided sample of the whole inputs, its `feed` on every chunk
(again while `finish` asks), and then calls the method on each chunk with a `Stream`, the chunk's
place, whose `seen` is the finished observation. A method body never sees a pass, only its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mergesmith import kernels


class Observation:
    """What a method needs of a whole tensor of `numel` values, fed chunk by chunk by the engine.

    This base class needs nothing (no observe pass): the observation of a method whose inputs, for
    these arguments, make every chunk self-sufficient (no other model, one row per vector)."""

    numel: int = 0
    needs_observe = False  # whether the observe pass must see every chunk before the merge
    samples = False  # whether `sample` wants the fixed sample of the inputs first
    streams = True  # False: only whole tensors (the engine then gives it one chunk)
    fusable = False  # whether it runs in the raw lane, on the files' values (`kernels.Raw`)

    def setup(self, numel: int) -> None:
        self.numel = numel

    def sample(self, xs: list[Any], base: Any) -> None:
        """The inputs at the flat ranges `sparsify.sample_blocks(numel)`, concatenated."""

    def feed(self, xs: list[Any], base: Any, at: Stream) -> None:
        """The inputs' chunk at `at.start` (chunks may come on several threads, in any order); the
        inputs are the call's own, to overwrite."""

    def finish(self) -> bool:
        """After every chunk was fed: False asks for one more observe pass."""
        return True

    def members(self) -> list[Observation]:
        """The independent observations this one is made of (finished side by side by the engine)."""
        return [self]


#: A method's declaration of its observation: from its arguments (recipe parameters with their
#: defaults, by argument name), its `TensorRNG` and how many non-base inputs it merges.
Observes = Callable[[dict[str, Any], Any, int], Observation | None]


class Stream(Protocol):
    """One chunk's place in a streamed merge: the whole tensor's size, the chunk's first flat
    element, in the raw lane the values per row (`cols`: per first index), along the last axis
    (`width`) and where the merge writes (`out`), and the finished observation (`seen`)."""

    numel: int
    start: int
    cols: int
    width: int
    out: kernels.Raw | None
    seen: Observation
