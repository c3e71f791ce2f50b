"""Architecture from tensor names: no per-architecture files needed for decoder-only models.

A layer tensor is one whose name has `<container>.<index>.` with a container such as `layers`,
`h`, `blocks` or `layer`; the first such container counts (T5's `block.N.layer.M.` is layer N),
and the rest of the name is the layer template. Models with several stacks are described by
`sources.structure`, which asks transformers. Non-layer tensors are pre
weights (embeddings: taken from the first slice of a frankenmerge) or post weights (final norm,
lm_head: taken from the last slice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LAYER_RE = re.compile(
    r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|blocks|block|decoder_layers))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
EMBED_MARKERS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embeddings.", "tok_embeddings")
LM_HEAD_MARKERS = ("lm_head", "embed_out", "output.weight")
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
VOCAB_KEYS = ("vocab_size", "padded_vocab_size", "n_vocab")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def parse_layer_name(name: str) -> LayerName | None:
    m = LAYER_RE.match(name)
    if m is None:
        return None
    return LayerName(m["prefix"], int(m["index"]), m["rest"])


WORD_EMBED_MARKERS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def is_embedding(name: str) -> bool:
    """Token embeddings and output heads: their first axis is the vocabulary."""
    return (
        any(m in name for m in EMBED_MARKERS)
        and "position" not in name
        and "wpe" not in name
        and "token_type" not in name
        and "patch" not in name
    ) or is_lm_head(name)


def is_word_embedding(name: str) -> bool:
    """The input token embeddings only (not BERT's token-type or position rows): they size the vocabulary."""
    if name in ("shared.weight", "backbone.embeddings.weight"):  # T5, Mamba
        return True
    return any(m in name for m in WORD_EMBED_MARKERS) and "position" not in name


def is_lm_head(name: str) -> bool:
    return any(m in name for m in LM_HEAD_MARKERS)


def is_pre_weight(name: str) -> bool:
    """Embedding-side non-layer tensors come before the layers; the rest (norm, lm_head) after."""
    return any(m in name for m in EMBED_MARKERS) and not is_lm_head(name)


def layer_count(tensor_names: list[str] | set[str]) -> int:
    indices = [p.index for n in tensor_names if (p := parse_layer_name(n)) is not None]
    return max(indices) + 1 if indices else 0


def num_layers_key(config: dict[str, Any]) -> str | None:
    """The config.json key holding the layer count (dotted for nested configs), if any."""
    for key in NUM_LAYER_KEYS:
        if isinstance(config.get(key), int):
            return key
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in NUM_LAYER_KEYS:
            if isinstance(text.get(key), int):
                return f"text_config.{key}"
    return None


def get_dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def embedding_for_lm_head(names: set[str] | dict[str, Any]) -> str | None:
    """The input-embedding tensor that a tied lm_head shares."""
    for n in names:
        if any(m in n for m in ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")):
            if n.endswith(".weight") and "position" not in n:
                return n
    return None
