"""`mergesmith moe`: the prepared MoE plan (moe.prepare) through `run`'s output path, then its side files.

The plan runs through the same engine, audit and resumable shard writer as a recipe merge
(`merge.write_output`): copies stream file to file, every tensor is checked for NaN/Inf, and an
interrupted build resumes with `--resume`. What is MoE's own is written here: the MoE family's
config.json, the base's tokenizer and generation config, the config copy and the model card.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mergesmith.merge import MergeOptions, MergeSummary, already_complete, peak_rss_bytes, write_output
from mergesmith.moe import families
from mergesmith.moe.config import MoEConfig
from mergesmith.moe.prepare import family_of, output_dtype
from mergesmith.output import card, model_files
from mergesmith.output.staging import StagedOutput
from mergesmith.plan import OutputTensor
from mergesmith.preparation import prepare_merge
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.refs import parse_ref
from mergesmith.weights import write_weights

log = logging.getLogger("mergesmith")

RECIPE_COPY = "mergesmith_moe_config.yml"


def run_moe(
    config: MoEConfig,
    text: str,
    out: str | Path,
    options: MergeOptions | None = None,
    progress: Callable[[OutputTensor], None] | None = None,
) -> MergeSummary:
    """Build the MoE of `config` (its YAML `text` is kept in the output) into `out`."""
    options = options or MergeOptions()
    start = time.perf_counter()
    staged = StagedOutput(Path(out), options.overwrite)
    finished = options.resume and not options.overwrite and staged.has_files()
    if not finished:
        staged.check()
    plan, models = prepare_merge(config, options)
    if finished:
        return already_complete(staged.out, plan, models, text, options, start, RECIPE_COPY)
    for w in plan.warnings:
        log.warning(w)
    files, notes = write_output(
        staged,
        plan,
        models,
        options,
        lambda directory, audit: write_weights(plan, models, directory, None, options, progress, audit),
        lambda directory: write_side_files(directory, Path(out).name, config, text, models, options),
    )
    return MergeSummary(
        staged.out,
        files,
        time.perf_counter() - start,
        plan.bytes_read,
        plan.bytes_written,
        peak_rss_bytes(),
        plan.warnings,
        notes,
    )


def write_side_files(
    directory: Path, name: str, config: MoEConfig, text: str, models: dict[str, ModelInfo], options: MergeOptions
) -> None:
    base = models[parse_ref(config.base_model, "base_model").key]
    family = family_of(config, models)
    out_config = families.moe_config(
        family,
        base.config,
        len(config.experts),
        config.experts_per_token,
        int(base.config.get("intermediate_size", 0)) * len(config.shared_experts or []),
        output_dtype(config, base),
    )
    out_config.save_pretrained(directory)
    if options.copy_tokenizer:
        model_files.copy_tokenizer(directory, base.directory)
        write_generation_config(directory, base.directory, out_config)
    (directory / RECIPE_COPY).write_text(text)
    if options.write_model_card:
        (directory / "README.md").write_text(card.moe_model_card(name, family.name, config, text))


def write_generation_config(directory: Path, base_dir: Path, out_config: object) -> None:
    """The base's generation config, with a pad token (eos when the base has none) so `generate` works."""
    path = base_dir / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if data.get(key) is None and getattr(out_config, key, None) is not None:
            data[key] = getattr(out_config, key)
    if data.get("pad_token_id") is None and data.get("eos_token_id") is not None:
        eos = data["eos_token_id"]
        data["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    (directory / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
