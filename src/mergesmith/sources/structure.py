"""A model's layer stacks: which tensors form which stack, and which config.json key counts it.

A decoder-only checkpoint has one stack, and its tensor names say so (`model.layers.N.…` and one
`num_hidden_layers`): that case is read from the names alone, without importing torch or
transformers, so a plain merge starts as fast as before. A config with several stacks (a
vision-language model's text decoder and vision tower, T5's encoder and decoder) or names the
patterns cannot settle is asked of transformers itself: the class named in config.json is built on
the meta device (no weights, milliseconds), its outermost `ModuleList`s are the stacks, and the
config key that counts each stack is the one that makes it grow when raised by one. Classes
transformers does not know fall back to the name patterns, and the structure says so.

Module names are mergekit's (`text_decoder`, `vision_tower`, `multi_modal_projector`, `encoder`,
`decoder`, `shared`; `default` for a single-stack model), so published `modules:` recipes apply.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mergesmith.sources import arch

log = logging.getLogger(__name__)

COUNT_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "num_decoder_layers",
    "n_layer",
    "n_layers",
    "depth",
    "encoder_layers",
    "decoder_layers",
    "num_encoder_layers",
)
SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")
PROJECTOR_MARKERS = ("multi_modal_projector", "merger.", "mm_projector", "projector.")


@dataclass(frozen=True)
class Stack:
    module: str  # mergekit's module name
    prefix: str  # layer container in the checkpoint's tensor names, e.g. "model.language_model.layers"
    layers: int
    count_key: str | None  # dotted config.json key that counts this stack's layers


@dataclass(frozen=True)
class LayerRef:
    stack: Stack
    index: int
    rest: str


@dataclass(frozen=True)
class Structure:
    stacks: tuple[Stack, ...]
    modules: tuple[str, ...]  # every module, stacks' and layer-less ones (projector, shared), in file order
    found_by: str  # "transformers <Class>" or "name patterns (...)"
    roots: Mapping[str, str]  # name prefix -> module, for the tensors outside the stacks
    fallback_module: str  # module of a non-layer tensor no root claims
    vocab_tensors: tuple[str, ...]  # word embeddings and output head: the only tensors that size the vocabulary

    def locate(self, name: str) -> LayerRef | None:
        for stack in self.stacks:
            head = stack.prefix + "."
            if name.startswith(head):
                index, dot, rest = name[len(head) :].partition(".")
                if dot and index.isdigit():
                    return LayerRef(stack, int(index), rest)
        return None

    def module_of(self, name: str) -> str:
        found = self.locate(name)
        if found is not None:
            return found.stack.module
        if len(self.modules) > 1 and any(m in name for m in PROJECTOR_MARKERS):
            return "multi_modal_projector"
        best = ""
        for root in self.roots:
            if name.startswith(root + ".") and len(root) > len(best):
                best = root
        return self.roots[best] if best else self.fallback_module

    def stack_of(self, module: str) -> Stack | None:
        return next((s for s in self.stacks if s.module == module), None)

    def describe(self) -> list[str]:
        lines = [f"structure from {self.found_by}:"]
        for module in self.modules:
            stack = self.stack_of(module)
            if stack is None:
                lines.append(f"  {module}: no layers")
            else:
                key = stack.count_key or "no config key"
                lines.append(f"  {module}: {stack.layers} layers ({stack.prefix}.N, {key})")
        return lines


def find_structure(config: Mapping[str, Any], tensor_names: Iterable[str]) -> Structure:
    """The stacks of a checkpoint with this config.json and these tensor names."""
    names = list(tensor_names)
    groups = _groups(names)
    if _plain(config, groups):
        ((prefix, indices),) = groups.items()
        key = arch.num_layers_key(dict(config))
        stack = Stack("default", prefix, max(indices) + 1, key)
        vocab = tuple(n for n in names if _is_vocab_name(n))
        return Structure((stack,), ("default",), "tensor names (one layer stack)", {}, "default", vocab)
    built = _from_transformers(json.dumps(config, sort_keys=True))
    if isinstance(built, str):
        return _from_patterns(config, names, groups, built)
    return _pair(config, names, groups, built)


def _groups(names: Iterable[str]) -> dict[str, set[int]]:
    groups: dict[str, set[int]] = {}
    for n in names:
        p = arch.parse_layer_name(n)
        if p is not None:
            groups.setdefault(p.prefix, set()).add(p.index)
    return groups


def _plain(config: Mapping[str, Any], groups: Mapping[str, set[int]]) -> bool:
    """One stack that the names and the config agree on: no need to ask transformers."""
    if len(groups) != 1 or config.get("is_encoder_decoder") is True:
        return False
    if any(isinstance(config.get(k), dict) for k in SUB_CONFIGS):
        return False
    key = arch.num_layers_key(dict(config))
    (indices,) = groups.values()
    return key is not None and arch.get_dotted(dict(config), key) == max(indices) + 1


def _is_vocab_name(name: str) -> bool:
    return (arch.is_word_embedding(name) and name.endswith("weight")) or arch.is_lm_head(name)


# ---------------------------------------------------------------------------------------------
# transformers on the meta device


@dataclass(frozen=True)
class _Built:
    cls: str
    stacks: tuple[tuple[str, int, str | None, frozenset[str]], ...]  # prefix, layers, count key, layer rests
    input_embedding: str | None
    output_embedding: str | None
    encoder_decoder: bool


def _meta_model(config: dict[str, Any]) -> Any:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise LookupError("config.json has no model_type")
    import torch
    import transformers

    if model_type not in transformers.CONFIG_MAPPING:
        raise LookupError(f"transformers does not know model_type {model_type!r}")
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(cfg)
        return transformers.AutoModel.from_config(cfg)


def _stacks(model: Any) -> list[tuple[str, Any]]:
    """Outermost ModuleLists of one repeated class: the layer stacks (experts inside a layer are not)."""
    import torch

    found: list[tuple[str, Any]] = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module.parameters()):
            found.append((path, module))
    return found


def _count_key(config: dict[str, Any], path: str, length: int, candidates: list[str]) -> str | None:
    """Of the keys holding `length`, the one that makes the stack at `path` grow when raised by one."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for key in candidates:
        trial = copy.deepcopy(config)
        parent = arch.get_dotted(trial, key.rpartition(".")[0]) if "." in key else trial
        for k, v in list(parent.items()):  # per-layer lists (layer_types) follow the count
            if isinstance(v, list) and len(v) == length and v:
                parent[k] = v + v[-1:]
        arch.set_dotted(trial, key, length + 1)
        try:
            grown = dict(_stacks(_meta_model(trial)))
        except Exception:  # a config that refuses the change tells nothing
            continue
        if path in grown and len(grown[path]) == length + 1:
            return key
    return None


