"""The engine's state machine of a streamed merge: which pass and which chunk a call is, and the
method's state objects (`methods.stream.Observation`) between the passes. A method sees it only
through `methods.stream.Stream`; the lanes (`lanes.raw_streamed`, `lanes.torch_streamed`) and
`MergeContext.observe` drive it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mergesmith import kernels
from mergesmith.methods.stream import Observation, Phase, S


@dataclass
class Streaming:
    """A tensor of `numel` values merged in row chunks.

    phase "sample": the inputs are the fixed samples (`sparsify.sample_blocks`) of the whole inputs;
    "observe": chunk at flat offset `start`, fed to the states only (no result); "apply": merge the
    chunk. Every state's `finish()` between the passes (False: observe once more)."""

    numel: int
    phase: Phase = "sample"
    start: int = 0
    states: dict[int, Observation] = field(default_factory=dict)
    needs_observe: bool = False
    streams: bool = True  # False once a state turns out to need whole tensors
    fusable: bool = True  # False once a state turns out not to run on raw values
    cols: int = 0
    out: kernels.Raw | None = None

    def state(self, key: int, make: Callable[[int], S]) -> S:
        if key not in self.states:
            s = make(key)
            s.setup(self.numel)
            self.states[key] = s
            self.needs_observe |= s.needs_observe
            self.streams &= s.streams
            self.fusable &= s.fusable
        return self.states[key]  # type: ignore[return-value]

    def finish(self, run: Callable = map) -> bool:
        """Every state's `finish` (through `run`, a `map`: the engine's runs them on its workers)."""
        return all(list(run(lambda s: s.finish(), self.states.values())))

    def at(self, start: int, out: kernels.Raw | None = None) -> Streaming:
        """This stream at the chunk starting at flat element `start` (same states): chunks may be
        merged concurrently, each with its own view (and, in the raw lane, its own `out`)."""
        return replace(self, start=start, out=out)
