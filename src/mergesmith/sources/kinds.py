"""Kinds of model reference: how a reference that is not a plain model directory gets its metadata.

sources/ reads plain model directories (safetensors or `.bin`). A higher layer that adds another kind
of input (lora/inputs.py adds `base+adapter`) registers it here when it is imported, so sources/ never
imports the layers above it and `load_model_info` needs no knowledge of them. The kind's loader returns
a `ModelInfo` whose `opener` makes its tensor source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergesmith.sources.refs import ModelRef


@dataclass(frozen=True)
class LoadOptions:
    """What `load_model_info` was asked beyond the reference (the hub cache, the LoRA merge options)."""

    cache_dir: str | None = None
    lora_merge_cache: str | None = None
    lora_merge_dtype: str | None = None


@dataclass(frozen=True)
class SourceKind:
    """A kind of reference: `matches` picks its references, `load` reads their metadata."""

    name: str
    matches: Callable[[ModelRef], bool]
    load: Callable[[ModelRef, LoadOptions], Any]  # -> sources.model.ModelInfo (which imports this module)


_KINDS: dict[str, SourceKind] = {}


def register_kind(kind: SourceKind) -> None:
    """Add (or replace, by name) a kind of reference; registering a module's kind twice is harmless."""
    _KINDS[kind.name] = kind


def kind_for(ref: ModelRef) -> SourceKind | None:
    """The registered kind that reads `ref`, or None for a plain model directory."""
    return next((k for k in _KINDS.values() if k.matches(ref)), None)
