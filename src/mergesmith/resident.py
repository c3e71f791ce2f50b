"""A merge kept in memory: a `transformers` model whose parameters the engine overwrites in place.

`search` scores every candidate so (no checkpoint written) and `eval` loads a `base+adapter`
reference so: both through `prepare_merge`, as `run` prepares, so the model they score is the
model `run` would write (the same vocabulary alignment, the same LoRA folding, the same options).

The input models are prepared once (memory-mapped, embeddings on the output vocabulary); each
recipe after the first is only planned (pure, cheap) against them and executed into a
`ResidentSink`.
"""

from __future__ import annotations

from typing import Any

from mergesmith.engine.executor import Executor
from mergesmith.engine.sinks import ResidentSink
from mergesmith.lazy_torch import torch
from mergesmith.plan import Plan, plan_merge
from mergesmith.preparation import MergeOptions, prepare_merge
from mergesmith.recipe.schema import MergeConfig
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.reader import TensorSource
from mergesmith.tokenizer.align import alignment_of


class ResidentMerge:
    """One loaded model and the prepared inputs of the recipes merged into it."""

    def __init__(self, first: MergeConfig, options: MergeOptions | None = None, dtype: str | None = None):
        """`first` fixes the models and the output vocabulary; `dtype` the resident model's dtype
        (default: the plan's output dtype)."""
        self.options = options or MergeOptions()
        prepared = prepare_merge(first, self.options)
        self.models: dict[str, ModelInfo] = prepared.models
        self.readers: dict[str, TensorSource] = prepared.sources()
        self.model, self.tokenizer = self._load(first, prepared.plan, dtype)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers(remove_duplicate=False)))
        self.targets: dict[str, torch.Tensor] = named

    def _load(self, config: MergeConfig, plan: Plan, dtype: str | None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        donor = self.models[plan.donor].directory
        dtype = dtype or (plan.tensors[0].dtype if plan.tensors else "float32")
        trust = self.options.trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(donor, dtype=getattr(torch, dtype), trust_remote_code=trust)
        model = model.to(self.options.device).eval()
        embed = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        rows = next((t.shape[0] for t in plan.tensors if t.name == embed), None)
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows)  # the output vocabulary's rows (an aligned tokenizer, an adapter's)
        alignment = alignment_of(self.models)
        if alignment is not None:
            return model, alignment.built.tokenizer
        tok_dir = donor
        if isinstance(config.tokenizer_source, str) and config.tokenizer_source not in ("base", "union"):
            tok_dir = self.models.get(config.tokenizer_source, self.models[plan.donor]).directory
        return model, AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)

    def load(self, config: MergeConfig) -> None:
        """Overwrite the resident model's weights with the merge of `config` (same models as the first)."""
        plan = plan_merge(config, self.models)
        executor = Executor(
            plan, self.readers, dtype=config.dtype, device=self.options.device, seed=self.options.random_seed or 0
        )
        executor.run(ResidentSink(self.targets, (t.name for t in plan.tensors)))
