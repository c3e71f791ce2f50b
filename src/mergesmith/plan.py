"""Planning: which output tensor comes from which input tensors, with which parameters.

`plan_merge(config, models)` is a pure function of the recipe and the input models' metadata
(tensor names, shapes, dtypes, config.json). It reads no tensor data and imports no torch, so a
plan can be printed, tested and checked (`--dry-run`) before a byte of weights is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.methods.registry import MergeMethod, all_param_names, get_method
from mergesmith.recipe.post import LiNeS, parse_post
from mergesmith.recipe.schema import MergeConfig, SliceSource
from mergesmith.recipe.settings import Setting, parse_setting
from mergesmith.sources import arch
from mergesmith.sources.model import DTYPE_BYTES, ModelInfo
from mergesmith.sources.refs import ModelRef, parse_ref

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
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n

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

    @property
    def bytes_read(self) -> int:
        seen: dict[tuple[str, str], int] = {}
        for t in self.tensors:
            for x in t.inputs:
                n = DTYPE_BYTES[x.dtype]
                for s in x.shape:
                    n *= s
                seen[(x.model, x.name)] = n
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


def parse_block(raw: Mapping[str, Any] | None, where: str, method: MergeMethod, warnings: list[str]) -> ParamBlock:
    if not raw:
        return ParamBlock(where, {})
    known_elsewhere = all_param_names()
    settings: dict[str, Setting] = {}
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key not in method.params:
            if key in known_elsewhere:
                warnings.append(f"{path}: '{key}' is not a parameter of {method.name}; ignored")
                continue
            raise MergeError(
                f"unknown parameter '{key}'{did_you_mean(key, list(method.params) or known_elsewhere)}"
                f" ({method.name} takes: {', '.join(method.params) or 'no parameters'})",
                path,
            )
        settings[key] = parse_setting(value, path)
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


class _Planner:
    def __init__(self, config: MergeConfig, models: Mapping[str, ModelInfo]) -> None:
        self.config = config
        self.models = models
        self.method = get_method(config.merge_method)
        self.warnings: list[str] = []
        self._noted: set[str] = set()  # inert parameters already warned about
        self.base = parse_ref(config.base_model, "base_model") if config.base_model is not None else None
        m = self.method
        self.top = parse_block(config.parameters, "parameters", m, self.warnings)
        self.module_params = EMPTY
        self.per_input: dict[str, ParamBlock] = {}
        for key, block in (config.input_model_parameters or {}).items():
            ref = parse_ref(key, f"input_model_parameters.{key}")
            self.per_input[ref.key] = parse_block(block, f"input_model_parameters.{key}", m, self.warnings)
        self.slices = self._normalise()
        self.post = parse_post(config.post, m.name, m.params)

    # -- recipe shapes -> slices
    def _normalise(self) -> list[Slice]:
        c = self.config
        models, slices, prefix = c.models, c.slices, ""
        if c.modules:
            if len(c.modules) != 1:
                raise MergeError(
                    "recipes with several modules are not supported for decoder-only models; use 'models' or 'slices'",
                    "modules",
                )
            ((mname, module),) = c.modules.items()
            prefix = f"modules.{mname}."
            models, slices = module.models, module.slices
            self.module_params = parse_block(module.parameters, f"{prefix}parameters", self.method, self.warnings)
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
                    parse_block(src.parameters, f"{w}.sources[{j}].parameters", self.method, self.warnings),
                    f"{w}.sources[{j}]",
                )
                for j, src in enumerate(s.sources)
            )
            base = parse_ref(s.base_model, f"{w}.base_model") if s.base_model is not None else self.base
            out.append(Slice(sources, base, parse_block(s.parameters, f"{w}.parameters", self.method, self.warnings)))
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
            params = parse_block(entry.parameters, f"{w}.parameters", self.method, self.warnings)
            sources.append(Source(ref, (0, n), params, w))
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise MergeError(f"models have different layer counts ({detail}); use 'slices' to pick layers", "models")
        if self.base is not None and all(s.ref.key != self.base.key for s in sources):
            n = self._layers_of(self.base)
            sources.append(Source(self.base, (0, n), EMPTY, "base_model"))
        return Slice(tuple(sources), self.base, EMPTY)

    def _info(self, ref: ModelRef) -> ModelInfo:
        return self.models[ref.key]

    def _layers_of(self, ref: ModelRef) -> int:
        return arch.layer_count(self._info(ref).tensors.keys())

    def _check_range(self, src: Source) -> None:
        n = self._layers_of(src.ref)
        a, b = src.layers
        if b > n:
            raise MergeError(
                f"layer_range [{a}, {b}] goes beyond the model, which has {n} layers", f"{src.where}.layer_range"
            )

    # -- tensors
    def plan(self) -> Plan:
        tensors: list[OutputTensor] = []
        first, last = self.slices[0], self.slices[-1]
        non_layer = self._non_layer_names()
        pre = [n for n in non_layer if arch.is_pre_weight(n)]
        post = [n for n in non_layer if not arch.is_pre_weight(n)]
        for name in pre:
            tensors.append(self._tensor(name, first, lambda s, n=name: self._resolve_input(s, n), t=0.0))
        out_layer = 0
        layer_origin: list[tuple[Source, int]] = []
        for sl in self.slices:
            for k in range(sl.length):
                t = 1.0 if sl.length == 1 else k / (sl.length - 1)
                # Keyed by (layer-container prefix, rest of the name): a model may have several
                # stacks (a vision tower beside the language model), each keeps its own prefix.
                keys: dict[tuple[str, str], None] = {}
                names: dict[Source, dict[tuple[str, str], str]] = {}
                for src in sl.sources:
                    layer = src.layers[0] + k
                    own = {}
                    for n in self._info(src.ref).tensors:
                        p = arch.parse_layer_name(n)
                        if p is not None and p.index == layer:
                            own[(p.prefix, p.rest)] = n
                            keys.setdefault((p.prefix, p.rest))
                    names[src] = own
                for key in keys:
                    out_name = f"{key[0]}.{out_layer}.{key[1]}"
                    tensors.append(self._tensor(out_name, sl, lambda s, r=key, own=names: own[s].get(r), t))
                layer_origin.append((sl.sources[0], sl.sources[0].layers[0] + k))
                out_layer += 1
        for name in post:
            tensors.append(self._tensor(name, last, lambda s, n=name: self._resolve_input(s, n), t=0.0))
        if self.post:
            tensors = _post_steps(tensors, self.post)
        donor = self.base or self.slices[0].sources[0].ref
        updates = self._config_updates(donor, tensors, out_layer, layer_origin)
        return Plan(self.method.name, tensors, donor.key, updates, self.warnings)

    def _non_layer_names(self) -> list[str]:
        """Non-layer tensors of the first and last slices, in the donor's file order."""
        names: dict[str, None] = {}
        for sl in (self.slices[0], self.slices[-1]):
            for src in sl.sources:
                for n in self._info(src.ref).tensors:
                    if arch.parse_layer_name(n) is None:
                        names.setdefault(n)
        return list(names)

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
            if p.name in m.inert and any(v != p.default for v in values) and p.name not in self._noted:
                self._noted.add(p.name)
                self.warnings.append(f"'{p.name}' has no effect on {m.name}: {m.inert[p.name]}")
        shape = self._output_shape(out_name, inputs, base_idx)
        dtype = self.config.out_dtype or self.config.dtype or inputs[base_idx if base_idx is not None else 0].dtype
        if inputs[0].dtype not in FLOAT_DTYPES:
            dtype = inputs[0].dtype  # integer buffers (position ids) are copied, never merged
        return OutputTensor(out_name, m.name, tuple(inputs), base_idx, params, per_model, shape, dtype)

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
        self, donor: ModelRef, tensors: list[OutputTensor], n_layers: int, origin: list[tuple[Source, int]]
    ) -> dict[str, Any]:
        cfg = self._info(donor).config
        updates: dict[str, Any] = {}
        dtype = self.config.out_dtype or self.config.dtype
        if dtype:
            updates["dtype"] = dtype
            if "torch_dtype" in cfg:
                updates["torch_dtype"] = dtype
        key = arch.num_layers_key(cfg)
        if key and arch.get_dotted(cfg, key) != n_layers:
            updates[key] = n_layers
            types = cfg.get("layer_types")
            if isinstance(types, list):
                rebuilt = []
                for src, layer in origin:
                    own = self._info(src.ref).config.get("layer_types")
                    rebuilt.append(own[layer] if isinstance(own, list) and layer < len(own) else types[0])
                updates["layer_types"] = rebuilt
        for t in tensors:
            if arch.is_embedding(t.name) and not arch.is_lm_head(t.name) and len(t.shape) == 2:
                for vk in arch.VOCAB_KEYS:
                    if isinstance(cfg.get(vk), int) and cfg[vk] != t.shape[0]:
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
