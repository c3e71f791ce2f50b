"""The progress bar shown by `mergesmith run`: tensors, bytes, throughput and ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mergesmith.plan import OutputTensor, Plan


class MergeProgress:
    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=disable,
            transient=True,
        )
        self._task: TaskID | None = None
        self._done = 0
        self._count = 0

    def __enter__(self) -> MergeProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.__exit__(et, ev, tb)

    def start(self, plan: Plan) -> None:
        self._count = len(plan.tensors)
        self._task = self._progress.add_task("merging", total=plan.bytes_written, tensors=f"0/{self._count} tensors")

    def advance(self, tensor: OutputTensor) -> None:
        if self._task is None:
            return
        self._done += 1
        self._progress.update(self._task, advance=tensor.nbytes, tensors=f"{self._done}/{self._count} tensors")