def _candidates(config: dict[str, Any], length: int) -> list[str]:
    found = [k for k in COUNT_KEYS if config.get(k) == length]
    for sub in SUB_CONFIGS:
        node = config.get(sub)
        if isinstance(node, dict):
            found += [f"{sub}.{k}" for k in COUNT_KEYS if node.get(k) == length]
    return found


@lru_cache(maxsize=64)
def _from_transformers(config_json: str) -> _Built | str:
    """The stacks transformers builds for this config, or why it cannot (cached per config)."""
    config = json.loads(config_json)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on a config's token ids are not ours to print
    try:
        try:
            model = _meta_model(config)
        except Exception as err:
            return f"{type(err).__name__}: {err}".splitlines()[0]
        stacks = []
        for path, module in _stacks(model):
            rests = frozenset(
                n.split(".", 1)[1] for n in module.state_dict() if "." in n and n.split(".", 1)[0].isdigit()
            )
            key = _count_key(config, path, len(module), _candidates(config, len(module)))
            stacks.append((path, len(module), key, rests))
        modules = dict(model.named_modules())
        ids = {id(m): p for p, m in modules.items()}
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        try:
            out = model.get_output_embeddings()
        except Exception:
            out = None
        return _Built(
            type(model).__name__,
            tuple(stacks),
            ids.get(id(inp)) if inp is not None else None,
            ids.get(id(out)) if out is not None else None,
            bool(getattr(model.config, "is_encoder_decoder", False)),
        )
    finally:
        hf_logging.set_verbosity(level)


