"""Splitting one merge into tasks for several workers, from metadata only.

The output shards are laid out exactly as a single-process run lays them out (`layout_shards`), so
the files are the same whoever writes them; only *which worker writes which shard* is decided
here. Shards are dealt out before anything runs, largest first to the least-loaded task (the
classic longest-processing-time rule), by the bytes each shard reads plus the bytes it writes:
those bytes, not the arithmetic, are what a merge spends its time on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.plan import InputTensor, OutputTensor, Plan
from mergesmith.shard_layout import Shard


@dataclass(frozen=True)
class Task:
    index: int
    shards: tuple[Shard, ...]
    bytes_read: int  # input bytes its tensors read (each input tensor once per task)
    bytes_written: int  # tensor bytes it writes (the shards' data sections)
    tensors: tuple[OutputTensor, ...] = ()  # the output tensors of its shards

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(s.file for s in self.shards)

    @property
    def file_bytes(self) -> int:
        """Bytes of the shard files it writes (headers included)."""
        return sum(s.size for s in self.shards)


def input_bytes(x: InputTensor) -> int:
    return numel(x.shape) * DTYPE_BYTES[x.dtype]


def shard_reads(plan: Plan, shards: Sequence[Shard]) -> dict[str, set[tuple[str, str]]]:
    """For each shard file: the (model, tensor) inputs its tensors read."""
    by_name = {t.name: t for t in plan.tensors}
    return {s.file: {(x.model, x.name) for slot in s.slots for x in by_name[slot.name].inputs} for s in shards}


def schedule(plan: Plan, shards: Sequence[Shard], workers: int) -> list[Task]:
    """Deal `shards` out to at most `workers` tasks, balanced by bytes read + written; tasks keep
    their shards in file order and are numbered by their first shard."""
    sizes = {(x.model, x.name): input_bytes(x) for t in plan.tensors for x in t.inputs}
    reads = shard_reads(plan, shards)
    cost = {s.file: sum(sizes[k] for k in reads[s.file]) + (s.slots[-1].end if s.slots else 0) for s in shards}
    count = max(1, min(workers, len(shards)))
    groups: list[list[Shard]] = [[] for _ in range(count)]
    load = [0] * count
    for shard in sorted(shards, key=lambda s: (-cost[s.file], s.file)):
        k = min(range(count), key=lambda i: (load[i], i))
        groups[k].append(shard)
        load[k] += cost[shard.file]
    order = {s.file: i for i, s in enumerate(shards)}
    groups = sorted((sorted(g, key=lambda s: order[s.file]) for g in groups if g), key=lambda g: order[g[0].file])
    by_name = {t.name: t for t in plan.tensors}
    tasks = []
    for i, group in enumerate(groups):
        inputs = set().union(*(reads[s.file] for s in group))
        tasks.append(
            Task(
                index=i,
                shards=tuple(group),
                bytes_read=sum(sizes[k] for k in inputs),
                bytes_written=sum(s.slots[-1].end for s in group if s.slots),
                tensors=tuple(by_name[slot.name] for s in group for slot in s.slots),
            )
        )
    return tasks


def wall_seconds(tasks: Sequence[Task], bandwidth: float) -> float:
    """Estimated wall time when each task moves its bytes at `bandwidth` bytes/s (its own disk or
    link) and all run at once: the slowest task's bytes over the bandwidth."""
    return max((t.bytes_read + t.file_bytes) / bandwidth for t in tasks) if tasks else 0.0


def size(n: float) -> str:
    """Bytes in decimal units, three significant decimals for GB (a 405B merge and a toy both read)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} B"


def schedule_lines(tasks: Sequence[Task], bandwidth: float) -> list[str]:
    """The printable schedule: one line per task, then the totals and the wall-time estimate."""
    lines = []
    for t in tasks:
        numbers = [m[1] for f in t.files if (m := re.fullmatch(r"model-0*(\d+)-of-\d+\.safetensors", f))]
        names = "shards " + ",".join(numbers) if len(numbers) == len(t.files) else ", ".join(t.files)
        lines.append(
            f"task {t.index}: {names} ({len(t.shards)} file(s)), read {size(t.bytes_read)},"
            f" write {size(t.bytes_written)}"
        )
    read = sum(t.bytes_read for t in tasks)
    written = sum(t.bytes_written for t in tasks)
    lines.append(
        f"schedule: {len(tasks)} task(s), read {size(read)}, write {size(written)};"
        f" estimated wall time {wall_seconds(tasks, bandwidth):.1f} s at {size(bandwidth)}/s per worker"
    )
    return lines
