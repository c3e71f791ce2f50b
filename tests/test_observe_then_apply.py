"""The engine owns the passes of an observe-then-apply merge: a method declares its observation
(`merge_method(observes=...)`), the engine samples, feeds it every chunk as often as it asks,
finishes it and merges each chunk with it (`stream.seen`); no method reads the engine's state."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from mergesmith.engine import chunks
from mergesmith.engine import executor as executor_module
from mergesmith.methods import registry
from mergesmith.methods.registry import merge_method
from mergesmith.methods.stream import Observation, Stream
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorReader

METHODS_DIR = Path(registry.__file__).parent


def test_no_method_reads_the_engine_phase():
    """Every file of methods/: no attribute `.phase`, no `Phase`, no `stream.state(...)`."""
    offenders = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("phase", "state"):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Name) and node.id == "Phase":
                offenders.append(f"{path.name}:{node.lineno} Phase")
    assert not offenders


def test_stream_and_observes_come_together():
    """A method takes `stream` exactly when it declares what it observes."""
    with pytest.raises(TypeError, match="observes"):

        @merge_method("no_observation", summary="-")
        def no_observation(xs: list, base: None, *, stream: Stream | None = None) -> None: ...

    with pytest.raises(TypeError, match="observes"):

        @merge_method("no_stream", summary="-", observes=lambda args, rng, count: None)
        def no_stream(xs: list, base: None) -> None: ...

    assert "no_observation" not in registry.METHODS and "no_stream" not in registry.METHODS


class Moments(Observation):
    """Two passes over the task vector: its mean, then its variance about that mean (exact sums per
    chunk, added with `math.fsum`; chunks may come in any order, on several threads)."""

    needs_observe = True

    def __init__(self, log: list) -> None:
        self.log = log
        self.mean: float | None = None
        self.std = 0.0
        self.sums: dict[int, float] = {}

    def feed(self, xs: list, base: torch.Tensor, at: Stream) -> None:
        d = xs[0].double() - base.double()
        if self.mean is not None:
            d = (d - self.mean) ** 2
        self.sums[at.start] = math.fsum(d.reshape(-1).tolist())
        self.log.append(("feed", at.start, self.mean is None))

    def finish(self) -> bool:
        total, self.sums = math.fsum(self.sums.values()), {}
        self.log.append(("finish",))
        if self.mean is None:
            self.mean = total / self.numel
            return False  # once more: the variance needs the mean
        self.std = math.sqrt(total / self.numel)
        return True


def test_engine_feeds_until_finished_then_applies_with_seen(models, monkeypatch):
    """A method that standardises the task vector over the whole tensor: the engine feeds every
    chunk twice (finish asks once more), then merges each chunk with the finished observation."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    log: list = []
    applied: list = []

    @merge_method("standardise", base="required", models=(1, 1), summary="-", observes=lambda a, r, n: Moments(log))
    def standardise(xs: list, base: torch.Tensor, *, stream: Stream | None = None) -> torch.Tensor:
        """y = b + (x - b - mean) / std, the moments of the whole task vector."""
        assert stream is not None  # only streamed here
        applied.append(stream.start)
        return base + (xs[0] - base - stream.seen.mean) / stream.seen.std

    recipe = {
        "merge_method": "standardise",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft1"])}],
        "dtype": "float32",
    }
    plan, infos = prepare_merge(MergeConfig.model_validate(recipe), MergeOptions())
    readers = {k: TensorReader(v) for k, v in infos.items()}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 100)  # three rows of 32 per chunk
    ex = executor_module.Executor(plan, readers)
    t = next(t for t in plan.tensors if len(t.shape) == 2 and t.shape[0] > 3)
    got = ex.compute(t).double()

    rows, cols = t.shape
    starts = list(range(0, rows * cols, max(1, 100 // cols) * cols))
    feeds = [e for e in log if e[0] == "feed"]
    assert sorted(s for _, s, first in feeds if first) == starts  # the mean's pass
    assert sorted(s for _, s, first in feeds if not first) == starts  # the variance's
    assert log.count(("finish",)) == 2 and sorted(applied) == starts
    b = readers[t.inputs[t.base].model].get(t.inputs[t.base].name).double()
    x = readers[t.others[0].model].get(t.others[0].name).double()
    d = x - b
    expected = b + (d - d.mean()) / d.std(unbiased=False)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(m.name for m in registry.METHODS.values() if m.streams))
def test_no_other_model_observes_nothing(name):
    """The plan copies the base of a tensor no other model has; should a streamed method still get
    one, its declaration asks for no pass (each body returns the base, or the one input, there)."""
    seen = registry.get_method(name).observation({}, TensorRNG(0, "t"), 0)
    assert seen is None or not seen.needs_observe
