"""The executor's sinks (`engine.sinks`): any object implementing a sink Protocol gets the merge a
file merge writes, and an object that implements neither is refused, never run another way."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import merge, tensors

from mergesmith.engine.executor import Executor
from mergesmith.engine.sinks import ChunkJob, ChunkSink, CopyJob, ResidentSink, TensorSink, sink_kind
from mergesmith.errors import MergeError
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.sources.reader import open_sources
from mergesmith.toymodels import load_state_dict


class KeepTensors:
    """A plain whole-tensor sink: keeps every tensor it is given."""

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.got
        self.got[name] = tensor


class KeepBytes:
    """A plain chunk sink: gathers each tensor's bytes, reads copy jobs itself, counts its checks."""

    def __init__(self) -> None:
        self.bytes: dict[str, bytearray] = {}
        self.checked: dict[str, int] = {}
        self.copies: list[str] = []

    def check_chunk(self, name: str, data: np.ndarray, dtype: str) -> None:
        self.checked[name] = self.checked.get(name, 0) + data.nbytes

    def write_chunk(self, job: ChunkJob) -> None:
        buf = self.bytes.setdefault(job.name, bytearray())
        buf[job.offset : job.offset + job.data.nbytes] = job.data.tobytes()

    def copy_file(self, job: CopyJob, check=None) -> None:
        self.copies.append(job.name)
        self.bytes[job.name] = bytearray(os.pread(job.fd, job.nbytes, job.src_offset))


def _recipe(models) -> dict:
    """ties with one pruned and one unpruned input: the streamed lanes, raw and torch."""
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.7, "density": 1.0}},
        ],
        "dtype": "float32",
    }


def _executor(recipe: dict) -> Executor:
    plan, infos = prepare_merge(parse_config(recipe), MergeOptions())
    return Executor(plan, open_sources(infos))


def test_tensor_sink_gets_every_planned_tensor_with_the_file_merge_values(models, tmp_path):
    recipe = _recipe(models)
    merge(recipe, tmp_path / "out")
    written = tensors(tmp_path / "out")
    executor = _executor(recipe)
    sink = KeepTensors()
    assert sink_kind(sink) is TensorSink
    executor.run(sink)
    assert list(sink.got) == [t.name for t in executor.plan.tensors]
    assert set(sink.got) == set(written)
    for name, value in sink.got.items():
        assert torch.equal(value, written[name]), name


def test_tensor_sink_values_follow_the_linear_formula(models):
    """y = (0.3 a + 0.7 b) / (0.3 + 0.7), written here from the input files, not by the method."""
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.3}},
            {"model": str(models["base"]), "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
    }
    a, b = load_state_dict(models["ft1"]), load_state_dict(models["base"])
    sink = KeepTensors()
    _executor(recipe).run(sink)
    assert sink.got
    for name, value in sink.got.items():
        expect = (0.3 * a[name].float() + 0.7 * b[name].float()) / 1.0
        torch.testing.assert_close(value.float(), expect, rtol=1e-2, atol=1e-2)


def test_chunk_sink_gets_the_file_merge_bytes_through_the_fast_lanes(models, tmp_path):
    recipe = _recipe(models)
    merge(recipe, tmp_path / "out")
    written = tensors(tmp_path / "out")
    executor = _executor(recipe)
    sink = KeepBytes()
    assert sink_kind(sink) is ChunkSink
    executor.run(sink)
    assert set(sink.bytes) == set(written)
    for name, value in written.items():
        got = torch.frombuffer(bytearray(sink.bytes[name]), dtype=value.dtype).view(value.shape)
        assert torch.equal(got, value), name
        if name not in sink.copies:  # every computed chunk was checked before it was written
            assert sink.checked[name] == value.numel() * value.element_size(), name


def test_pure_copies_reach_a_chunk_sink_as_copy_jobs(models):
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 2]}]}],
    }
    sink = KeepBytes()
    executor = _executor(recipe)
    executor.run(sink)
    base = load_state_dict(models["base"])
    assert sink.copies and set(sink.copies) <= set(sink.bytes)
    for name in sink.copies:
        value = base[name]
        assert bytes(sink.bytes[name]) == value.contiguous().view(torch.uint8).numpy().tobytes()


class NoCopy(KeepBytes):
    copy_file = None  # type: ignore[assignment]


class Misspelt:
    def put(self, name: str, tensor: torch.Tensor) -> None:  # not `put_tensor`
        pass


@pytest.mark.parametrize(
    ("sink", "message"),
    [
        (NoCopy(), "NoCopy is not a ChunkSink: it lacks copy_file"),
        (Misspelt(), "Misspelt is not a sink: it implements neither ChunkSink"),
        (lambda name, tensor: None, "function is not a sink"),
    ],
)
def test_a_sink_missing_a_method_is_refused(models, sink, message):
    executor = _executor(_recipe(models))
    with pytest.raises(TypeError, match=message):
        executor.run(sink)


def test_resident_sink_refuses_a_model_without_the_parameter_before_merging(models):
    executor = _executor(_recipe(models))
    names = [t.name for t in executor.plan.tensors]
    targets = {n: torch.zeros(1) for n in names[1:]}
    with pytest.raises(MergeError, match=f"no parameter '{names[0]}'"):
        ResidentSink(targets, names)


def test_resident_sink_copies_the_merge_into_the_parameters(models, tmp_path):
    recipe = _recipe(models)
    merge(recipe, tmp_path / "out")
    written = tensors(tmp_path / "out")
    targets = {n: torch.zeros_like(v) for n, v in written.items()}
    executor = _executor(recipe)
    executor.run(ResidentSink(targets, [t.name for t in executor.plan.tensors]))
    assert all(torch.equal(targets[n], written[n]) for n in written)
