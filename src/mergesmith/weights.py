"""Writing a merge's weights in this process: the prepared sources stream through the executor,
each tensor checked by the audit, into the shard writer.

Its own module because two commands-level callers run it: `merge.run_merge` (a local merge) and
each Ray task of a distributed one (`distributed.merge_task`), which `run_merge` also calls; kept in
merge.py it closed a cycle merge -> distributed -> merge.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergesmith.engine.executor import Executor
from mergesmith.output.shards import ShardWriter
from mergesmith.plan import OutputTensor, Plan
from mergesmith.preparation import MergeOptions, merge_sources, merge_statistics
from mergesmith.recipe.schema import MergeConfig
from mergesmith.reliability.audit import Audit, open_audit
from mergesmith.sources.model import ModelInfo


def write_weights(
    plan: Plan,
    models: dict[str, ModelInfo],
    directory: Path,
    config: MergeConfig | None,
    options: MergeOptions,
    progress: Callable[[OutputTensor], None] | None = None,
    audit: Audit | None = None,
) -> list[str]:
    """Stream every planned tensor through its method into the shards; returns the shard names.

    The audit checks each tensor before the writer gets it and skips the shards a resumed run reuses.
    `config`: the recipe (its `dtype` rounds the inputs, its method may need calibration), or None
    for a plan that no recipe made (`mergesmith moe`)."""
    audit = audit or open_audit(directory, plan, models, options)
    # the journal writes the whole index
    writer = ShardWriter(directory, audit.journal.pending, fsync=options.sync, index=False)
    try:
        sources = merge_sources(models)
        executor = Executor(
            audit.journal.pending_plan(plan),
            sources,
            dtype=config.dtype if config is not None else None,
            device=options.device,
            seed=options.random_seed or 0,
            statistics=merge_statistics(plan, models, config, options) if config is not None else None,
        )
        executor.run(audit.wrap(writer), progress)
    except BaseException:
        writer.abort()
        raise
    files = audit.journal.finish(writer.close())
    audit.check_reused(directory)
    return files
