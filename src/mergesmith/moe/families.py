"""Output families: which dense models each MoE class is built from, its config.json and its tensors.

Pure: no tensor is read here. The layout is a list of `MoETensor`, each naming how its value is
made (a `Read` of one input tensor, `Cat`/`Stack` of reads, a router row block, zeros), so the
shard headers are written before any tensor and every tensor is then streamed one by one.

Expert tensors are written in the per-expert checkpoint layout (`experts.<e>.w1`, ...), which is
what `transformers` 5 writes with `save_pretrained` and fuses into `gate_up_proj` when loading;
transformers 4, vLLM and llama.cpp read the same files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError

MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
ATTN_BIAS_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")


@dataclass(frozen=True)
class Family:
    name: str  # as mergekit's `architecture` key spells it
    model_type: str
    architecture: str
    config_class: str
    inputs: tuple[str, ...]  # dense model_types it is built from
    shared_experts: bool  # needs (>= 1) shared experts; otherwise takes none

    def describe(self) -> str:
        shared = "with one or more shared experts" if self.shared_experts else "no shared experts"
        return f"{self.name} ({self.architecture}; from {'/'.join(self.inputs)} models; {shared})"


FAMILIES = (
    Family("Mixtral", "mixtral", "MixtralForCausalLM", "MixtralConfig", ("llama", "mistral"), False),
    Family("Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", ("llama", "mistral", "qwen2"), True),
    Family("Qwen3 MoE", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", ("qwen3",), False),
    Family("GraniteMoE", "granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig", ("granite",), False),
)
UNSUPPORTED = {
    "deepseek moe": "DeepSeek MoE needs remote code (deepseek-moe-16b); mergesmith writes stock classes only"
}


def supported() -> str:
    return "; ".join(f.describe() for f in FAMILIES)


def _why_not(family: Family, model_types: set[str], shared: int) -> str | None:
    if len(model_types) != 1:
        return f"the base model and experts mix model types ({', '.join(sorted(model_types))})"
    (model_type,) = model_types
    if model_type not in family.inputs:
        return f"{family.name} is built from {'/'.join(family.inputs)} models, these are '{model_type}'"
    if family.shared_experts and shared == 0:
        return f"{family.name} needs at least one entry in shared_experts"
    if not family.shared_experts and shared:
        return f"{family.name} has no shared experts, but shared_experts is set"
    return None


def choose_family(architecture: str | None, model_types: set[str], shared: int) -> Family:
    """The requested family (a case-insensitive prefix of its name) or the first that fits."""
    if architecture is not None:
        wanted = architecture.lower().strip()
        for name, why in UNSUPPORTED.items():
            if name.startswith(wanted) and not any(f.name.lower().startswith(wanted) for f in FAMILIES):
                raise MergeError(f"{why}. Supported: {supported()}", "architecture")
        matches = [f for f in FAMILIES if f.name.lower().startswith(wanted) or f.model_type.startswith(wanted)]
        if not matches:
            from mergesmith.errors import did_you_mean

            names = [f.name for f in FAMILIES]
            raise MergeError(
                f"unknown architecture '{architecture}'{did_you_mean(architecture, names)}. Supported: {supported()}",
                "architecture",
            )
        reasons = [r for f in matches if (r := _why_not(f, model_types, shared))]
        for f in matches:
            if _why_not(f, model_types, shared) is None:
                return f
        raise MergeError(f"cannot build {matches[0].name}: {reasons[0]}", "architecture")
    for f in FAMILIES:
        if _why_not(f, model_types, shared) is None:
            return f
    kinds = ", ".join(sorted(model_types))
    extra = " (with shared_experts)" if shared else ""
    raise MergeError(
        f"no supported MoE class can be built from '{kinds}' models{extra}. Supported: {supported()}", "base_model"
    )


# --- config.json ---------------------------------------------------------------------------------

DROP_KEYS = ("architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "torch_dtype")


def moe_config(
    family: Family, base: dict[str, Any], experts: int, per_token: int, shared_width: int, dtype: str
) -> Any:
    """The MoE family's transformers config object, built from the base model's config.json."""
    import transformers

    values = {k: v for k, v in base.items() if k not in DROP_KEYS}
    values["dtype"] = dtype
    values["num_experts_per_tok"] = per_token
    if family.model_type == "mixtral":
        values.update(num_local_experts=experts, sliding_window=None)
    elif family.model_type == "granitemoe":
        values.update(num_local_experts=experts)
    else:  # qwen2_moe / qwen3_moe
        values.update(
            num_experts=experts,
            moe_intermediate_size=base["intermediate_size"],
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,  # top-k weights sum to one, as in Mixtral: a model of identical experts is its base
            use_sliding_window=False,
            sliding_window=None,
        )
        values.pop("layer_types", None)
        if family.model_type == "qwen2_moe":
            values.update(shared_expert_intermediate_size=shared_width, qkv_bias=True)
    config = getattr(transformers, family.config_class)(**values)
    config.architectures = [family.architecture]
    return config


# --- tensors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """One tensor of one input model; for an expert, with its noise and (for down_proj) residual scale."""

    model: str
    name: str
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class Cat:
    parts: tuple[Read, ...]
    dim: int


@dataclass(frozen=True)
class Stack:
    parts: tuple[Read | Cat, ...]


@dataclass(frozen=True)
class Router:
    layer: int
    shared: bool = False  # the shared expert's sigmoid gate (one row) instead of the top-k router


@dataclass(frozen=True)
class Zeros:
    pass


Source = Read | Cat | Stack | Router | Zeros


@dataclass(frozen=True)
class MoETensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Source


@dataclass(frozen=True)
class ExpertInput:
    key: str  # model key
    noise_scale: float | None
    residual_scale: float | None


def _expert_read(e: ExpertInput, layer: int, proj: str) -> Read:
    name = f"model.layers.{layer}.mlp.{proj}.weight"
    scale = e.residual_scale if proj == "down_proj" else None
    return Read(e.key, name, e.noise_scale, scale)


def layout(
    family: Family,
    base_key: str,
    base_tensors: dict[str, tuple[int, ...]],
    experts: list[ExpertInput],
    shared: list[ExpertInput],
    layers: int,
    dtype: str,
) -> list[MoETensor]:
    """Every output tensor, in the base model's order with each layer's MoE block in place of its MLP."""
    hidden = base_tensors["model.embed_tokens.weight"][1]
    n = len(experts)
    out: list[MoETensor] = []

    def add(name: str, shape: tuple[int, ...], source: Source) -> None:
        out.append(MoETensor(name, dtype, tuple(shape), source))

    done_layers: set[int] = set()
    for name, shape in base_tensors.items():
        m = MLP_RE.match(name)
        if m is None:
            add(name, shape, Read(base_key, name))
            b = ATTN_BIAS_RE.match(name)
            if family.model_type == "qwen2_moe" and b and name.replace(".weight", ".bias") not in base_tensors:
                add(name.replace(".weight", ".bias"), (shape[0],), Zeros())  # Qwen2-MoE always has q/k/v biases
            continue
        layer = int(m[1])
        if layer in done_layers:
            continue
        done_layers.add(layer)
        gate, up, down = (
            base_tensors[f"model.layers.{layer}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")
        )
        prefix = f"model.layers.{layer}"
        if family.model_type == "mixtral":
            moe = f"{prefix}.block_sparse_moe"
            for i, e in enumerate(experts):
                for proj, w, shp in (("gate_proj", "w1", gate), ("down_proj", "w2", down), ("up_proj", "w3", up)):
                    tname = f"{moe}.experts.{i}.{w}.weight"
                    add(tname, shp, _expert_read(e, layer, proj))
            add(f"{moe}.gate.weight", (n, hidden), Router(layer))
        elif family.model_type == "granitemoe":
            moe = f"{prefix}.block_sparse_moe"
            tname = f"{moe}.input_linear.weight"
            parts = tuple(
                Cat((_expert_read(e, layer, "gate_proj"), _expert_read(e, layer, "up_proj")), 0) for e in experts
            )
            add(tname, (n, 2 * gate[0], gate[1]), Stack(parts))
            tname = f"{moe}.output_linear.weight"
            add(
                tname,
                (n, *down),
                Stack(tuple(_expert_read(e, layer, "down_proj") for e in experts)),
            )
            add(f"{moe}.router.layer.weight", (n, hidden), Router(layer))
        else:
            moe = f"{prefix}.mlp"
            for i, e in enumerate(experts):
                for proj, shp in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                    tname = f"{moe}.experts.{i}.{proj}.weight"
                    add(tname, shp, _expert_read(e, layer, proj))
            add(f"{moe}.gate.weight", (n, hidden), Router(layer))
            if shared:
                s = len(shared)
                for proj, shp, dim in (("gate_proj", gate, 0), ("up_proj", up, 0), ("down_proj", down, 1)):
                    tname = f"{moe}.shared_expert.{proj}.weight"
                    reads = tuple(_expert_read(e, layer, proj) for e in shared)
                    full = (shp[0] * s, shp[1]) if dim == 0 else (shp[0], shp[1] * s)
                    add(tname, full, reads[0] if s == 1 else Cat(reads, dim))
                add(f"{moe}.shared_expert_gate.weight", (1, hidden), Router(layer, shared=True))
    missing = set(range(layers)) - done_layers
    if missing:
        raise MergeError(f"the base model has no gate/up/down MLP weights in layers {sorted(missing)}", "base_model")
    return out
