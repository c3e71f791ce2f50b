"""One merge split across Ray workers (`mergesmith run --workers N [--ray-address ADDR]`).

The driver lays the shards out as a single-process run does and deals them to tasks
(`engine.schedule`) before anything runs. Each task plans the merge again from metadata (so hub
ids resolve in the worker's own cache), checks that it sees the same merge as the driver (the
resume fingerprint: plan, layout, seed, input files), then streams its shards through the same
path as a local run (`weights.write_weights`: executor, audit, shard writer) into the staging
directory, which must be on storage every worker can reach. It returns each shard's size and
CRC-32; the driver checks every file against both before recording it in the resume journal,
then writes the index, config, tokenizer, card and audit itself. A task whose worker dies is run
again by Ray (`max_retries`); a task that fails with a MergeError is not (it would fail again).

Test hook: with `MERGESMITH_TEST_DIE_ONCE=PATH` in a worker's environment, the first task to
create PATH (exclusively) exits its process after writing its first tensor, as a killed worker
would. Nothing else reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.engine.schedule import Task, schedule
from mergesmith.errors import MergeError
from mergesmith.output.shards import file_digest
from mergesmith.plan import OutputTensor, Plan
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.reliability.audit import Audit
from mergesmith.reliability.resume import fingerprint
from mergesmith.shard_layout import Shard, layout_shards
from mergesmith.weights import write_weights

if TYPE_CHECKING:
    from mergesmith.recipe.schema import MergeConfig
    from mergesmith.sources.model import ModelInfo

log = logging.getLogger("mergesmith")

DIE_ONCE = "MERGESMITH_TEST_DIE_ONCE"
RETRIES = 3  # runs of a task after its worker dies


@dataclass
class ShardResult:
    size: int
    digest: str


@dataclass
class TaskResult:
    shards: dict[str, ShardResult]
    checked: int  # output tensors the task's audit checked for NaN/Inf
    nonfinite: dict[str, int] = field(default_factory=dict)


class TaskLedger:
    """What a task's audit reports to instead of the resume journal: the digests of its shards
    (the driver keeps the journal). Duck-types the parts of `ShardJournal` that `write_weights` uses."""

    def __init__(self, shards: list[Shard]) -> None:
        self.pending = shards
        self.reused: list[Shard] = []
        self.done = False
        self.digests: dict[str, str] = {}

    def pending_plan(self, plan: Plan) -> Plan:
        names = {slot.name for s in self.pending for slot in s.slots}
        return replace(plan, tensors=[t for t in plan.tensors if t.name in names])

    def shard_written(self, shard: Shard, digest: str | None = None) -> None:
        if digest is not None:
            self.digests[shard.file] = digest

    def finish(self, written: list[str]) -> list[str]:
        return list(written)


def _die_once_hook() -> Callable[[OutputTensor], None] | None:
    marker = os.environ.get(DIE_ONCE)
    if not marker:
        return None

    def progress(_: OutputTensor) -> None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)

    return progress


def merge_task(
    config: MergeConfig, options: MergeOptions, files: tuple[str, ...], expected: str, staging: str
) -> TaskResult:
    """Runs in a Ray worker: write shards `files` of the merge into `staging`."""
    plan, models = prepare_merge(config, options)
    directory = Path(staging)
    seen = open_audit_fingerprint(plan, models, options)
    if seen != expected:
        raise MergeError(
            "this worker sees a different merge than the driver (other input files, or another"
            " mergesmith version); every worker must reach the same inputs at the same paths",
            staging,
        )
    shards = [s for s in _layout(plan, options) if s.file in set(files)]
    ledger = TaskLedger(shards)
    audit = Audit(ledger, options.allow_nonfinite)  # type: ignore[arg-type]
    written = write_weights(plan, models, directory, config, options, _die_once_hook(), audit)
    result = TaskResult({}, audit.checked, dict(audit.nonfinite))
    for shard in shards:
        digest = ledger.digests.get(shard.file) or file_digest(directory / shard.file)
        result.shards[shard.file] = ShardResult((directory / shard.file).stat().st_size, digest)
    assert set(written) == set(files)
    return result


def _layout(plan: Plan, options: MergeOptions) -> list[Shard]:
    return layout_shards([(t.name, t.dtype, t.shape) for t in plan.tensors], options.out_shard_size)


def open_audit_fingerprint(plan: Plan, models: dict[str, ModelInfo], options: MergeOptions) -> str:
    """The resume fingerprint of this merge, as `open_audit` computes it."""
    return fingerprint(plan, _layout(plan, options), models, options.random_seed or 0, options.device)


def check_shard(directory: Path, shard: Shard, reported: ShardResult) -> None:
    """A task's shard as the driver accepts it: the planned size and header, and the reported CRC-32."""
    path = directory / shard.file
    where = str(path)
    if not path.is_file():
        raise MergeError("a worker reported this shard written, but the driver cannot see it (is the output"
                         " directory on storage that every worker shares?)", where)  # fmt: skip
    size = path.stat().st_size
    if size != shard.size or reported.size != shard.size:
        raise MergeError(f"shard is {size} bytes (the worker reported {reported.size}), planned {shard.size}", where)
    with path.open("rb") as f:
        head = f.read(8 + len(shard.header))
    if head != len(shard.header).to_bytes(8, "little") + shard.header:
        raise MergeError("shard header differs from the planned one", where)
    if file_digest(path) != reported.digest:
        raise MergeError("shard bytes differ from what its worker wrote (CRC-32 mismatch)", where)


