"""Vocabulary alignment as a step before planning and a view over the tensor readers.

`align_vocabularies` builds the output tokenizer and gives every model a ModelInfo copy whose
embedding-like tensors (input embeddings, lm_head, tied or not) already have the output vocabulary's
row count, so the planner sees equal shapes. `aligned_sources` wraps the executor's readers so that
those tensors come back re-indexed: the model's own row where it has the token, the default row
(see rows.py) where not, and padding rows equal to the mean of the model's real rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.recipe.schema import MergeConfig
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo, TensorMeta, tokenizer_directory
from mergesmith.sources.reader import TensorSource
from mergesmith.sources.refs import parse_ref
from mergesmith.tokenizer.build import BuiltTokenizer, build_tokenizer, load_tokenizer
from mergesmith.tokenizer.rows import Recipe, parse_token_specs, row_recipes

log = logging.getLogger("mergesmith")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class VocabAlignment:
    built: BuiltTokenizer
    source: str
    base: str
    rows_out: int  # output embedding rows (tokenizer length padded)
    maps: dict[str, list[int]]  # model key -> new id -> old row (-1 absent)
    recipes: dict[str, dict[int, Recipe]]  # model key -> rows not taken from its own row
    rules: dict[str, str]  # token -> the default rule used for it
    roles: dict[str, dict[str, str]]  # model key -> {"embed": name, "head": name (the embedding if tied)}
    aliases: dict[str, dict[str, str]]  # model key -> {lm_head name a tied model answers: its embedding}
    _rows: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def role_of(self, key: str, name: str) -> str | None:
        names = self.roles[key]
        if name in self.aliases[key]:
            return "head"
        if name == names.get("head") and name != names.get("embed"):
            return "head"
        return "embed" if name == names.get("embed") else None

    def realign(self, key: str, role: str, x: torch.Tensor, readers: Mapping[str, TensorSource]) -> torch.Tensor:
        """Model `key`'s tensor `x` (old rows) re-indexed to the output vocabulary."""
        n = self.built.size
        index = torch.tensor(self.maps[key], dtype=torch.long)
        out = torch.zeros((self.rows_out, *x.shape[1:]), dtype=x.dtype)  # in the input dtype: one copy
        own = index >= 0
        out[:n][own] = x[index[own]]
        recipes = self.recipes[key]
        if recipes:
            self._load_rows(role, readers)
            for new_id, recipe in recipes.items():
                out[new_id] = self._row(role, recipe, x.shape[1:]).to(x.dtype)
        if self.rows_out > n:
            out[n:] = torch.mean(out[:n], dim=0, dtype=torch.float32).to(x.dtype)
        return out

    def _row(self, role: str, recipe: Recipe, shape: tuple[int, ...]) -> torch.Tensor:
        if not recipe:
            return torch.zeros(shape)
        return torch.stack([self._rows[(role, k, r)] for k, r in recipe]).mean(dim=0)

    def _load_rows(self, role: str, readers: Mapping[str, TensorSource]) -> None:
        """Read, once per role, every input row some default recipe needs."""
        if any(k[0] == role for k in self._rows):
            return
        wanted: dict[str, set[int]] = {}
        for recipes in self.recipes.values():
            for recipe in recipes.values():
                for k, r in recipe:
                    wanted.setdefault(k, set()).add(r)
        for k, rows in wanted.items():
            name = self.roles[k].get(role) or self.roles[k]["embed"]
            t = readers[k].get(name)
            for r in rows:
                self._rows[(role, k, r)] = t[r].float()

    # -- output files
    def save(self, directory: Path, donor: str, save_tokenizer: bool, donor_dir: Path) -> None:
        tok = self.built.tokenizer
        if save_tokenizer:
            tok.save_pretrained(str(directory))
        ids = self.special_ids(donor)
        path = directory / "config.json"
        cfg = json.loads(path.read_text())
        for k, v in ids.items():
            if k in cfg or v is not None:
                cfg[k] = self._remap(donor, cfg.get(k), v)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = donor_dir / "generation_config.json"
        if save_tokenizer and gen.is_file():
            data = json.loads(gen.read_text())
            for k in SPECIAL_IDS:
                if k in data:
                    data[k] = self._remap(donor, data[k], ids[k])
            (directory / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        from mergesmith.output.report import update_report

        update_report(directory, "vocabulary", self.report())
        log.info(self.summary())

    def special_ids(self, donor: str) -> dict[str, int | None]:
        """bos/eos/pad ids in the output: the output tokenizer's own special tokens."""
        tok = self.built.tokenizer
        out: dict[str, int | None] = {}
        for k in SPECIAL_IDS:
            token = getattr(tok, k.removesuffix("_id"), None)
            out[k] = self.built.vocab.get(str(token)) if token is not None else None
        return out

    def _remap(self, donor: str, value: Any, own: int | None) -> Any:
        """A donor id (or list of ids) moved to the output ids of the same tokens."""
        inverse = {i: t for t, i in self.built.model_vocabs[donor].items()}
        if isinstance(value, list):
            moved = [self.built.vocab[inverse[v]] for v in value if v in inverse and inverse[v] in self.built.vocab]
            if own is not None and own not in moved:
                moved.append(own)
            return moved
        if own is not None or value not in inverse:
            return own if own is not None else value
        return self.built.vocab.get(inverse[value], value)

    def report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "vocab_size": self.built.size,
            "embedding_rows": self.rows_out,
            "added_tokens": dict(self.built.added),
            "fallback_rows": dict(self.rules),
        }

    def summary(self) -> str:
        by_model: dict[str, int] = {}
        for k in self.built.added.values():
            by_model[k] = by_model.get(k, 0) + 1
        added = ", ".join(f"{n} from {k}" for k, n in by_model.items()) or "none"
        return (
            f"vocabulary ({self.source}): {self.built.size} tokens, {self.rows_out} embedding rows;"
            f" added: {added}; {len(self.rules)} token(s) with rows from a fallback rule"
        )


