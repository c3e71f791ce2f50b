"""Running a recipe end to end: config -> plan -> execute -> write, into an atomically staged directory."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.errors import InputChangedError, MergeError
from mergesmith.methods.registry import get_method
from mergesmith.output import card, model_files
from mergesmith.output.staging import StagedOutput
from mergesmith.plan import OutputTensor, Plan, referenced_models
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.reliability.audit import Audit, finish_report, merge_fingerprint, open_audit
from mergesmith.reliability.resume import RECIPE_COPY, finished_problem, record_finished
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.refs import parse_ref
from mergesmith.tokenizer import save_vocabulary
from mergesmith.weights import write_weights

log = logging.getLogger("mergesmith")


@dataclass
class MergeSummary:
    out: Path
    files: list[str]
    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the audit summary, shown after `line()`
    already_complete: bool = False  # --resume found OUT already holding this merge; nothing was written

    def line(self) -> str:
        if self.already_complete:
            return f"already complete: {self.out} holds this merge ({len(self.files)} shards checked); nothing to do"
        gb = 1e9
        return (
            f"merged in {self.seconds:.1f} s: read {self.bytes_read / gb:.2f} GB, wrote {self.bytes_written / gb:.2f} GB"
            f" ({(self.bytes_read + self.bytes_written) / gb / max(self.seconds, 1e-9):.2f} GB/s),"
            f" peak RSS {self.peak_rss / 2**30:.2f} GiB -> {self.out}"
        )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_side_files(
    directory: Path,
    name: str,
    plan: Plan,
    models: dict[str, ModelInfo],
    config: MergeConfig,
    recipe_text: str,
    options: MergeOptions,
) -> None:
    """config.json, tokenizer, chat template, recipe copy and model card."""
    donor = models[plan.donor]
    model_files.write_config(directory, donor.config, plan.config_updates)
    built = save_vocabulary(directory, models, plan.donor, options.copy_tokenizer)  # a tokenizer block's output
    if options.copy_tokenizer and not built:
        model_files.copy_tokenizer(directory, donor.directory)
        model_files.copy_generation_config(directory, donor.directory)
    if config.chat_template:
        from mergesmith.output.chat_template import apply_chat_template

        apply_chat_template(directory, config.chat_template, [m.directory for m in models.values()])
    (directory / "mergesmith_config.yml").write_text(recipe_text)
    if options.write_model_card:
        base = parse_ref(config.base_model, "base_model") if config.base_model is not None else None
        licence = card.agreed_license(m.directory for m in models.values())
        text = card.model_card(
            name, get_method(config.merge_method), base, referenced_models(config), recipe_text, license=licence
        )
        (directory / "README.md").write_text(text)


def run_merge(
    config: MergeConfig,
    recipe_text: str,
    out: str | Path,
    options: MergeOptions | None = None,
    progress: Callable[[OutputTensor], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    plan_transform: Callable[[Plan, dict[str, ModelInfo]], Plan] | None = None,
) -> MergeSummary:
    """Merge `config` into `out`. `plan_transform` may rewrite the plan (and add models) before execution."""
    options = options or MergeOptions()
    start = time.perf_counter()
    staged = StagedOutput(Path(out), options.overwrite)
    finished = options.resume and not options.overwrite and staged.has_files()
    if not finished:
        staged.check()
    plan, models = prepare_merge(config, options)
    distributed = bool(options.workers or options.ray_address)
    if distributed:
        from mergesmith.distributed import require_ray

        require_ray()  # before any work
    if plan_transform is not None:
        if distributed:
            raise MergeError(
                "--workers and --ray-address split plain recipe merges only (this command rewrites the plan)",
                "--workers",
            )
        plan = plan_transform(plan, models)
    if finished:
        return already_complete(staged.out, plan, models, recipe_text, options, start)
    for w in plan.warnings:
        log.warning(w)
    if on_plan is not None:
        on_plan(plan)
    if not options.safe_serialization:
        log.warning("--no-safe-serialization: writing safetensors anyway (pickled .bin output is unsafe to share)")
    write = write_weights
    if distributed:
        from mergesmith.distributed import write_weights_distributed as write
    files, notes = write_output(
        staged,
        plan,
        models,
        options,
        lambda directory, audit: write(plan, models, directory, config, options, progress, audit),
        lambda directory: write_side_files(directory, Path(out).name, plan, models, config, recipe_text, options),
    )
    return MergeSummary(
        out=staged.out,
        files=files,
        seconds=time.perf_counter() - start,
        bytes_read=plan.bytes_read,
        bytes_written=plan.bytes_written,
        peak_rss=peak_rss_bytes(),
        warnings=plan.warnings,
        notes=notes,
    )


def write_output(
    staged: StagedOutput,
    plan: Plan,
    models: dict[str, ModelInfo],
    options: MergeOptions,
    weights: Callable[[Path, Audit], list[str]],
    side_files: Callable[[Path], None],
) -> tuple[list[str], list[str]]:
    """A command's output into its staging directory, then moved into place: the weights (through the
    audit, journaled for --resume), its side files, the audit report. On failure the finished shards
    are kept for --resume where that helps, else the staging directory goes. Returns (shard files,
    the audit's notes)."""
    directory = staged.begin(keep=options.resume)
    audit = None
    try:
        audit = open_audit(directory, plan, models, options)
        files = weights(directory, audit)
        side_files(directory)
        notes = finish_report(directory, plan, models, audit, options.random_seed or 0)
        record_finished(directory, merge_fingerprint(plan, models, options, mtimes=False)[1], audit.journal)
        audit.journal.remove()
        staged.commit()
    except BaseException as err:
        if isinstance(err, InputChangedError):
            log.warning(
                "an input file changed during the merge; the unfinished output is kept in %s: delete it, or"
                " run again once the input is whole",
                staged.staging,
            )
        elif audit is not None and (audit.write_failed or not isinstance(err, Exception)) and audit.journal.done:
            log.warning(
                "the finished shards are kept in %s: run the same command with --resume to reuse them, or delete it",
                staged.staging,
            )
        else:
            staged.discard()
        raise
    return files, notes


def already_complete(
    out: Path,
    plan: Plan,
    models: dict[str, ModelInfo],
    recipe_text: str,
    options: MergeOptions,
    start: float,
    recipe_copy: str = RECIPE_COPY,
) -> MergeSummary:
    """`--resume` on a non-empty OUT: succeed, writing nothing, when OUT is already this merge, whole.

    A rerun of a script, or a kill that came after the staging directory moved into place, must not
    fail (nor redo hours of work); anything else in OUT is refused as without --resume."""
    shards, print_ = merge_fingerprint(plan, models, options, mtimes=False)
    problem = finished_problem(out, shards, print_, recipe_text, recipe_copy)
    if problem is not None:
        raise MergeError(
            f"--resume: the output directory is not this merge, complete ({problem}); pass --overwrite to replace it",
            str(out),
        )
    log.info("--resume: %s already holds this merge", out)
    return MergeSummary(
        out=out,
        files=[s.file for s in shards],
        seconds=time.perf_counter() - start,
        bytes_read=0,
        bytes_written=0,
        peak_rss=peak_rss_bytes(),
        already_complete=True,
    )
