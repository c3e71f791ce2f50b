"""Where candidates are scored: a serial loop in this process, or a pool of Ray actors.

Each worker (the process itself, or one Ray actor per GPU / per `cpus_per_worker` CPUs) builds one
`InMemoryMerger` and keeps the input models open for the whole search. Results are handed back as
they finish; the runner puts them back in candidate order, so the worker count never changes the
history. A candidate whose actor dies is put back in the queue and scored by another actor.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.extras import require
from mergesmith.preparation import MergeOptions
from mergesmith.search.genome import SearchDefinition
from mergesmith.search.inmemory import InMemoryMerger, Scored
from mergesmith.search.tasks import WeightedTask, load_tasks

log = logging.getLogger("mergesmith")


@dataclass(frozen=True)
class Job:
    index: int
    recipe: dict[str, Any]


OnResult = Callable[[Job, Scored], None]
ShouldStop = Callable[[], bool]


def _make_merger(
    first_recipe: dict[str, Any],
    tasks: list[WeightedTask],
    device: str,
    threads: int | None,
    options: MergeOptions | None = None,
) -> InMemoryMerger:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return InMemoryMerger(first_recipe, tasks, device=device, options=options)


class SerialWorkers:
    def __init__(
        self,
        first_recipe: dict[str, Any],
        tasks: list[WeightedTask],
        device: str,
        threads: int | None,
        options: MergeOptions | None = None,
    ):
        self.merger = _make_merger(first_recipe, tasks, device, threads, options)

    def map(self, jobs: Sequence[Job], on_result: OnResult, should_stop: ShouldStop) -> None:
        for job in jobs:
            if should_stop():
                return
            on_result(job, self.merger.score(job.recipe))

    def close(self) -> None:
        pass


class _Actor:
    def __init__(
        self,
        first_recipe: dict[str, Any],
        definition: SearchDefinition,
        device: str,
        threads: int | None,
        options: MergeOptions | None = None,
    ):
        self.merger = _make_merger(first_recipe, load_tasks(definition), device, threads, options)

    def score(self, recipe: dict[str, Any]) -> Scored:
        return self.merger.score(recipe)


class RayWorkers:
    def __init__(
        self,
        first_recipe: dict[str, Any],
        definition: SearchDefinition,
        *,
        workers: int,
        address: str | None,
        cpus_per_worker: int,
        gpus_per_worker: float | None = None,
        options: MergeOptions | None = None,
    ) -> None:
        ray = require("ray", "mergesmith search with --workers > 1 or --ray-address")
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers * cpus_per_worker, include_dashboard=False, log_to_driver=False)
            self._started = True
        resources = ray.cluster_resources()
        gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        if address and workers <= 1:
            workers = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1) // cpus_per_worker)
        workers = max(1, workers)
        device = "cuda" if gpus else "cpu"
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=1, max_task_retries=0)(_Actor)
        self.actors = [actor.remote(first_recipe, definition, device, cpus_per_worker, options) for _ in range(workers)]
        log.info("search: %d Ray workers (%s each)", workers, f"{gpus} GPU" if gpus else f"{cpus_per_worker} CPU")

    def map(self, jobs: Sequence[Job], on_result: OnResult, should_stop: ShouldStop) -> None:
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(jobs)
        idle = list(self.actors)
        pending: dict[Any, tuple[Job, Any]] = {}
        retries: dict[int, int] = {}
        while queue or pending:
            while queue and idle and not should_stop():
                actor = idle.pop(0)
                job = queue.popleft()
                pending[actor.score.remote(job.recipe)] = (job, actor)
            if not pending:
                return
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:
                retries[job.index] = retries.get(job.index, 0) + 1
                if retries[job.index] > 3:
                    raise MergeError(f"candidate {job.index}: its worker was lost three times ({err})") from None
                log.warning("search: a worker was lost; candidate %d goes to another worker", job.index)
                self.actors.remove(actor)
                try:  # Ray restarts it (max_restarts): release its CPUs/GPU rather than keep it idle
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                if not self.actors:
                    raise MergeError("every search worker was lost") from None
                queue.appendleft(job)
                continue
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, MergeError):
                    raise MergeError(cause.message, cause.where) from None
                raise
            idle.append(actor)
            on_result(job, result)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()
