"""Checks shared by the post-merge audit and `mergesmith verify`: config.json consistent with the
tensors written. (Their NaN/Inf check is the one scan, `kernels.nonfinite`.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergesmith.sources import arch
from mergesmith.sources.structure import find_structure


def config_problems(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Where config.json disagrees with the tensors written: each stack's layer count, vocabulary size, tie flag."""
    problems = []
    names = list(shapes)
    cfg = dict(config)
    structure = find_structure(cfg, names)
    for stack in structure.stacks:
        if stack.count_key is not None and arch.get_dotted(cfg, stack.count_key) != stack.layers:
            problems.append(
                f"config.json {stack.count_key} is {arch.get_dotted(cfg, stack.count_key)}"
                f" but the weights have {stack.layers} layers in {stack.prefix}"
            )
    vocab = [n for n in structure.vocab_tensors if not arch.is_lm_head(n) and len(shapes[n]) == 2]
    embed = vocab[0] if vocab else None
    if embed is not None:
        text = cfg.get("text_config")
        for vk in arch.VOCAB_KEYS:
            for where, value in (
                (vk, cfg.get(vk)),
                (f"text_config.{vk}", text.get(vk) if isinstance(text, dict) else None),
            ):
                if isinstance(value, int) and value != shapes[embed][0]:
                    problems.append(f"config.json {where} is {value} but {embed} has {shapes[embed][0]} rows")
    head = next((n for n in names if arch.is_lm_head(n)), None)
    tie = config.get("tie_word_embeddings")
    if tie is False and head is None and embed is not None:
        problems.append("config.json has tie_word_embeddings false but the weights have no lm_head")
    if tie is True and head is not None and embed is not None:
        problems.append(f"config.json has tie_word_embeddings true but the weights have their own {head}")
    return problems
