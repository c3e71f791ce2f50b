"""Planning: which output tensor comes from which input tensors, with which parameters.

(Over 400 lines: the planner walks models, slices and `modules:` stacks, gradients, filters and
post-steps in one pass over the output layers; splitting it by recipe form is a follow-up of #18.)

`plan_merge(config, models)` is a pure function of the recipe and the input models' metadata
(tensor names, shapes, dtypes, config.json). It reads no tensor data and imports no torch, so a
plan can be printed, tested and checked (`--dry-run`) before a byte of weights is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.errors import MergeError, did_you_mean
from mergesmith.methods.registry import MergeMethod, get_method
from mergesmith.recipe.post import LiNeS, parse_post
from mergesmith.recipe.schema import MergeConfig, SliceSource
from mergesmith.recipe.settings import Setting, parse_setting, reader_for
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.refs import ModelRef, parse_ref
from mergesmith.sources.structure import Structure, find_structure

FLOAT_DTYPES = {"bfloat16", "float16", "float32", "float64"}


@dataclass(frozen=True)
class InputTensor:
    model: str  # model key (see ModelRef.key)
    name: str  # tensor name inside that model
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class OutputTensor:
    name: str
    method: str
    inputs: tuple[InputTensor, ...]
    base: int | None  # index into `inputs` of the base model's tensor, when the method uses a base
    params: Mapping[str, Any]  # global parameters, resolved
    per_model: Mapping[str, tuple[float, ...]]  # per-model parameters, aligned with the non-base inputs
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def others(self) -> tuple[InputTensor, ...]:
        return tuple(x for i, x in enumerate(self.inputs) if i != self.base)


@dataclass
class Plan:
    method: str
    tensors: list[OutputTensor]
    donor: str  # model key whose config.json and tokenizer the output takes
    config_updates: dict[str, Any]  # dotted config.json keys to set
    warnings: list[str] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)  # the donor's stacks, how they were found

    @property
    def bytes_read(self) -> int:
        seen: dict[tuple[str, str], int] = {}
        for t in self.tensors:
            for x in t.inputs:
                seen[(x.model, x.name)] = numel(x.shape) * DTYPE_BYTES[x.dtype]
        return sum(seen.values())

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def describe(self) -> list[str]:
        lines = []
        for t in self.tensors:
            srcs = ", ".join(("base " if i == t.base else "") + f"{x.model}:{x.name}" for i, x in enumerate(t.inputs))
            params = {**t.params, **{k: list(v) for k, v in t.per_model.items()}}
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
            lines.append(f"{t.name} {list(t.shape)} {t.dtype} <- {t.method}({srcs}) {shown}".rstrip())
        return lines


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# Parameter blocks: parsed settings with the YAML path each came from


@dataclass(frozen=True)
class ParamBlock:
    where: str
    settings: Mapping[str, Setting]

    def value(self, param: str, name: str, t: float) -> float | None:
        s = self.settings.get(param)
        return None if s is None else s.evaluate(name, t)


EMPTY = ParamBlock("", {})


def parse_block(raw: Mapping[str, Any] | None, where: str, method: MergeMethod) -> ParamBlock:
    """The settings of the parameters `method` reads; any other key is skipped, as mergekit skips it
    (`recipe/leniency.py` reports each one)."""
    settings: dict[str, Setting] = {}
    for key, value in (raw or {}).items():
        param = method.params.get(key)
        if param is not None:
            settings[key] = parse_setting(value, f"{where}.{key}", reader_for(param.type))
    return ParamBlock(where, settings)


@dataclass(frozen=True, eq=False)
class Source:
    ref: ModelRef
    layers: tuple[int, int]
    params: ParamBlock
    where: str


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base: ModelRef | None
    params: ParamBlock

    @property
    def length(self) -> int:
        a, b = self.sources[0].layers
        return b - a


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """What the recipe says for one module of the model (mergekit's `modules:` names)."""

    module: str
    slices: list[Slice]
    params: ParamBlock
    copied: bool = False  # the recipe does not name this module: copied whole from the donor


class _Planner:
    def __init__(self, config: MergeConfig, models: Mapping[str, ModelInfo]) -> None:
        self.config = config
        self.models = models
        self.method = get_method(config.merge_method)
        self.warnings: list[str] = []
        self._structures: dict[str, Structure] = {}
        self.base = parse_ref(config.base_model, "base_model") if config.base_model is not None else None
        m = self.method
        self.top = parse_block(config.parameters, "parameters", m)
        self.module_params = EMPTY  # the parameters of the module being planned
        self.module = "default"  # the module being planned: layer ranges count its stack
        self.per_input: dict[str, ParamBlock] = {}
        for key, block in (config.input_model_parameters or {}).items():
            ref = parse_ref(key, f"input_model_parameters.{key}")
            self.per_input[ref.key] = parse_block(block, f"input_model_parameters.{key}", m)
        self.donor = self.base or self._first_ref()
        self.structure = self._structure(self.donor)
        self._check_same_structure()
        self.parts = self._normalise()
        self.post = parse_post(config.post, m.name, m.params)

    def _check_same_structure(self) -> None:
        """Every model must have the donor's modules and stacks, or layers would be matched wrongly."""
        want = _shape_of(self.structure)
        c = self.config
        blocks = [("", c.models, c.slices)]
        blocks += [(f"modules.{k}.", m.models, m.slices) for k, m in (c.modules or {}).items()]
        entries = [(f"{p}models[{i}].model", m.model) for p, models, _ in blocks for i, m in enumerate(models or [])]
        for p, _, slices in blocks:
            for i, s in enumerate(slices or []):
                entries += [(f"{p}slices[{i}].sources[{j}].model", src.model) for j, src in enumerate(s.sources)]
        for where, raw in entries:
            ref = parse_ref(raw, where)
            if ref.key not in self.models:
                continue
            got = _shape_of(self._structure(ref))
            if got != want:
                raise MergeError(
                    f"{ref} is built differently from {self.donor}: its layer stacks are {_show(got)},"
                    f" the donor's {_show(want)}",
                    where,
                )

    def _first_ref(self) -> ModelRef:
        c = self.config
        models, slices, prefix = c.models, c.slices, ""
        if c.modules:
            name, module = next(iter(c.modules.items()))
            models, slices, prefix = module.models, module.slices, f"modules.{name}."
        if models:
            return parse_ref(models[0].model, f"{prefix}models[0].model")
        assert slices is not None
        return parse_ref(slices[0].sources[0].model, f"{prefix}slices[0].sources[0].model")

    def _structure(self, ref: ModelRef) -> Structure:
        if ref.key not in self._structures:
            info = self._info(ref)
            self._structures[ref.key] = find_structure(info.config, info.tensors)
        return self._structures[ref.key]

    # -- recipe shapes -> slices, per module
    def _normalise(self) -> list[Part]:
        c = self.config
        modules = self.structure.modules or ("default",)
        if c.modules:
            for name in c.modules:
                if name not in modules:
                    raise MergeError(
                        f"{self.donor} has no module '{name}'{did_you_mean(name, list(modules))}"
                        f" (its modules: {', '.join(modules)})",
                        f"modules.{name}",
                    )
            parts = []
            for name in modules:
                if name not in c.modules:
                    parts.append(self._copy_part(name))
                    continue
                module = c.modules[name]
                prefix = f"modules.{name}."
                self.module = name
                params = parse_block(module.parameters, f"{prefix}parameters", self.method)
                parts.append(Part(name, self._slices(module.models, module.slices, prefix), params))
            copied = [p.module for p in parts if p.copied]
            if copied:
                self.warnings.append(f"modules: {', '.join(copied)} not in the recipe; copied whole from {self.donor}")
            return parts
        if c.models:
            parts = []
            for name in modules:
                self.module = name
                parts.append(Part(name, self._slices(c.models, None, ""), EMPTY))
            return parts
        target = self._slices_target(modules)
        parts = []
        for name in modules:
            self.module = name
            parts.append(
                Part(name, self._slices(None, c.slices, ""), EMPTY) if name == target else self._copy_part(name)
            )
        if len(modules) > 1:
            others = ", ".join(m for m in modules if m != target)
            self.warnings.append(
                f"slices: applied to the {target} only; {others} copied whole from {self.donor}"
                " (use 'modules:' to merge them too)"
            )
        return parts

    def _slices_target(self, modules: tuple[str, ...]) -> str:
        """The module a recipe's top-level `slices:` apply to: the only stack, or the text decoder."""
        stacks = self.structure.stacks
        if len(stacks) <= 1:
            return stacks[0].module if stacks else modules[0]
        if self.structure.stack_of("text_decoder") is not None:
            return "text_decoder"
        counts = ", ".join(f"{s.module}: {s.layers} layers" for s in stacks)
        raise MergeError(
            f"{self.donor} has several layer stacks ({counts}); 'slices' cannot say which one a layer_range"
            f" counts. Give each its own under 'modules:', e.g. modules: {{{stacks[0].module}: {{slices: ...}},"
            f" {stacks[1].module}: {{slices: ...}}}}",
            "slices",
        )

    def _copy_part(self, name: str) -> Part:
        self.module = name
        n = self._layers_of(self.donor)
        return Part(name, [Slice((Source(self.donor, (0, n), EMPTY, "base_model"),), None, EMPTY)], EMPTY, True)

    def _slices(self, models: list[Any] | None, slices: list[Any] | None, prefix: str) -> list[Slice]:
        if models:
            return [self._models_slice(models, prefix)]
        assert slices is not None
        out = []
        for i, s in enumerate(slices):
            w = f"{prefix}slices[{i}]"
            sources = tuple(
                Source(
                    parse_ref(src.model, f"{w}.sources[{j}].model"),
                    src.layer_range,
                    parse_block(src.parameters, f"{w}.sources[{j}].parameters", self.method),
                    f"{w}.sources[{j}]",
                )
                for j, src in enumerate(s.sources)
            )
            base = parse_ref(s.base_model, f"{w}.base_model") if s.base_model is not None else self.base
            out.append(Slice(sources, base, parse_block(s.parameters, f"{w}.parameters", self.method)))
            for src in sources:
                self._check_range(src)
        return out

    def _models_slice(self, models: list[Any], prefix: str) -> Slice:
        sources = []
        counts = {}
        for i, entry in enumerate(models):
            w = f"{prefix}models[{i}]"
            ref = parse_ref(entry.model, f"{w}.model")
            n = self._layers_of(ref)
            counts[str(ref)] = n
            params = parse_block(entry.parameters, f"{w}.parameters", self.method)
            sources.append(Source(ref, (0, n), params, w))
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            what = "" if self.module == "default" else f" in {self.module}"
            raise MergeError(
                f"models have different layer counts{what} ({detail}); use 'slices' to pick layers", "models"
            )
        if self.base is not None and all(s.ref.key != self.base.key for s in sources):
            n = self._layers_of(self.base)
            sources.append(Source(self.base, (0, n), EMPTY, "base_model"))
        return Slice(tuple(sources), self.base, EMPTY)

    def _info(self, ref: ModelRef) -> ModelInfo:
        return self.models[ref.key]

    def _layers_of(self, ref: ModelRef) -> int:
        """Layers of `ref`'s stack in the module being planned (0 for a module without layers)."""
        stack = self._structure(ref).stack_of(self.module)
        return stack.layers if stack is not None else 0

    def _check_range(self, src: Source) -> None:
        n = self._layers_of(src.ref)
        a, b = src.layers
        if b > n:
            what = "" if self.module == "default" else f"'s {self.module}"
            raise MergeError(
                f"layer_range [{a}, {b}] goes beyond the model{what}, which has {n} layers", f"{src.where}.layer_range"
            )

    # -- tensors
    def plan(self) -> Plan:
        tensors: list[OutputTensor] = []
        counts: dict[str, tuple[int, list[tuple[Source, int]]]] = {}
        for part in self.parts:
            self.module, self.module_params = part.module, part.params
            n, origin = self._plan_part(part, tensors)
            counts[part.module] = (n, origin)
        self._check_all_taken(tensors)
        if self.post:
            tensors = _post_steps(tensors, self.post)
        updates = self._config_updates(self.donor, tensors, counts)
        structure = self.structure.describe()
        if self.structure.found_by.startswith("name patterns") and len(self.structure.stacks) > 1:
            self.warnings.append(f"{self.donor}: {self.structure.found_by}; check the stacks found (validate)")
        return Plan(self.method.name, tensors, self.donor.key, updates, self.warnings, structure)

    def _plan_part(self, part: Part, tensors: list[OutputTensor]) -> tuple[int, list[tuple[Source, int]]]:
        """One module's output tensors: its pre weights, its layers slice by slice, its post weights."""
        first, last = part.slices[0], part.slices[-1]
        emit = self._copy if part.copied else self._tensor
        non_layer = self._non_layer_names(part)
        pre = [n for n in non_layer if arch.is_pre_weight(n)]
        post = [n for n in non_layer if not arch.is_pre_weight(n)]
        for name in pre:
            tensors.append(emit(name, first, lambda s, n=name: self._resolve_input(s, n), t=0.0))
        out_layer = 0
        layer_origin: list[tuple[Source, int]] = []
        for sl in part.slices:
            for k in range(sl.length):
                t = 1.0 if sl.length == 1 else k / (sl.length - 1)
                # Keyed by (layer-container prefix, rest of the name).
                keys: dict[tuple[str, str], None] = {}
                names: dict[Source, dict[tuple[str, str], str]] = {}
                for src in sl.sources:
                    own = {}
                    for key, n in self._layer_index(src.ref).get((part.module, src.layers[0] + k), ()):
                        own[key] = n
                        keys.setdefault(key)
                    names[src] = own
                for key in keys:
                    out_name = f"{key[0]}.{out_layer}.{key[1]}"
                    tensors.append(emit(out_name, sl, lambda s, r=key, own=names: own[s].get(r), t))
                layer_origin.append((sl.sources[0], sl.sources[0].layers[0] + k))
                out_layer += 1
        for name in post:
            tensors.append(emit(name, last, lambda s, n=name: self._resolve_input(s, n), t=0.0))
        return out_layer, layer_origin

    def _layer_index(self, ref: ModelRef) -> dict[tuple[str, int], list[tuple[tuple[str, str], str]]]:
        """(module, layer) -> its tensors as ((prefix, rest), name), in file order; built once per model."""
        info = self._info(ref)
        cached = info.layer_index
        if cached is None:
            structure = self._structure(ref)
            cached = {}
            for n in info.tensors:
                p = structure.locate(n)
                if p is not None:
                    cached.setdefault((p.stack.module, p.index), []).append(((p.stack.prefix, p.rest), n))
            info.layer_index = cached
        return cached

    def _non_layer_names(self, part: Part) -> list[str]:
        """The module's non-layer tensors in its first and last slices, in the donor's file order."""
        names: dict[str, None] = {}
        for sl in (part.slices[0], part.slices[-1]):
            for src in sl.sources:
                structure = self._structure(src.ref)
                for n in self._info(src.ref).tensors:
                    if structure.locate(n) is None and structure.module_of(n) == part.module:
                        names.setdefault(n)
        return list(names)

    def _copy(self, out_name: str, sl: Slice, lookup: Callable[[Source], str | None], t: float) -> OutputTensor:
        """A tensor of a module the recipe does not merge: the donor's, unchanged but for the dtype."""
        (src,) = sl.sources
        own = lookup(src)
        if own is None:
            raise MergeError(f"the donor {src.ref} has no tensor '{out_name}'", out_name)
        return self._base_copy(out_name, (src, own))

    def _check_all_taken(self, tensors: list[OutputTensor]) -> None:
        """Every input tensor goes somewhere, or the recipe said where not: never a silent drop."""
        used = {(x.model, x.name) for t in tensors for x in t.inputs}
        out = {t.name for t in tensors}
        modules = {p.module for p in self.parts}
        head = any(arch.is_lm_head(n) for n in out)
        refs: dict[str, ModelRef] = {}
        for part in self.parts:
            for sl in part.slices:
                for src in sl.sources:
                    refs.setdefault(src.ref.key, src.ref)
                if sl.base is not None:
                    refs.setdefault(sl.base.key, sl.base)
        for key, ref in refs.items():
            structure = self._structure(ref)
            lost = []
            for n in self._info(ref).tensors:
                if (key, n) in used:
                    continue
                module = structure.module_of(n)
                if module not in modules:
                    lost.append(n)
                elif structure.locate(n) is None and n not in out and not (arch.is_lm_head(n) and not head):
                    lost.append(n)
            if lost:
                shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
                raise MergeError(
                    f"{len(lost)} tensor(s) of {ref} would be dropped: no output takes them ({shown});"
                    f" the output's modules: {', '.join(sorted(modules))}",
                    str(ref),
                )

    def _resolve_input(self, src: Source, name: str) -> str | None:
        tensors = self._info(src.ref).tensors
        if name in tensors:
            return name
        if arch.is_lm_head(name):  # a tied model supplies its embedding as lm_head
            return arch.embedding_for_lm_head(tensors)
        return None

    def _tensor(self, out_name: str, sl: Slice, lookup: Callable[[Source], str | None], t: float) -> OutputTensor:
        """One output tensor from the slice sources that have it (`lookup` gives each one's tensor name)."""
        m = self.method
        present = [(src, own) for src in sl.sources if (own := lookup(src)) is not None]
        base_idx = None
        if m.base != "input" and sl.base is not None:
            for i, (src, _) in enumerate(present):
                if src.ref.key == sl.base.key:
                    base_idx = i
                    break
            else:
                if any(s.ref.key == sl.base.key for s in sl.sources) or m.base == "required":
                    raise MergeError(f"the base model {sl.base} has no tensor '{out_name}'", out_name)
        if m.base == "required" and base_idx is None:
            raise MergeError(f"{m.name} needs a base_model", "base_model")
        others = [i for i in range(len(present)) if i != base_idx]
        lo, hi = m.models
        if not others and base_idx is not None and lo == 0:
            return self._base_copy(out_name, present[base_idx])
        if not (lo <= len(others) and (hi is None or len(others) <= hi)):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            names = ", ".join(str(present[i][0].ref) for i in others)
            raise MergeError(
                f"{m.name} takes {want} model(s) besides the base, got {len(others)} ({names}) for tensor '{out_name}'",
                "models" if self.config.models else "slices",
            )
        inputs = []
        for src, own in present:
            meta = self._info(src.ref).tensors[own]
            inputs.append(InputTensor(src.ref.key, own, meta.shape, meta.dtype))
        params = {}
        for p in m.global_params.values():
            value = None
            for block in (sl.params, self.module_params, self.top):
                value = block.value(p.name, out_name, t)
                if value is not None:
                    break
            if value is None:
                if p.required:
                    raise MergeError(f"{m.name} needs parameter '{p.name}' (tensor '{out_name}')", "parameters")
                params[p.name] = p.default
            else:
                params[p.name] = p.coerce(value, "parameters")
        per_model: dict[str, tuple[float, ...]] = {}
        for p in m.per_model_params.values():
            values = []
            for i in others:
                src, own = present[i]
                value = None
                blocks = (src.params, sl.params, self.per_input.get(src.ref.key, EMPTY), self.module_params, self.top)
                for block in blocks:
                    value = block.value(p.name, own, t)
                    if value is not None:
                        break
                if value is None:
                    if p.required:
                        raise MergeError(
                            f"{m.name} needs parameter '{p.name}' for model {src.ref} (tensor '{own}')",
                            f"{src.where}.parameters",
                        )
                    value = p.default
                values.append(p.coerce(value, f"{src.where}.parameters"))
            per_model[p.name] = tuple(values)
        shape = self._output_shape(out_name, inputs, base_idx)
        dtype = self.config.out_dtype or self.config.dtype or inputs[base_idx if base_idx is not None else 0].dtype
        if inputs[0].dtype not in FLOAT_DTYPES:
            dtype = inputs[0].dtype  # integer buffers (position ids) are copied, never merged
        return OutputTensor(out_name, m.name, tuple(inputs), base_idx, params, per_model, shape, dtype)

    def _base_copy(self, out_name: str, base: tuple[Source, str]) -> OutputTensor:
        """A tensor only the base has (a base+LoRA merged alone): the base's, as mergekit returns it."""
        src, own = base
        meta = self._info(src.ref).tensors[own]
        x = InputTensor(src.ref.key, own, meta.shape, meta.dtype)
        dtype = (self.config.out_dtype or self.config.dtype or x.dtype) if x.dtype in FLOAT_DTYPES else x.dtype
        return OutputTensor(out_name, "passthrough", (x,), None, {}, {"scale": (1.0,)}, x.shape, dtype)

    def _output_shape(self, name: str, inputs: list[InputTensor], base_idx: int | None) -> tuple[int, ...]:
        shapes = {x.shape for x in inputs}
        if len(shapes) == 1:
            return inputs[0].shape
        detail = ", ".join(f"{x.model} {list(x.shape)}" for x in inputs)
        if arch.is_embedding(name) and all(len(s) == len(inputs[0].shape) for s in shapes):
            if base_idx is not None:
                shape = inputs[base_idx].shape
                how = "the base model's shape"
            else:
                shape = tuple(min(dims) for dims in zip(*shapes, strict=True))
                how = "the common shape"
            self.warnings.append(f"{name}: vocabulary sizes differ ({detail}); using {how} {list(shape)}")
            return shape
        raise MergeError(f"shape mismatch between models: {detail}", f"tensor {name}")

    def _config_updates(
        self, donor: ModelRef, tensors: list[OutputTensor], counts: Mapping[str, tuple[int, list[tuple[Source, int]]]]
    ) -> dict[str, Any]:
        """config.json changes, from the structure only: a stack's count where slices changed it, the
        vocabulary size from the word embeddings, the tie flag from the head written."""
        cfg = self._info(donor).config
        updates: dict[str, Any] = {}
        dtype = self.config.out_dtype or self.config.dtype
        if dtype:
            updates["dtype"] = dtype
            if "torch_dtype" in cfg:
                updates["torch_dtype"] = dtype
        for stack in self.structure.stacks:
            n_layers, origin = counts.get(stack.module, (stack.layers, []))
            key = stack.count_key
            if key is None:
                if n_layers != stack.layers:
                    self.warnings.append(
                        f"config.json: no key is known to count {stack.module}'s layers; it is not updated to {n_layers}"
                    )
                continue
            if arch.get_dotted(cfg, key) == n_layers:
                continue
            updates[key] = n_layers
            parent = key.rpartition(".")[0]
            types_key = f"{parent}.layer_types" if parent else "layer_types"
            types = arch.get_dotted(cfg, types_key)
            if isinstance(types, list):
                rebuilt = []
                for src, layer in origin:
                    own = arch.get_dotted(self._info(src.ref).config, types_key)
                    rebuilt.append(own[layer] if isinstance(own, list) and layer < len(own) else types[0])
                updates[types_key] = rebuilt
        vocab = set(self.structure.vocab_tensors)
        for t in tensors:
            if t.name in vocab and not arch.is_lm_head(t.name) and arch.is_word_embedding(t.name) and len(t.shape) == 2:
                for vk in _vocab_keys(cfg):
                    if arch.get_dotted(cfg, vk) != t.shape[0]:
                        updates[vk] = t.shape[0]
                        self.warnings.append(f"config.json: {vk} set to {t.shape[0]} to match {t.name}")
                break
        # The tie flag must match what is written: never a half-tied checkpoint.
        has_head = any(arch.is_lm_head(t.name) for t in tensors)
        donor_tied = cfg.get("tie_word_embeddings") is True  # a vocab alignment lets tied models answer lm_head
        donor_has_head = any(arch.is_lm_head(n) for n in self._info(donor).tensors) and not donor_tied
        if not has_head and cfg.get("tie_word_embeddings") is False:
            updates["tie_word_embeddings"] = True
        elif has_head and not donor_has_head:
            updates["tie_word_embeddings"] = False
            self.warnings.append(
                "config.json: the donor ties lm_head to the embeddings but the merge writes its own lm_head;"
                " tie_word_embeddings set to false so the merged lm_head is used"
            )
        return updates


def _shape_of(structure: Structure) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((s.module, s.prefix) for s in structure.stacks))