def _roles(info: ModelInfo) -> dict[str, str]:
    embed = arch.embedding_for_lm_head(info.tensors)
    if embed is None:
        raise MergeError("no input embedding found; cannot align its vocabulary", info.name)
    heads = [n for n in info.tensors if arch.is_lm_head(n) and len(info.tensors[n].shape) == 2]
    return {"embed": embed, "head": heads[0] if heads else embed}


def align_vocabularies(
    config: MergeConfig, models: dict[str, ModelInfo], cache_dir: str | None = None
) -> dict[str, ModelInfo]:
    """ModelInfo copies on the output vocabulary, or `models` itself when the recipe builds no tokenizer.

    The tokenizer source may be any model, merged or not (mergekit loads only its tokenizer)."""
    if config.tokenizer is None and config.tokenizer_source is None:
        return models
    raw_source = config.tokenizer_source if config.tokenizer is None else config.tokenizer.source
    where = "tokenizer_source" if config.tokenizer is None else "tokenizer.source"

    def resolve(ref: Any, at: str) -> str:
        key = parse_ref(ref, at).key
        if key not in models:
            raise MergeError(f"{ref} is not one of the merged models ({', '.join(models)})", at)
        return key

    source, external = str(raw_source), None
    if raw_source not in ("base", "union"):
        ref = parse_ref(raw_source, where)
        source = ref.key
        if ref.key not in models:
            external = load_tokenizer(tokenizer_directory(ref, cache_dir))
            if external is None:
                raise MergeError(f"{raw_source} has no tokenizer that transformers can load", where)
    base = parse_ref(config.base_model, "base_model").key if config.base_model is not None else next(iter(models))
    roles = {k: _roles(info) for k, info in models.items()}
    rows = {k: info.tensors[roles[k]["embed"]].shape[0] for k, info in models.items()}
    # When some model has its own lm_head the output has one, and a tied model's stand-in for it (its
    # embedding) must take the lm_head default rows: it answers to the head's name.
    head = next((r["head"] for r in roles.values() if r["head"] != r["embed"]), None)
    aliases = {k: {head: r["embed"]} if head and r["head"] == r["embed"] else {} for k, r in roles.items()}
    specs = parse_token_specs(config.tokenizer.tokens if config.tokenizer else None, resolve)
    tokenizers = {k: load_tokenizer(info.directory) for k, info in models.items()}
    built = build_tokenizer(source, base, tokenizers, rows, list(specs), external)
    maps = {k: built.index_map(k) for k in models}
    recipes, rules = row_recipes(built.vocab, maps, built.model_vocabs, rows, base, specs)
    for token, rule in rules.items():
        if rule.startswith("zero (no model"):
            log.warning(f"token {token!r}: no model has it and no source is configured; its embedding rows are zeros")
    multiple = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    rows_out = -(-built.size // multiple) * multiple if multiple else built.size
    alignment = VocabAlignment(built, str(raw_source), base, rows_out, maps, recipes, rules, roles, aliases)
    out = {}
    for k, info in models.items():
        tensors = dict(info.tensors)
        for role_name in set(roles[k].values()):
            meta = tensors[role_name]
            tensors[role_name] = TensorMeta((rows_out, *meta.shape[1:]), meta.dtype, meta.file)
        for alias, real in aliases[k].items():
            tensors[alias] = tensors[real]
        out[k] = dataclasses.replace(info, tensors=tensors, vocab_alignment=alignment, layer_index=None)
    return out


def alignment_of(models: Mapping[str, ModelInfo]) -> VocabAlignment | None:
    """The alignment `align_vocabularies` put these models on, or None (their own vocabularies)."""
    return next((m.vocab_alignment for m in models.values() if isinstance(m.vocab_alignment, VocabAlignment)), None)


class AlignedSource:
    """A model's tensors with its embeddings on the output vocabulary."""

    def __init__(self, key: str, alignment: VocabAlignment, readers: Mapping[str, TensorSource]) -> None:
        self.key, self.alignment, self.readers = key, alignment, readers

    def get(self, name: str) -> torch.Tensor:
        x = self.readers[self.key].get(self.alignment.aliases[self.key].get(name, name))
        role = self.alignment.role_of(self.key, name)
        return x if role is None else self.alignment.realign(self.key, role, x, self.readers)


def aligned_sources(models: Mapping[str, ModelInfo], readers: dict[str, TensorSource]) -> dict[str, TensorSource]:
    alignment = alignment_of(models)
    if alignment is None:
        return readers
    return {k: AlignedSource(k, alignment, readers) for k in readers}


def save_output_tokenizer(directory: Path, models: Mapping[str, ModelInfo]) -> list[str]:
    """Write only the built tokenizer (an adapter has no config.json to remap): its file names, [] when none
    was built. `--as-lora` of a union recipe must carry the tokens its embedding rows were made for."""
    alignment = alignment_of(models)
    if alignment is None:
        return []
    before = set(directory.iterdir())
    alignment.built.tokenizer.save_pretrained(str(directory))
    log.info(alignment.summary())
    return sorted(p.name for p in set(directory.iterdir()) - before)


def save_vocabulary(directory: Path, models: Mapping[str, ModelInfo], donor: str, save_tokenizer: bool) -> bool:
    """Write the built tokenizer, special ids and the vocabulary report; False when none was built."""
    alignment = alignment_of(models)
    if alignment is None:
        return False
    alignment.save(directory, donor, save_tokenizer, models[donor].directory)
    return True
