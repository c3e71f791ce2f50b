"""Preparing `mergesmith moe`: config -> input models (metadata) -> checks and layout -> gate rows -> a Plan.

Everything that can be refused is refused before the base model is run or a tensor is read. The
result is a `PreparedMerge` like a recipe's, so the same engine, audit, journal and shard writer
as `mergesmith run` execute it: plain expert and base tensors are `passthrough` copies of their
model's tensor, noised, scaled or joined ones the internal `moe_experts` method, and the router
rows and zero biases, computed here, are one more model of the merge (`sources.memory`).
Importing this module registers the preparation with `preparation.prepare_merge`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.moe import families, gates
from mergesmith.moe.config import PROMPTED_MODES, ExpertSpec, MoEConfig, load_moe_config
from mergesmith.moe.families import Cat, ExpertInput, Family, MoETensor, Read, Router, Stack, Zeros
from mergesmith.plan import InputTensor, OutputTensor, Plan
from mergesmith.preparation import MergeOptions, PreparedMerge, register_preparation
from mergesmith.recipe.leniency import enforce, unknown_keys
from mergesmith.sources.memory import memory_model
from mergesmith.sources.model import ModelInfo, load_model_info
from mergesmith.sources.reader import open_source
from mergesmith.sources.refs import ModelRef, parse_ref

log = logging.getLogger("mergesmith")

GATES = "<moe gates>"  # the key of the model holding the computed router rows and zero biases


@dataclass
class MoEInputs:
    family: Family
    base: ModelInfo
    models: dict[str, ModelInfo]
    experts: list[ExpertInput]
    shared: list[ExpertInput]
    layers: int
    hidden: int
    dtype: str
    tensors: list[MoETensor]
    warnings: list[str] = field(default_factory=list)


def _refs(config: MoEConfig) -> tuple[ModelRef, list[ModelRef], list[ModelRef]]:
    base = parse_ref(config.base_model, "base_model")
    experts = [parse_ref(e.source_model, f"experts[{i}].source_model") for i, e in enumerate(config.experts)]
    shared = [
        parse_ref(e.source_model, f"shared_experts[{i}].source_model")
        for i, e in enumerate(config.shared_experts or [])
    ]
    return base, experts, shared


def output_dtype(config: MoEConfig, base: ModelInfo) -> str:
    if config.dtype:
        return config.dtype
    named = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(named, str) and named in ("float32", "float16", "bfloat16"):
        return named
    return base.tensors["model.embed_tokens.weight"].dtype


def load_models(config: MoEConfig, options: MergeOptions) -> dict[str, ModelInfo]:
    """The metadata of the base and every expert, base first."""
    base, experts, shared = _refs(config)
    models: dict[str, ModelInfo] = {}
    for ref in [base, *experts, *shared]:
        if ref.key not in models:
            models[ref.key] = load_model_info(
                ref, options.transformers_cache, options.lora_merge_cache, lora_merge_dtype=options.lora_merge_dtype
            )
    return models


def family_of(config: MoEConfig, models: dict[str, ModelInfo]) -> Family:
    """The output's MoE family: the one asked for, or the first that the models' type can build."""
    base_ref, expert_refs, shared_refs = _refs(config)
    types = {str(models[r.key].config.get("model_type", "unknown")) for r in [base_ref, *expert_refs, *shared_refs]}
    return families.choose_family(config.architecture, types, len(shared_refs))


def resolve_inputs(config: MoEConfig, models: dict[str, ModelInfo], allow_identical: bool = False) -> MoEInputs:
    """Pick the output family, check the models can build it and lay out the output tensors."""
    base_ref, expert_refs, shared_refs = _refs(config)
    warnings: list[str] = []
    base = models[base_ref.key]
    family = family_of(config, models)
    identical = len({r.key for r in expert_refs}) == 1 and len(expert_refs) > 1
    if identical and config.gate_mode == "random" and not allow_identical:
        # mergekit-moe accepts random gates over copies of one model (sparse upcycling, its docs' example)
        warnings.append("every expert is the same model: the output only costs more until it is trained")
    elif identical and not allow_identical:
        raise MergeError(
            "every expert is the same model, so the result only costs more than that model; pass"
            " --i-understand-this-is-not-useful-without-training if you mean to train it",
            "experts",
        )
    if "model.embed_tokens.weight" not in base.tensors:
        raise MergeError("the base model has no model.embed_tokens.weight", "base_model")
    layers = int(base.config.get("num_hidden_layers", 0))
    hidden = int(base.config.get("hidden_size", base.tensors["model.embed_tokens.weight"].shape[1]))
    _check_tensors(family, base, models, expert_refs + shared_refs, layers)
    dtype = output_dtype(config, base)
    experts = [
        ExpertInput(r.key, e.noise_scale, e.residual_scale) for r, e in zip(expert_refs, config.experts, strict=True)
    ]
    shared = [
        ExpertInput(r.key, e.noise_scale, e.residual_scale)
        for r, e in zip(shared_refs, config.shared_experts or [], strict=True)
    ]
    shapes = {name: meta.shape for name, meta in base.tensors.items()}
    tensors = families.layout(family, base_ref.key, shapes, experts, shared, layers, dtype)
    n = len(experts)
    if family.model_type == "mixtral" and n & (n - 1):
        warnings.append(f"{n} experts is not a power of two; llama.cpp cannot run this model")
    return MoEInputs(family, base, models, experts, shared, layers, hidden, dtype, tensors, warnings)


def _check_tensors(
    family: Family, base: ModelInfo, models: dict[str, ModelInfo], refs: list[ModelRef], layers: int
) -> None:
    extra_mlp = [n for n in base.tensors if ".mlp." in n and not families.MLP_RE.match(n)]
    if extra_mlp:
        raise MergeError(f"the base model's MLP has tensors no MoE class can hold: {extra_mlp[:3]}", "base_model")
    biases = [n for n in base.tensors if n.endswith(".bias")]
    allowed = {"mixtral": (), "qwen2_moe": ("q_proj.bias", "k_proj.bias", "v_proj.bias")}.get(family.model_type)
    if allowed is not None:
        bad = [n for n in biases if not n.endswith(allowed)]
        if bad:
            raise MergeError(f"{family.name} has no place for the base model's bias {bad[0]}", "base_model")
    for ref in refs:
        info = models[ref.key]
        for layer in range(layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                want = base.tensors.get(name)
                got = info.tensors.get(name)
                if got is None or want is None or got.shape != want.shape:
                    raise MergeError(
                        f"expert tensor {name} is {None if got is None else list(got.shape)}, the base model's is"
                        f" {None if want is None else list(want.shape)}; experts must share the base's MLP shapes",
                        str(ref),
                    )


# --- gates ---------------------------------------------------------------------------------------


def compute_gates(
    config: MoEConfig, inputs: MoEInputs, device: str, seed: int, trust_remote_code: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layers, experts, hidden) router rows and, for shared experts, (layers, 1, hidden) gate rows."""
    specs: list[ExpertSpec] = list(config.experts)
    shared_specs: list[ExpertSpec] = list(config.shared_experts or [])
    n, layers, hidden = len(specs), inputs.layers, inputs.hidden
    if config.gate_mode not in PROMPTED_MODES:
        gen = torch.Generator().manual_seed(seed)  # mergekit-moe's draw, kept so seeded gates stay as they were
        router = gates.random_gates(config.gate_mode, layers, n, hidden, gen)
        shared = gates.random_gates(config.gate_mode, layers, 1, hidden, gen) if shared_specs else None
        return router, shared
    from transformers import AutoTokenizer

    tokenizer = gates.prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(inputs.base.directory), trust_remote_code=trust_remote_code)
    )
    model = embed = None
    if config.gate_mode == "cheap_embed":
        embed = open_source(inputs.base).get("model.embed_tokens.weight")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(inputs.base.directory), dtype=torch.bfloat16, trust_remote_code=trust_remote_code
        ).to(device)
        model.eval()
    prompts = [(list(s.positive_prompts or []), list(s.negative_prompts or [])) for s in specs + shared_specs]
    rows = gates.prompt_gates(config.gate_mode, prompts, layers, tokenizer, model, embed)
    router = rows[:, :n]
    shared = None
    if shared_specs:
        shared = gates.normalise(rows[:, n:].mean(dim=1, keepdim=True))  # one sigmoid gate for all shared experts
    return router, shared


