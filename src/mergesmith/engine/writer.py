"""The writer thread between the computing workers and a `ChunkSink`."""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import numpy as np

from mergesmith.engine.buffers import Buffers
from mergesmith.engine.sinks import ChunkJob, ChunkSink, CopyJob


class _Written(NamedTuple):
    """A chunk queued for the writer thread, and the output slot whose memory holds its bytes."""

    job: ChunkJob
    slot: Buffers


class Writer:
    """A thread that hands finished chunks to the sink while the next ones are computed. Output
    buffers come from a small ring; a slot is reused only once its bytes are in the sink. Pure copies
    go to the sink as `CopyJob`s (file descriptor, offset), read straight into its output."""

    def __init__(self, sink: ChunkSink, slots: int = 3) -> None:
        self.sink = sink
        self.free: queue.Queue[Buffers] = queue.Queue()
        for _ in range(slots):
            self.free.put(Buffers())
        self.jobs: queue.Queue[_Written | CopyJob | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="mergesmith-writer")
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    if isinstance(job, CopyJob):
                        self.sink.copy_file(job)
                    else:
                        self.sink.write_chunk(job.job)
            except BaseException as err:  # re-raised in the computing thread
                self.error = err
            if isinstance(job, _Written):
                self.free.put(job.slot)  # the chunk's bytes are in the file: its slot is free again

    def slot(self) -> Buffers:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def put(self, name: str, offset: int, data: np.ndarray, dtype: str, slot: Buffers) -> None:
        """Bytes `data` (in `slot`'s memory, checked) of tensor `name`, of `dtype`, at byte `offset` of it."""
        self.jobs.put(_Written(ChunkJob(name, offset, data, dtype), slot))

    def copy(self, job: CopyJob) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