def _pair(config: Mapping[str, Any], names: list[str], groups: dict[str, set[int]], built: _Built) -> Structure:
    """Match the checkpoint's layer groups to transformers' stacks (by name, else by layer contents:
    a checkpoint may use older names than the class, e.g. `language_model.model.layers`)."""
    rests: dict[str, set[str]] = {}
    for n in names:
        p = arch.parse_layer_name(n)
        if p is not None:
            rests.setdefault(p.prefix, set()).add(p.rest)
    pending = {s[0]: s for s in built.stacks}
    matched: list[tuple[str, tuple[str, int, str | None, frozenset[str]] | None]] = []
    for prefix in groups:
        hit = pending.pop(prefix, None)
        if hit is None and pending:
            score = {p: len(rests[prefix] & s[3]) / max(1, len(rests[prefix] | s[3])) for p, s in pending.items()}
            best = max(score, key=lambda p: score[p])
            hit = pending.pop(best) if score[best] > 0 else None
        matched.append((prefix, hit))
    text_root = (built.input_embedding or "").rpartition(".")[0]
    stacks = []
    notes = []
    for prefix, hit in matched:
        layers = max(groups[prefix]) + 1
        if hit is None:
            notes.append(prefix)
            stacks.append((prefix, layers, _guess_key(config, prefix, layers), prefix))
        else:
            stacks.append((prefix, layers, hit[2], hit[0]))
    found_by = f"transformers {built.cls}"
    if notes:
        found_by += f" (unknown to it, from name patterns: {', '.join(notes)})"
    return _assemble(config, names, stacks, found_by, built.encoder_decoder, text_root, built.output_embedding)


def _from_patterns(config: Mapping[str, Any], names: list[str], groups: dict[str, set[int]], why: str) -> Structure:
    stacks = [(p, max(ix) + 1, _guess_key(config, p, max(ix) + 1), p) for p, ix in groups.items()]
    text_root = next((n.rsplit(".", 2)[0] for n in names if "embed_tokens" in n), "")
    found_by = f"name patterns (transformers cannot build it: {why})"
    log.debug("structure: %s", found_by)
    return _assemble(config, names, stacks, found_by, config.get("is_encoder_decoder") is True, text_root, None)


def _guess_key(config: Mapping[str, Any], prefix: str, layers: int) -> str | None:
    keys = _candidates(dict(config), layers)
    if len(keys) == 1:
        return keys[0]
    wanted = "vision_config." if ("vision" in prefix or "visual" in prefix) else "text_config."
    narrowed = [k for k in keys if k.startswith(wanted)]
    return narrowed[0] if len(narrowed) == 1 else None


def _assemble(
    config: Mapping[str, Any],
    names: list[str],
    raw: list[tuple[str, int, str | None, str]],  # checkpoint prefix, layers, key, transformers path
    found_by: str,
    encoder_decoder: bool,
    text_root: str,
    output_embedding: str | None,
) -> Structure:
    parts = [p.split(".") for p, *_ in raw]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    roots: dict[str, str] = {}
    stacks: list[Stack] = []
    used: set[str] = set()
    for (prefix, layers, key, path), split in zip(raw, parts, strict=True):
        root = ".".join(split[: common + 1])
        if len(raw) == 1:
            module = "default"
        elif encoder_decoder:
            module = "decoder" if "decoder" in prefix else "encoder"
        elif text_root and (path.startswith(text_root + ".") or prefix.startswith(text_root)):
            module = "text_decoder"
        elif "vision" in prefix or "visual" in prefix:
            module = "vision_tower"
        elif "audio" in prefix:
            module = "audio_tower"
        else:
            module = split[common]
        while module in used:
            module += "_"
        used.add(module)
        roots[root] = module
        stacks.append(Stack(module, prefix, layers, key))
    if len(raw) == 1:
        fallback = "default"
    elif encoder_decoder:
        fallback = "shared"
    else:
        fallback = "multi_modal_projector"
    structure = Structure(tuple(stacks), (), found_by, roots, fallback, ())
    order: dict[str, None] = {}
    for n in names:
        order.setdefault(structure.module_of(n), None)
    vocab: list[str] = []
    text = next((s for s in stacks if s.module in ("text_decoder", "default", "decoder")), None)
    for n in names:
        if structure.locate(n) is not None or not n.endswith("weight"):
            continue
        if arch.is_lm_head(n) or (output_embedding and n.endswith(output_embedding.rpartition(".")[2] + ".weight")):
            vocab.append(n)
        elif arch.is_word_embedding(n) and (text is None or structure.module_of(n) in (text.module, "shared")):
            vocab.append(n)
    return Structure(tuple(stacks), tuple(order), found_by, roots, fallback, tuple(vocab))