# --- the plan ------------------------------------------------------------------------------------


def _input(models: dict[str, ModelInfo], r: Read) -> InputTensor:
    meta = models[r.model].tensors[r.name]
    return InputTensor(r.model, r.name, meta.shape, meta.dtype)


def _parts(source: Read | Cat | Stack) -> tuple[tuple[Read, ...], int]:
    """The reads an output joins, in output order, and the axis: a stack of row-joined parts is a
    row join of all their reads (the same bytes)."""
    if isinstance(source, Read):
        return (source,), 0
    if isinstance(source, Cat):
        return source.parts, source.dim
    reads: list[Read] = []
    for p in source.parts:
        got, dim = _parts(p)
        assert dim == 0 or len(got) == 1, "a stack of column joins is not a row join"
        reads += got
    return tuple(reads), 0


def planned_tensor(t: MoETensor, models: dict[str, ModelInfo]) -> OutputTensor:
    """One output tensor of the MoE: a copy of a base/expert/gates tensor, or `moe_experts` of its parts."""
    if isinstance(t.source, (Router, Zeros)):
        meta = models[GATES].tensors[t.name]
        x = InputTensor(GATES, t.name, meta.shape, meta.dtype)
        return OutputTensor(t.name, "passthrough", (x,), None, {}, {"scale": (1.0,)}, t.shape, t.dtype)
    reads, dim = _parts(t.source)
    inputs = tuple(_input(models, r) for r in reads)
    if len(reads) == 1 and reads[0].noise_scale is None and reads[0].residual_scale is None:
        return OutputTensor(t.name, "passthrough", inputs, None, {}, {"scale": (1.0,)}, t.shape, t.dtype)
    per_model = {
        "noise_scale": tuple(float(r.noise_scale or 0.0) for r in reads),
        "residual_scale": tuple(1.0 if r.residual_scale is None else float(r.residual_scale) for r in reads),
    }
    return OutputTensor(t.name, "moe_experts", inputs, None, {"dim": dim}, per_model, t.shape, t.dtype)


