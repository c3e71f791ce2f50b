"""The `--as-lora` output as a sink of the executor: each merged tensor, with the base's tensor of
that name, goes to the adapter builder (which factors it against the base)."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.lora.builder import AdapterBuilder
from mergesmith.sources.reader import TensorSource


class AdapterSink:
    """A `TensorSink` (`engine.sinks`): the builder keeps what it is given, so it takes whole tensors."""

    def __init__(self, builder: AdapterBuilder, base: TensorSource) -> None:
        self.builder = builder
        self.base = base

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.builder.add(name, tensor, self.base.get(name))
