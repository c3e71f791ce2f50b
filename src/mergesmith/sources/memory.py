"""Tensors made in memory before a merge runs, read like a model's (MoE's router rows).

A command that computes some output tensors itself (`mergesmith moe`: gate rows from prompts or
a seeded draw) offers them as one more model of the merge, so they are planned as inputs and
written by the same engine and audit as every other tensor. Such a model has no files: the resume
fingerprint counts the digest of its bytes instead, so a resumed run reuses shards only when it
computed the same tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from mergesmith.lazy_torch import torch
from mergesmith.sources.model import ModelInfo, TensorMeta
from mergesmith.sources.refs import ModelRef


class MemorySource:
    """A `TensorSource` over tensors held in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def memory_model(key: str, tensors: Mapping[str, torch.Tensor]) -> ModelInfo:
    """A model of the merge, keyed `key`, whose tensors are `tensors` (CPU, contiguous); its
    `directory` names no files."""
    owned = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metas = {name: TensorMeta(tuple(t.shape), str(t.dtype).removeprefix("torch."), "") for name, t in owned.items()}
    return ModelInfo(
        ref=ModelRef(key),
        directory=Path(key),
        config={},
        tensors=metas,
        format="memory",
        opener=lambda: MemorySource(owned),
        digest=tensors_digest(owned),
    )