def require_ray() -> Any:
    """The `ray` module, or the MergeError that says which extra installs it."""
    try:
        import ray
    except ImportError:
        raise MergeError(
            "--workers and --ray-address need Ray: pip install 'mergesmith[distributed]'", "--workers"
        ) from None
    return ray


def connect(workers: int, address: str | None) -> tuple[Any, bool]:
    """Ray, connected to `address` or to a fresh local cluster of `workers` CPUs; and whether we started it."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return ray, True


def write_weights_distributed(
    plan: Plan,
    models: dict[str, ModelInfo],
    directory: Path,
    config: MergeConfig,
    options: MergeOptions,
    progress: Callable[[OutputTensor], None] | None,
    audit: Audit,
) -> list[str]:
    """The driver's side of `write_weights`: the journal's pending shards go to Ray tasks."""
    journal = audit.journal
    if journal.pending:
        ray, started = connect(options.workers, options.ray_address)
        try:
            workers = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            tasks = schedule(plan, journal.pending, workers)
            expected = open_audit_fingerprint(plan, models, options)
            _run_tasks(ray, tasks, config, options, expected, directory, audit, progress)
        finally:
            if started:
                ray.shutdown()
    files = journal.finish([])
    audit.check_reused(directory)
    return files


def _run_tasks(
    ray: Any,
    tasks: list[Task],
    config: MergeConfig,
    options: MergeOptions,
    expected: str,
    directory: Path,
    audit: Audit,
    progress: Callable[[OutputTensor], None] | None,
) -> None:
    """Start every task, then check and record each one's shards as it finishes."""
    from ray.exceptions import RayError, RayTaskError

    pending: dict[Any, Task] = {}
    try:
        remote = ray.remote(num_cpus=1, max_retries=RETRIES)(merge_task)
        worker_options = replace(options, workers=0, ray_address=None, resume=False)
        for task in tasks:
            pending[remote.remote(config, worker_options, task.files, expected, str(directory))] = task
        log.info("run: %d shards in %d Ray tasks", sum(len(t.shards) for t in tasks), len(tasks))
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                result: TaskResult = ray.get(ref)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, MergeError):
                    raise MergeError(cause.message, cause.where) from None
                raise MergeError(f"task {task.index} ({', '.join(task.files)}) failed: {cause or err}") from None
            except RayError as err:
                audit.write_failed = True  # the finished shards are worth a --resume
                raise MergeError(
                    f"task {task.index} ({', '.join(task.files)}) was lost {RETRIES + 1} times: {err}"
                ) from None
            _accept(task, result, directory, audit, progress)
    finally:
        for ref in pending:  # a failed merge leaves no task writing into the staging directory
            ray.cancel(ref, force=True)


def _accept(
    task: Task, result: TaskResult, directory: Path, audit: Audit, progress: Callable[[OutputTensor], None] | None
) -> None:
    """Check a finished task's shards, record them in the journal, count its audit."""
    for shard in task.shards:
        check_shard(directory, shard, result.shards[shard.file])
        audit.journal.shard_written(shard, result.shards[shard.file].digest)
    audit.checked += result.checked
    for name, bad in result.nonfinite.items():
        audit.nonfinite[name] = audit.nonfinite.get(name, 0) + bad
    if progress is not None:
        for tensor in task.tensors:
            progress(tensor)
