"""A base model with a LoRA adapter applied, as a tensor source: each targeted tensor is computed
as it is read (float32 math), every other tensor passes through from the base unchanged."""

from __future__ import annotations

from dataclasses import dataclass

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.lora.adapter import Adapter, LoraModule
from mergesmith.lora.algebra import dora, lora_delta
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo, TensorMeta


@dataclass(frozen=True)
class Target:
    """How one base tensor changes: the module's update, stored transposed or not."""

    module: LoraModule
    transpose: bool
    bias: bool = False  # the tensor is the module's bias (LoRA bias) rather than its weight


def resolve_name(name: str, tensors: dict[str, TensorMeta]) -> str | None:
    """The base tensor for a module tensor name, allowing for a missing or extra leading prefix
    (`transformer.h.0...` in a model, `h.0...` in the checkpoint)."""
    if name in tensors:
        return name
    hits = [n for n in tensors if name.endswith("." + n) or n.endswith("." + name)]
    return max(hits, key=len) if len(hits) == 1 else None


@dataclass
class BoundAdapter:
    """An adapter checked against one base model: base tensor name -> what changes it."""

    adapter: Adapter
    targets: dict[str, Target]
    replacements: dict[str, str]  # base tensor name -> adapter key

    def metas(self, base: dict[str, TensorMeta]) -> dict[str, TensorMeta]:
        out = dict(base)
        for name, key in self.replacements.items():
            meta = self.adapter.metas[key]
            dtype = base[name].dtype if name in base else meta.dtype
            out[name] = TensorMeta(meta.shape, dtype, base[name].file if name in base else "")
        return out


def bind(adapter: Adapter, base: ModelInfo) -> BoundAdapter:
    """Match every adapter module to a base tensor and check the shapes agree (metadata only)."""
    where = f"adapter {adapter.ref}"
    replacements: dict[str, str] = {}
    for name, key in adapter.replacements.items():
        found = resolve_name(name, base.tensors)
        if found is None and arch.is_lm_head(name) and not any(arch.is_lm_head(n) for n in base.tensors):
            continue  # a tied head saved beside its embedding (ensure_weight_tying): the embedding carries it
        if found is None:
            raise MergeError(f"the adapter replaces '{name}', which base model '{base.ref}' does not have", where)
        replacements[found] = key
    shapes = {n: adapter.metas[k].shape for n, k in replacements.items()}
    targets: dict[str, Target] = {}
    for module in adapter.modules.values():
        weight = resolve_name(module.name + ".weight", base.tensors)
        if weight is None:
            raise MergeError(
                f"the adapter targets module '{module.name}', which base model '{base.ref}' does not have"
                " (is this an adapter for another base model?)",
                where,
            )
        shape = shapes.get(weight, base.tensors[weight].shape)
        a, b = adapter.metas[module.keys["a"]].shape, adapter.metas[module.keys["b"]].shape
        out, inp = b[0], a[1]
        if module.embedding:
            transpose = True
            ok = shape == (inp, out)
        elif shape == (out, inp) and (out != inp or not adapter.fan_in_fan_out):
            transpose, ok = False, True
        else:
            transpose, ok = True, shape == (inp, out)
        if not ok or a[0] != b[1]:
            raise MergeError(
                f"shape mismatch at '{weight}': base {list(shape)}, adapter lora_A {list(a)} and lora_B {list(b)}"
                " (is this an adapter for another base model?)",
                where,
            )
        if (
            "magnitude" in module.keys
            and adapter.metas[module.keys["magnitude"]].shape[0] != shape[1 if transpose else 0]
        ):
            raise MergeError(f"DoRA magnitude vector of '{module.name}' does not fit {list(shape)}", where)
        targets[weight] = Target(module, transpose)
        if "bias" in module.keys:
            bias = resolve_name(module.name + ".bias", base.tensors)
            if bias is None:
                raise MergeError(f"LoRA bias on '{module.name}', but the base layer has no bias to add it to", where)
            targets[bias] = Target(module, transpose, bias=True)
    return BoundAdapter(adapter, targets, replacements)


class LoraSource:
    """Reads the base through `base` and applies the bound adapter to exactly the tensors it targets."""

    def __init__(self, base: object, bound: BoundAdapter, dtype: str | None = None) -> None:
        self.base = base
        self.bound = bound
        self.dtype = getattr(torch, dtype) if dtype else None  # --lora-merge-dtype: every float tensor in it

    def get(self, name: str) -> torch.Tensor:
        value = self._applied(name)
        return value.to(self.dtype) if self.dtype is not None and value.is_floating_point() else value

    def _original(self, name: str) -> torch.Tensor:
        key = self.bound.replacements.get(name)
        return self.bound.adapter.get(key) if key is not None else self.base.get(name)  # type: ignore[attr-defined]

    def _applied(self, name: str) -> torch.Tensor:
        target = self.bound.targets.get(name)
        original = self._original(name)
        if target is None:
            return original
        adapter, module = self.bound.adapter, target.module
        if target.bias:
            return original.float() + adapter.get(module.keys["bias"]).float() * module.scale
        delta = lora_delta(adapter.get(module.keys["a"]), adapter.get(module.keys["b"]), module.scale, target.transpose)
        if "magnitude" in module.keys:
            return dora(original, delta, adapter.get(module.keys["magnitude"]), 1 if target.transpose else 0)
        return original.float() + delta