def _show(shape: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{m} ({p}.N)" for m, p in shape) or "none with layers"


def _vocab_keys(cfg: Mapping[str, Any]) -> list[str]:
    """The config keys holding the vocabulary size, top level and the text decoder's."""
    found = [k for k in arch.VOCAB_KEYS if isinstance(cfg.get(k), int)]
    text = cfg.get("text_config")
    if isinstance(text, dict):
        found += [f"text_config.{k}" for k in arch.VOCAB_KEYS if isinstance(text.get(k), int)]
    return found


def _post_steps(tensors: list[OutputTensor], steps: list[LiNeS]) -> list[OutputTensor]:
    """Fold the post-steps' per-layer scales into each tensor's `lambda` (recipe/post.py says why).
    Layers count per layer stack (prefix), over the output model."""
    stacks: dict[str, int] = {}
    for t in tensors:
        if (p := arch.parse_layer_name(t.name)) is not None:
            stacks[p.prefix] = max(stacks.get(p.prefix, 0), p.index + 1)
    out = []
    for t in tensors:
        p = arch.parse_layer_name(t.name)
        scale = 1.0
        for step in steps:
            scale *= step.scale(None, 0) if p is None else step.scale(p.index, stacks[p.prefix])
        out.append(replace(t, params={**t.params, "lambda": t.params["lambda"] * scale}))
    return out


def referenced_models(config: MergeConfig) -> list[ModelRef]:
    """Every model the recipe names, base first, then in recipe order, without repeats."""
    refs: dict[str, ModelRef] = {}

    def add(value: Any, where: str) -> None:
        ref = parse_ref(value, where)
        refs.setdefault(ref.key, ref)

    if config.base_model is not None:
        add(config.base_model, "base_model")
    blocks: list[tuple[str, Any, Any]] = [("", config.models, config.slices)]
    for name, module in (config.modules or {}).items():
        blocks.append((f"modules.{name}.", module.models, module.slices))
    for prefix, models, slices in blocks:
        for i, m in enumerate(models or []):
            add(m.model, f"{prefix}models[{i}].model")
        for i, s in enumerate(slices or []):
            if s.base_model is not None:
                add(s.base_model, f"{prefix}slices[{i}].base_model")
            src: SliceSource
            for j, src in enumerate(s.sources):
                add(src.model, f"{prefix}slices[{i}].sources[{j}].model")
    return list(refs.values())


def plan_merge(config: MergeConfig, models: Mapping[str, ModelInfo]) -> Plan:
    """The full plan for `config` over the models' metadata (keyed by ModelRef.key)."""
    return _Planner(config, models).plan()
