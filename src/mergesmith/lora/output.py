"""`run --as-lora RANK`: write a merge as an adapter of the recipe's base model.

The merge streams as usual; the write callback receives each merged tensor and hands
(merged, base) to an AdapterBuilder, so merging several adapters of one base is exact in weight
space and only the final difference is truncated. A tokenizer block's output vocabulary travels
with the adapter: the embedding rows are read on it (aligned sources), they differ in shape from
the base's and are kept whole (modules_to_save), and the built tokenizer is written, so a user
resizes the base to `len(tokenizer)` before loading the adapter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.engine.executor import Executor
from mergesmith.errors import MergeError
from mergesmith.lora.builder import AdapterBuilder, ExtractOptions, ModuleReport
from mergesmith.lora.card import adapter_card, report_summary
from mergesmith.lora.kinds import module_kinds, ties_head
from mergesmith.lora.sink import AdapterSink
from mergesmith.merge import MergeOptions, MergeSummary, peak_rss_bytes
from mergesmith.output import model_files
from mergesmith.output.staging import StagedOutput
from mergesmith.plan import OutputTensor, Plan, referenced_models
from mergesmith.preparation import merge_sources, merge_statistics, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.sources.model import load_model_info
from mergesmith.sources.reader import TensorReader
from mergesmith.sources.refs import ModelRef, parse_ref
from mergesmith.tokenizer.align import save_output_tokenizer

log = logging.getLogger("mergesmith")


@dataclass
class AdapterSummary(MergeSummary):
    """The run summary, with the adapter's per-module report on the same line."""

    reports: list[ModuleReport] = field(default_factory=list)

    def line(self) -> str:
        return f"{super().line()}; adapter: {report_summary(self.reports)}"


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
) -> AdapterSummary:
    start = time.perf_counter()
    if config.base_model is None:
        raise MergeError("--as-lora writes an adapter of the base model; the recipe needs 'base_model'", "base_model")
    staged = StagedOutput(Path(out), options.overwrite)
    staged.check()
    plan, models = prepare_merge(config, options)
    if on_plan is not None:
        on_plan(plan)
    ref = parse_ref(config.base_model, "base_model")
    plain = ModelRef(ref.path, ref.revision)  # the adapter applies to the base without any adapter of its own
    base = load_model_info(plain, options.transformers_cache)
    missing = [t.name for t in plan.tensors if t.name not in base.tensors]
    if missing:
        raise MergeError(f"--as-lora needs every output tensor in the base model; it lacks {missing[:3]}", "base_model")
    builder = AdapterBuilder(
        ExtractOptions(max_rank=rank or 1 << 30, energy=energy, device=options.device),
        module_kinds(base.config),
        tied=ties_head(base.config, base.tensors),
    )
    reader = TensorReader(base)
    directory = staged.begin()
    try:
        executor = Executor(
            plan,
            merge_sources(models),  # embeddings on the output vocabulary, as `run` reads them
            dtype=config.dtype,
            device=options.device,
            seed=options.random_seed or 0,
            statistics=merge_statistics(plan, models, config, options),
        )
        executor.run(AdapterSink(builder, reader), progress)
        reports = builder.save(directory, str(plain))
        files = ["adapter_model.safetensors", "adapter_config.json", "lora_report.json", "mergesmith_config.yml"]
        (directory / "mergesmith_config.yml").write_text(recipe_text)
        if options.copy_tokenizer:
            built = save_output_tokenizer(directory, models)  # a tokenizer block's vocabulary, else the base's
            files += built or model_files.copy_tokenizer(directory, base.directory)
        if options.write_model_card:
            summary = report_summary(reports)
            refs = referenced_models(config)
            card = adapter_card(Path(out).name, config.merge_method, plain, refs, recipe_text, summary)
            (directory / "README.md").write_text(card)
            files.append("README.md")
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    for w in builder.warnings:
        log.warning(w)
    return AdapterSummary(
        out=staged.out,
        files=files,
        seconds=time.perf_counter() - start,
        bytes_read=plan.bytes_read,
        bytes_written=(staged.out / "adapter_model.safetensors").stat().st_size,
        peak_rss=peak_rss_bytes(),
        warnings=[*plan.warnings, *builder.warnings],
        reports=reports,
    )
