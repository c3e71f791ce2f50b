"""Scoring candidates in memory: merge straight into a resident model's parameters.

The input models are opened once (memory-mapped safetensors); one `transformers` model stays
loaded. For each candidate the recipe is planned (pure, cheap), every output tensor is computed by
the engine and copied into the matching parameter in place. No checkpoint is written.

A tokenizer block (`tokenizer: {source: union}` and the like) is aligned once, from the first
recipe, as `run` does: the sources put every embedding on the output vocabulary, the resident model
is resized to it and scored with the built tokenizer, so a candidate scores what `run` would write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mergesmith.engine.executor import Executor
from mergesmith.engine.sinks import ResidentSink
from mergesmith.plan import plan_merge, referenced_models
from mergesmith.preparation import merge_sources
from mergesmith.recipe.schema import MergeConfig, parse_config
from mergesmith.search.tasks import WeightedTask
from mergesmith.sources.model import ModelInfo, load_model_info
from mergesmith.sources.reader import TensorSource
from mergesmith.tokenizer import align_vocabularies
from mergesmith.tokenizer.align import alignment_of


@dataclass
class Scored:
    scores: dict[str, float]  # task label -> metric (the runner aggregates them: search/fitness.py)
    seconds: float


class InMemoryMerger:
    def __init__(self, first_recipe: dict[str, Any], tasks: list[WeightedTask], device: str = "cpu", seed: int = 0):
        config = parse_config(first_recipe, "genome")
        loaded = {ref.key: load_model_info(ref) for ref in referenced_models(config)}
        self.models: dict[str, ModelInfo] = align_vocabularies(config, loaded)  # the output vocabulary, as `run`
        self.readers: dict[str, TensorSource] = merge_sources(self.models)
        self.tasks = tasks
        labels = [t.label for t in tasks]
        self.labels = [lab if labels.count(lab) == 1 else f"{lab}#{i}" for i, lab in enumerate(labels)]
        self.device = device
        self.seed = seed
        self.model, self.tokenizer = self._load_resident(config)
        self.targets = self._parameters()

    def _load_resident(self, config: MergeConfig) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        plan = plan_merge(config, self.models)
        donor = self.models[plan.donor].directory
        dtype = getattr(torch, plan.tensors[0].dtype) if plan.tensors else torch.float32
        model = AutoModelForCausalLM.from_pretrained(donor, dtype=dtype).to(self.device).eval()
        tok_dir = donor
        if isinstance(config.tokenizer_source, str) and config.tokenizer_source not in ("base", "union"):
            tok_dir = self.models.get(config.tokenizer_source, self.models[plan.donor]).directory
        alignment = alignment_of(self.models)
        if alignment is None:
            return model, AutoTokenizer.from_pretrained(tok_dir)
        embed = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        rows = next((t.shape[0] for t in plan.tensors if t.name == embed), None)
        if rows is not None:  # the donor's rows become the output vocabulary's; load_weights fills them
            model.resize_token_embeddings(rows)
        return model, alignment.built.tokenizer

    def _parameters(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers(remove_duplicate=False)))
        return named

    def load_weights(self, recipe: dict[str, Any]) -> None:
        """Overwrite the resident model's weights with the merge of `recipe`."""
        config = parse_config(recipe, "candidate")
        plan = plan_merge(config, self.models)
        executor = Executor(plan, self.readers, dtype=config.dtype, device=self.device, seed=self.seed)
        executor.run(ResidentSink(self.targets, (t.name for t in plan.tensors)))

    def score(self, recipe: dict[str, Any]) -> Scored:
        start = time.perf_counter()
        self.load_weights(recipe)
        scores: dict[str, float] = {}
        with torch.no_grad():
            for task, label in zip(self.tasks, self.labels, strict=True):
                scores[label] = task.score(self.model, self.tokenizer)
        return Scored(scores, time.perf_counter() - start)
