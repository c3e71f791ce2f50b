"""The audit of a merge: every output tensor checked for NaN/Inf as it is written, every input
tensor accounted for, config.json checked against the weights; written to merge_report.json."""

from __future__ import annotations

import json
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from mergesmith import kernels
from mergesmith.dtypes import DTYPE_BYTES
from mergesmith.engine.sinks import ChunkJob, ChunkSink, CopyJob
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.output.report import update_report
from mergesmith.output.shards import ShardWriter
from mergesmith.plan import Plan
from mergesmith.reliability.checks import config_problems
from mergesmith.reliability.resume import ShardJournal, fingerprint
from mergesmith.shard_layout import Shard, layout_shards
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.structure import Structure, find_structure


@dataclass
class Audit:
    """A `ChunkSink` around the shard writer (`wrap`): checks each chunk for NaN/Inf, then forwards
    it; tells the journal when a shard's last tensor is written. Safe to call from several threads."""

    journal: ShardJournal
    allow_nonfinite: bool = False
    forward: ShardWriter | None = None  # the writer, set by `wrap`
    nonfinite: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    write_failed: bool = False  # the writer itself failed (disk full...): the staging dir is worth resuming

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._shard_of: dict[str, Shard] = {slot.name: s for s in self.journal.pending for slot in s.slots}
        self._left = {s.file: len(s.slots) for s in self.journal.pending}
        self._bytes_left = {slot.name: slot.end - slot.start for s in self.journal.pending for slot in s.slots}
        self._bytes_total = dict(self._bytes_left)

    def wrap(self, writer: ShardWriter) -> ChunkSink:
        """The sink to give the executor: `writer`, audited. The writer hashes shards as it writes
        them, so the journal gets their digests with nothing read back."""
        self.forward = writer
        writer.on_hashed = self.journal.shard_written
        return self

    def check_chunk(self, name: str, data: np.ndarray | memoryview, dtype: str) -> None:
        """The NaN/Inf check of a chunk's bytes (the executor runs it in its computing workers)."""
        self._record(name, kernels.nonfinite(data, dtype), data.nbytes, DTYPE_BYTES[dtype])

    def write_chunk(self, job: ChunkJob) -> None:
        """Forward a checked chunk of a tensor (the executor writes large tensors in row chunks)."""
        assert self.forward is not None
        try:
            self.forward.write_chunk(job)
        except BaseException:
            self.write_failed = True
            raise
        self._chunk_written(job.name, job.data.nbytes)

    def copy_file(self, job: CopyJob, check: Callable[[memoryview], None] | None = None) -> None:
        """Forward a pure copy from an input file, its bytes checked as they land (then by `check`,
        a check of a sink around this one)."""
        assert self.forward is not None
        rejected = []

        def scan(view: memoryview) -> None:
            try:
                self.check_chunk(job.name, view, job.dtype)
            except MergeError:
                rejected.append(job.name)
                raise
            if check is not None:
                check(view)

        try:
            self.forward.copy_file(job, check=scan)
        except BaseException:
            self.write_failed = not rejected
            raise
        self._chunk_written(job.name, job.nbytes)

    def _chunk_written(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._bytes_left[name] -= nbytes
            done = self._bytes_left[name] == 0
        if done:
            with self._lock:
                self.checked += 1
            self._tensor_written(name)

    def _tensor_written(self, name: str) -> None:
        shard = self._shard_of.get(name)
        with self._lock:
            if shard is None:
                return
            self._left[shard.file] -= 1
            finished = self._left[shard.file] == 0
        if finished:
            if self.forward is not None and self.forward.hashing(shard.file):
                return  # its digest comes from the writer's hasher (`on_hashed`)
            self.journal.shard_written(shard)

    def check(self, name: str, tensor: torch.Tensor) -> None:
        """The NaN/Inf check of a whole tensor (one read back from a reused shard)."""
        self._record(name, kernels.nonfinite(tensor), tensor.numel() * tensor.element_size(), tensor.element_size())
        with self._lock:
            self.checked += 1

    def _record(self, name: str, bad: int, nbytes: int, item: int) -> None:
        """`bad` NaN/Inf values found in `nbytes` of tensor `name` (`item` bytes per value)."""
        if not bad:
            return
        with self._lock:
            self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
        if not self.allow_nonfinite:
            total = self._bytes_total.get(name, nbytes) // item
            raise MergeError(
                f"{bad} of {total} values are NaN or Inf in the merged tensor; check the method's parameters"
                " (weights summing to ~0, extreme lambda) or pass --allow-nonfinite to keep them",
                f"tensor {name}",
            )

    def check_reused(self, directory: Path) -> None:
        """Shards taken from an interrupted run are scanned from disk, so the audit covers them too."""
        for shard in self.journal.reused:
            path = directory / shard.file
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for slot in shard.slots:
                    self.check(slot.name, f.get_tensor(slot.name))


def open_audit(directory: Path, plan: Plan, models: dict[str, ModelInfo], options: Any) -> Audit:
    """Lay out the shards, read (with `options.resume`) or start the journal, and audit what is written."""
    shards, print_ = merge_fingerprint(plan, models, options)
    journal = ShardJournal(directory, shards, print_, options.resume)
    return Audit(journal, options.allow_nonfinite)


def merge_fingerprint(
    plan: Plan, models: dict[str, ModelInfo], options: Any, mtimes: bool = True
) -> tuple[list[Shard], str]:
    """The output's shard layout and the fingerprint of the merge that fills it (see `fingerprint`)."""
    shards = layout_shards([(t.name, t.dtype, t.shape) for t in plan.tensors], options.out_shard_size)
    return shards, fingerprint(plan, shards, models, options.random_seed or 0, options.device, mtimes)


def account_inputs(plan: Plan, models: dict[str, ModelInfo]) -> dict[str, Any]:
    """For each input model: how many of its tensors were merged or copied, and each dropped one with why."""
    use: dict[tuple[str, str], str] = {}
    taken_from: dict[str, set[str]] = {}
    for t in plan.tensors:
        how = "merged" if len(t.inputs) > 1 else "copied"
        for x in t.inputs:
            if use.get((x.model, x.name)) != "merged":
                use[(x.model, x.name)] = how
            taken_from.setdefault(x.name, set()).add(x.model)
    structures = {key: find_structure(info.config, info.tensors) for key, info in models.items()}
    layers_used: dict[tuple[str, str], set[int]] = {}  # (model, stack prefix) -> layers taken
    for key, name in use:
        p = structures[key].locate(name) if key in structures else None
        if p is not None:
            layers_used.setdefault((key, p.stack.prefix), set()).add(p.index)
    out_names = {t.name for t in plan.tensors}
    report: dict[str, Any] = {}
    for key, info in sorted(models.items()):
        counts = {"merged": 0, "copied": 0}
        dropped: dict[str, str] = {}
        for name in info.tensors:
            how = use.get((key, name))
            if how is not None:
                counts[how] += 1
            else:
                dropped[name] = _drop_reason(name, key, structures[key], layers_used, out_names, taken_from)
        report[key] = {**counts, "dropped": dropped}
    return report


def _drop_reason(
    name: str,
    key: str,
    structure: Structure,
    layers_used: dict[tuple[str, str], set[int]],
    out_names: set[str],
    taken_from: dict[str, set[str]],
) -> str:
    p = structure.locate(name)
    if p is not None:
        used = layers_used.get((key, p.stack.prefix))
        if not used and p.stack.module != "default":
            return f"the output's {p.stack.module} is taken from another model"
        if p.index not in (used or set()):
            return f"layer {p.index} is outside the layer ranges taken from this model"
    if p is None and name in out_names:
        others = ", ".join(sorted(taken_from.get(name, set()) - {key})) or "another model"
        return f"non-layer tensor; the output takes it from {others}"
    if arch.is_lm_head(name) and not any(arch.is_lm_head(n) for n in out_names):
        return "the output ties lm_head to the embeddings"
    return "no output tensor uses it (the method or the other models do not have it)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("mergesmith", "torch", "safetensors", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def finish_report(directory: Path, plan: Plan, models: dict[str, ModelInfo], audit: Audit, seed: int) -> list[str]:
    """Write the audit into merge_report.json; returns the lines to show on screen."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    problems = config_problems(config, {t.name: t.shape for t in plan.tensors})
    inputs = account_inputs(plan, models)
    update_report(
        directory,
        "audit",
        {
            "output_tensors": len(plan.tensors),
            "checked_finite": audit.checked,
            "nonfinite": dict(sorted(audit.nonfinite.items())),
            "config_problems": problems,
        },
    )
    update_report(directory, "inputs", inputs)
    update_report(directory, "seed", seed)
    update_report(directory, "versions", versions())
    merged = sum(v["merged"] for v in inputs.values())
    copied = sum(v["copied"] for v in inputs.values())
    dropped = sum(len(v["dropped"]) for v in inputs.values())
    finite = "all finite" if not audit.nonfinite else f"{len(audit.nonfinite)} with NaN/Inf (--allow-nonfinite)"
    lines = [
        f"audit: {audit.checked} output tensors checked, {finite}; input tensors: {merged} merged, {copied} copied,"
        f" {dropped} dropped; details in merge_report.json"
    ]
    lines += [f"warning: {p}" for p in problems]
    return lines
