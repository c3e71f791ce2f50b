"""Preparing a merge: a recipe and options -> the plan, the models on the output vocabulary, and the
tensor sources every merging command reads (issue #18: one preparation, so `run`, `--as-lora` and the
in-memory merges cannot drift apart on vocabulary alignment or LoRA inputs)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from mergesmith.calibration import Statistics, calibrate
from mergesmith.lora import inputs as _lora_inputs  # noqa: F401  (registers base+adapter references)
from mergesmith.methods.registry import get_method
from mergesmith.plan import Plan, plan_merge, referenced_models
from mergesmith.recipe.leniency import check_recipe, enforce
from mergesmith.recipe.schema import MergeConfig
from mergesmith.sources.model import ModelInfo, load_model_info
from mergesmith.sources.reader import TensorSource, open_sources
from mergesmith.tokenizer import align_vocabularies, aligned_sources

log = logging.getLogger("mergesmith")


@dataclass
class MergeOptions:
    device: str = "cpu"
    out_shard_size: int = 5_000_000_000
    copy_tokenizer: bool = True
    write_model_card: bool = True
    random_seed: int | None = None
    overwrite: bool = False
    transformers_cache: str | None = None
    safe_serialization: bool = True
    trust_remote_code: bool = False
    lora_merge_cache: str | None = None
    lora_merge_dtype: str | None = None  # dtype of base+LoRA tensors (and of their cache)
    resume: bool = False  # reuse the finished shards of an interrupted run of the same merge
    allow_nonfinite: bool = False  # keep NaN/Inf in the output instead of failing
    strict: bool = False  # a key or parameter mergekit would ignore is an error, not a warning
    workers: int = 0  # > 0: split the merge into this many Ray tasks (distributed.py)
    ray_address: str | None = None  # a running Ray cluster to use (else --workers starts a local one)
    allow_identical_experts: bool = False  # moe: every expert may be one model (upcycling, to train after)
    sync: bool = True  # the output is on the disk before success is reported (False: in the page cache)


class PreparedMerge(NamedTuple):
    """The plan and its models (ModelInfo copies on the output vocabulary when the recipe has a tokenizer
    block). A tuple, so `plan, models = prepare_merge(...)` reads as before."""

    plan: Plan
    models: dict[str, ModelInfo]

    def sources(self) -> dict[str, TensorSource]:
        return merge_sources(self.models)


def merge_sources(models: dict[str, ModelInfo]) -> dict[str, TensorSource]:
    """The tensor sources of a merge: each model's reader, embeddings on the output vocabulary."""
    return aligned_sources(models, open_sources(models))


def merge_statistics(
    plan: Plan, models: dict[str, ModelInfo], config: MergeConfig, options: MergeOptions
) -> Statistics | None:
    """The calibration statistics the recipe's method needs (collected once, then cached), or None."""
    kind = get_method(config.merge_method).calibration
    if kind is None:
        return None
    merged = list(dict.fromkeys(x.model for t in plan.tensors for x in t.others))
    return calibrate(kind, config.calibration, models, merged, options.device)


def load_models(config: MergeConfig, options: MergeOptions) -> dict[str, ModelInfo]:
    return {
        ref.key: load_model_info(
            ref, options.transformers_cache, options.lora_merge_cache, lora_merge_dtype=options.lora_merge_dtype
        )
        for ref in referenced_models(config)
    }


#: How to prepare a merge described by another kind of config than a recipe (`mergesmith moe`'s), by
#: the config's type: the package owning that config registers it when imported, so that this module
#: imports no command (they import it).
PREPARATIONS: dict[type, Callable[[Any, MergeOptions], PreparedMerge]] = {}


def register_preparation(config_type: type, prepare: Callable[[Any, MergeOptions], PreparedMerge]) -> None:
    PREPARATIONS[config_type] = prepare


def prepare_merge(config: MergeConfig | Any, options: MergeOptions) -> PreparedMerge:
    """Metadata only: resolve every model, align the vocabularies and build the plan (what `--dry-run`
    shows); no tensor is read until `PreparedMerge.sources()`. A config of a registered kind is
    prepared by its own preparation (MoE's also computes its gate rows, a model of the merge)."""
    other = PREPARATIONS.get(type(config))
    if other is not None:
        return other(config, options)
    get_method(config.merge_method)  # an unknown method fails before any model is touched
    report_ignored(config, options.strict)
    models = load_models(config, options)
    models = align_vocabularies(
        config, models, options.transformers_cache
    )  # a tokenizer block puts every embedding on the output vocab
    return PreparedMerge(plan_merge(config, models), models)


def report_ignored(config: MergeConfig, strict: bool, source: str = "recipe") -> None:
    """Each key or parameter the merge ignores, as mergekit does: a warning, or with `strict` an error
    raised before any model is opened."""
    found = check_recipe(config)
    enforce(found, strict, source)
    for f in found:
        (log.warning if f.level == "warning" else log.info)(f.line())