def gate_tensors(inputs: MoEInputs, router: torch.Tensor, shared: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors the gates model holds, by output name: each layer's router rows, and zero biases."""
    out: dict[str, torch.Tensor] = {}
    for t in inputs.tensors:
        if isinstance(t.source, Router):
            rows = shared if t.source.shared else router
            assert rows is not None
            out[t.name] = rows[t.source.layer].float().contiguous()
        elif isinstance(t.source, Zeros):
            out[t.name] = torch.zeros(t.shape, dtype=torch.float32)
    return out


def plan_moe(inputs: MoEInputs, models: dict[str, ModelInfo], warnings: list[str]) -> Plan:
    """The plan over `models` (the inputs' and the gates model)."""
    tensors = [planned_tensor(t, models) for t in inputs.tensors]
    return Plan("moe", tensors, inputs.base.ref.key, {}, warnings)


def prepare_moe(config: MoEConfig, options: MergeOptions) -> PreparedMerge:
    """Refusals first (metadata only), then the gate rows (runs the base model for `hidden*` modes),
    then the plan over the input models and the gates model."""
    models = load_models(config, options)
    inputs = resolve_inputs(config, models, options.allow_identical_experts)
    router, shared = compute_gates(config, inputs, options.device, options.random_seed or 0, options.trust_remote_code)
    names = [f"experts[{i}] ({e.key})" for i, e in enumerate(inputs.experts)]
    warnings = inputs.warnings + (
        gates.conditioning_warnings(router, names) if config.gate_mode in PROMPTED_MODES else []
    )
    models = {**models, GATES: memory_model(GATES, gate_tensors(inputs, router, shared))}
    return PreparedMerge(plan_moe(inputs, models, warnings), models)


register_preparation(MoEConfig, prepare_moe)


def validate_moe_config(path: str | Path, strict: bool = False) -> list[MergeError]:
    """Every problem with an MoE config, without reading tensors: schema errors, then the output
    family (which reads only config.json and safetensors headers of the models). Empty when valid.
    With `strict`, keys mergekit-moe would ignore are problems too."""
    try:
        config, _ = load_moe_config(path)
        enforce(unknown_keys(config), strict, str(path))
        resolve_inputs(config, load_models(config, MergeOptions()))
    except MergeError as err:
        return [err]
    return []
