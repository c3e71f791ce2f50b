"""What kind of layer each weight belongs to (Linear, GPT-2 Conv1D, Embedding, other), which decides
how a weight difference becomes an adapter. Read from the architecture built on the meta device
(no memory, no weights); without a loadable architecture, from tensor names and shapes."""

from __future__ import annotations

import logging
from typing import Any

from mergesmith.sources import arch

log = logging.getLogger("mergesmith")


def module_kinds(config: dict[str, Any]) -> dict[str, str]:
    """Module name -> "linear" | "conv1d" | "embedding" | "other", from transformers' model class."""
    if not config.get("architectures") and not config.get("model_type"):
        return {}
    try:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as err:  # an architecture transformers cannot build: fall back to names
        log.info("layer kinds from tensor names (%s: %s)", type(err).__name__, err)
        return {}
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
    return kinds


def kind_of(module: str, shape: tuple[int, ...], kinds: dict[str, str]) -> str:
    hits = [k for m, k in kinds.items() if m == module or m.endswith("." + module) or module.endswith("." + m)]
    if hits:
        return hits[0]
    if len(shape) != 2:
        return "other"
    return "embedding" if arch.is_embedding(module) and not arch.is_lm_head(module) else "linear"


def ties_head(config: dict[str, Any], tensors: dict[str, Any]) -> bool:
    """The output head is the input embedding: tied in the config and no head tensor of its own."""
    return bool(config.get("tie_word_embeddings", True)) and not any(arch.is_lm_head(n) for n in tensors)
