"""Whether a model's tokenizer matches the base's: a task vector of embedding rows means nothing when
the rows stand for different tokens, and a merge then needs a `tokenizer:` block."""

from __future__ import annotations

from pathlib import Path

from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo


def vocabulary(directory: Path) -> dict[str, int] | None:
    """token -> id from `tokenizer.json` (with added tokens), or None when there is none to read."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception:  # an unreadable tokenizer is compared by embedding rows only
        return None


def embedding_rows(info: ModelInfo) -> int | None:
    name = arch.embedding_for_lm_head(info.tensors)
    return info.tensors[name].shape[0] if name is not None and info.tensors[name].shape else None


def tokenizer_difference(base: ModelInfo, model: ModelInfo) -> str | None:
    """A sentence saying how `model`'s vocabulary differs from `base`'s, or None when they agree."""
    a, b = vocabulary(base.directory), vocabulary(model.directory)
    parts = []
    if a is not None and b is not None and a != b:
        only_model = len(set(b) - set(a))
        only_base = len(set(a) - set(b))
        moved = sum(1 for t, i in b.items() if t in a and a[t] != i)
        if only_model:
            parts.append(f"{only_model} token(s) the base lacks")
        if only_base:
            parts.append(f"lacks {only_base} of the base's token(s)")
        if moved:
            parts.append(f"{moved} shared token(s) at other ids")
    ra, rb = embedding_rows(base), embedding_rows(model)
    if ra is not None and rb is not None and ra != rb:
        parts.append(f"{rb} embedding rows against the base's {ra}")
    return ", ".join(parts) if parts else None
