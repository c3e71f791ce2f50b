"""`run --as-lora RANK`: write a merge as an adapter of the recipe's base model.

The merge streams as usual; the write callback receives each merged tensor and hands
(merged, base) to an AdapterBuilder, so merging several adapters of one base is exact in weight
space and only the final difference is truncated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mergesmith.engine.executor import Executor
from mergesmith.errors import MergeError
from mergesmith.lora.builder import AdapterBuilder, ExtractOptions
from mergesmith.lora.kinds import module_kinds
from mergesmith.merge import MergeOptions, MergeSummary, peak_rss_bytes, prepare
from mergesmith.output.staging import StagedOutput
from mergesmith.plan import OutputTensor, Plan
from mergesmith.recipe.schema import MergeConfig
from mergesmith.sources.model import load_model_info
from mergesmith.sources.reader import TensorReader, open_sources
from mergesmith.sources.refs import ModelRef, parse_ref


def run_merge_as_lora(
    config: MergeConfig,
    recipe_text: str,
    out: str | Path,
    options: MergeOptions,
    *,
    rank: int | None,
    energy: float | None,
    progress: Callable[[OutputTensor], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> MergeSummary:
    start = time.perf_counter()
    if config.base_model is None:
        raise MergeError("--as-lora writes an adapter of the base model; the recipe needs 'base_model'", "base_model")
    staged = StagedOutput(Path(out), options.overwrite)
    staged.check()
    plan, models = prepare(config, options)
    if on_plan is not None:
        on_plan(plan)
    ref = parse_ref(config.base_model, "base_model")
    plain = ModelRef(ref.path, ref.revision)  # the adapter applies to the base without any adapter of its own
    base = load_model_info(plain, options.transformers_cache)
    missing = [t.name for t in plan.tensors if t.name not in base.tensors]
    if missing:
        raise MergeError(f"--as-lora needs every output tensor in the base model; it lacks {missing[:3]}", "base_model")
    builder = AdapterBuilder(
        ExtractOptions(max_rank=rank or 1 << 30, energy=energy, device=options.device), module_kinds(base.config)
    )
    reader = TensorReader(base)
    directory = staged.begin()
    try:
        executor = Executor(
            plan, open_sources(models), dtype=config.dtype, device=options.device, seed=options.random_seed or 0
        )
        executor.run(lambda name, value: builder.add(name, value, reader.get(name)), progress)
        reports = builder.save(directory, str(plain))
        (directory / "mergesmith_config.yml").write_text(recipe_text)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    worst = max((r.error for r in reports if r.kind != "full"), default=0.0)
    warnings = [*plan.warnings, f"adapter: {len(reports)} modules, worst relative error {worst:.3e}"]
    return MergeSummary(
        out=staged.out,
        files=["adapter_model.safetensors", "adapter_config.json", "lora_report.json"],
        seconds=time.perf_counter() - start,
        bytes_read=plan.bytes_read,
        bytes_written=(staged.out / "adapter_model.safetensors").stat().st_size,
        peak_rss=peak_rss_bytes(),
        warnings=warnings,
    )
