"""The engine's side of a streamed merge (observe-then-apply): the method's observation of the
whole tensor (`methods.stream.Observation`, made from its declaration) and each chunk's place.
The lanes (`lanes.raw_streamed`, `lanes.torch_streamed`) run the passes: `MergeContext.sample`,
`MergeContext.observe` (the feeds, as often as the observation asks, then its finish), then the
method on each chunk (`MergeContext.apply`) with this as its `stream`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from mergesmith import kernels
from mergesmith.methods.stream import Observation


@dataclass
class Streaming:
    """A tensor of `numel` values merged in row chunks, the chunk at flat element `start`."""

    numel: int
    seen: Observation
    start: int = 0
    cols: int = 0
    width: int = 0
    out: kernels.Raw | None = None

    def finish(self, run: Callable = map) -> bool:
        """The observation's `finish`, member by member (through `run`, a `map`: the engine's runs them
        on its workers)."""
        return all(list(run(lambda s: s.finish(), self.seen.members())))

    def at(self, start: int, out: kernels.Raw | None = None) -> Streaming:
        """This stream at the chunk starting at flat element `start` (same observation): chunks may
        be merged concurrently, each with its own view (and, in the raw lane, its own `out`)."""
        return replace(self, start=start, out=out)
