"""Building the output tokenizer (`base`, `union` or one model's) and each model's new-id -> old-id map.

Tokenizers are loaded as `transformers` fast tokenizers. A model whose tokenizer cannot be loaded
is treated as having the base model's. A token counts as present in a model only if its id has a
row in that model's embedding (ids past the rows, e.g. tokens added without resizing, are absent).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError

log = logging.getLogger("mergesmith")


@dataclass
class BuiltTokenizer:
    tokenizer: Any  # transformers fast tokenizer, the one the output saves
    vocab: dict[str, int]  # output token -> id
    model_vocabs: dict[str, dict[str, int]]  # model key -> (token -> old id), only ids with a row
    added: dict[str, str]  # output tokens the source tokenizer lacked -> model key that brought it

    @property
    def size(self) -> int:
        return max(self.vocab.values(), default=-1) + 1

    def index_map(self, key: str) -> list[int]:
        """new id -> old id in model `key`, -1 where the model lacks the token."""
        own = self.model_vocabs[key]
        out = [-1] * self.size
        for token, new in self.vocab.items():
            out[new] = own.get(token, -1)
        return out


def load_tokenizer(directory: Path) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # missing or unreadable files: treated as the base's tokenizer
        log.debug("no tokenizer in %s (%s: %s)", directory, type(err).__name__, err)
        return None


def build_tokenizer(
    source: str,
    base_key: str,
    tokenizers: dict[str, Any],
    rows: dict[str, int],
    extra_tokens: list[str],
    external: Any | None = None,
) -> BuiltTokenizer:
    """`source` is "base", "union" or a model key; `tokenizers` maps every model key to its tokenizer
    (None for none); `rows` is each model's embedding row count. `external` is the source's tokenizer
    when the source is a model that is not merged."""
    from tokenizers import AddedToken

    base_tok = tokenizers[base_key]
    if base_tok is None:
        raise MergeError("the base model has no tokenizer that transformers can load", "tokenizer")
    model_vocabs: dict[str, dict[str, int]] = {}
    for key, tok in tokenizers.items():
        vocab = (tok if tok is not None else base_tok).get_vocab()
        model_vocabs[key] = {t: i for t, i in vocab.items() if i < rows[key]}
    start_key = base_key if source in ("base", "union") else source
    start = external if external is not None else tokenizers[start_key]
    if start is None:
        raise MergeError(f"model {start_key} has no tokenizer that transformers can load", "tokenizer.source")
    out = copy.deepcopy(start)
    added: dict[str, str] = {}
    have = set(out.get_vocab())

    def add(token: str, special: bool, key: str) -> None:
        out.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
        have.add(token)
        added[token] = key

    if source == "union":
        for key, tok in tokenizers.items():
            if tok is None or key == base_key:
                continue
            specials = {str(t) for t in tok.added_tokens_decoder.values() if getattr(t, "special", False)}
            for token, _ in sorted(model_vocabs[key].items(), key=lambda kv: kv[1]):
                if token not in have:
                    add(token, token in specials, key)
    for token in extra_tokens:
        if token not in have:
            owner = next((k for k, v in model_vocabs.items() if token in v), "recipe")
            add(token, True, owner)
    return BuiltTokenizer(out, out.get_vocab(), model_vocabs, added)
