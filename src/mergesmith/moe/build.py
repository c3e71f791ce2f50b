"""`mergesmith moe`: config -> inputs and family (metadata only) -> gates -> streamed shards -> side files.

Everything that can be refused is refused before the base model is run or a tensor is read.
Output tensors are written one by one into shards whose headers are laid out first, so memory
holds one output tensor (for GraniteMoE, one layer's fused experts) at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.errors import MergeError
from mergesmith.merge import MergeOptions, MergeSummary, peak_rss_bytes
from mergesmith.moe import families, gates
from mergesmith.moe.config import PROMPTED_MODES, ExpertSpec, MoEConfig
from mergesmith.moe.families import Cat, ExpertInput, Family, MoETensor, Read, Router, Stack, Zeros
from mergesmith.output import card, model_files
from mergesmith.output.shards import ShardWriter, layout_shards
from mergesmith.output.staging import StagedOutput
from mergesmith.sources.model import ModelInfo, load_model_info
from mergesmith.sources.reader import TensorReader
from mergesmith.sources.refs import ModelRef, parse_ref

log = logging.getLogger("mergesmith")


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


def _dtype(config: MoEConfig, base: ModelInfo) -> str:
    if config.dtype:
        return config.dtype
    named = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(named, str) and named in ("float32", "float16", "bfloat16"):
        return named
    return base.tensors["model.embed_tokens.weight"].dtype


def resolve_inputs(config: MoEConfig, cache_dir: str | None = None, allow_identical: bool = False) -> MoEInputs:
    """Read metadata of every model, pick the output family and lay out the output tensors."""
    base_ref, expert_refs, shared_refs = _refs(config)
    warnings: list[str] = []
    models: dict[str, ModelInfo] = {}
    for ref in [base_ref, *expert_refs, *shared_refs]:
        if ref.key not in models:
            models[ref.key] = load_model_info(ref, cache_dir)
    base = models[base_ref.key]
    types = {str(models[r.key].config.get("model_type", "unknown")) for r in [base_ref, *expert_refs, *shared_refs]}
    family = families.choose_family(config.architecture, types, len(shared_refs))
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
    dtype = _dtype(config, base)
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
        gen = torch.Generator().manual_seed(seed)
        router = gates.random_gates(config.gate_mode, layers, n, hidden, gen)
        shared = gates.random_gates(config.gate_mode, layers, 1, hidden, gen) if shared_specs else None
        return router, shared
    from transformers import AutoTokenizer

    tokenizer = gates.prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(inputs.base.directory), trust_remote_code=trust_remote_code)
    )
    model = embed = None
    if config.gate_mode == "cheap_embed":
        embed = TensorReader(inputs.base).get("model.embed_tokens.weight")
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


# --- tensors -------------------------------------------------------------------------------------


class Materialiser:
    """Evaluates an `MoETensor` source from the input readers and the gate rows."""

    def __init__(self, inputs: MoEInputs, router: torch.Tensor, shared: torch.Tensor | None, seed: int, device: str):
        self.readers = {key: TensorReader(info) for key, info in inputs.models.items()}
        self.router = router
        self.shared = shared
        self.seed = seed
        self.device = device

    def read(self, r: Read) -> torch.Tensor:
        t = self.readers[r.model].get(r.name)
        if r.noise_scale is None and r.residual_scale is None:
            return t
        t = t.to(self.device, torch.float32)
        if r.noise_scale:
            digest = hashlib.blake2b(f"{self.seed}\0{r.stream}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            t = t + (torch.randn(t.shape, generator=gen) * r.noise_scale).to(t.device)
        if r.residual_scale is not None:
            t = t * r.residual_scale
        return t

    def value(self, source: families.Source) -> torch.Tensor:
        if isinstance(source, Read):
            return self.read(source)
        if isinstance(source, Cat):
            return torch.cat([self.value(p).float() for p in source.parts], dim=source.dim)
        if isinstance(source, Stack):
            return torch.stack([self.value(p).float() for p in source.parts])
        if isinstance(source, Router):
            rows = self.shared if source.shared else self.router
            assert rows is not None
            return rows[source.layer]
        if isinstance(source, Zeros):
            raise AssertionError("zeros are made by the caller, which knows the shape")
        raise TypeError(source)

    def make(self, t: MoETensor) -> torch.Tensor:
        dtype = getattr(torch, t.dtype)
        if isinstance(t.source, Zeros):
            return torch.zeros(t.shape, dtype=dtype)
        return self.value(t.source).to("cpu", dtype).contiguous()


# --- the command ---------------------------------------------------------------------------------


def run_moe(
    config: MoEConfig,
    text: str,
    out: str | Path,
    options: MergeOptions | None = None,
    allow_identical: bool = False,
) -> MergeSummary:
    options = options or MergeOptions()
    start = time.perf_counter()
    staged = StagedOutput(Path(out), options.overwrite)
    staged.check()
    inputs = resolve_inputs(config, options.transformers_cache, allow_identical)
    seed = options.random_seed or 0
    router, shared = compute_gates(config, inputs, options.device, seed, options.trust_remote_code)
    names = [f"experts[{i}] ({e.key})" for i, e in enumerate(inputs.experts)]
    warnings = inputs.warnings + (
        gates.conditioning_warnings(router, names) if config.gate_mode in PROMPTED_MODES else []
    )
    for w in warnings:
        log.warning(w)
    directory = staged.begin()
    try:
        shards = layout_shards([(t.name, t.dtype, t.shape) for t in inputs.tensors], options.out_shard_size)
        writer = ShardWriter(directory, shards)
        try:
            make = Materialiser(inputs, router, shared, seed, options.device)
            for t in inputs.tensors:
                writer.write(t.name, make.make(t))
        except BaseException:
            writer.abort()
            raise
        files = writer.close()
        write_side_files(directory, Path(out).name, config, text, inputs, options)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    read = sum(inputs.models[s.model].tensors[s.name].nbytes for t in inputs.tensors for s in _reads(t.source))
    written = sum(slot.end - slot.start for shard in shards for slot in shard.slots)
    return MergeSummary(staged.out, files, time.perf_counter() - start, read, written, peak_rss_bytes(), warnings)


def _reads(source: families.Source) -> list[Read]:
    if isinstance(source, Read):
        return [source]
    if isinstance(source, (Cat, Stack)):
        return [r for p in source.parts for r in _reads(p)]
    return []


def write_side_files(
    directory: Path, name: str, config: MoEConfig, text: str, inputs: MoEInputs, options: MergeOptions
) -> None:
    base = inputs.base
    out_config = families.moe_config(
        inputs.family,
        base.config,
        len(inputs.experts),
        config.experts_per_token,
        int(base.config.get("intermediate_size", 0)) * len(inputs.shared),
        inputs.dtype,
    )
    out_config.save_pretrained(directory)
    if options.copy_tokenizer:
        model_files.copy_tokenizer(directory, base.directory)
        write_generation_config(directory, base.directory, out_config)
    (directory / "mergesmith_moe_config.yml").write_text(text)
    if options.write_model_card:
        (directory / "README.md").write_text(card.moe_model_card(name, inputs.family.name, config, text))


def write_generation_config(directory: Path, base_dir: Path, out_config: object) -> None:
    """The base's generation config, with a pad token (eos when the base has none) so `generate` works."""
    path = base_dir / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if data.get(key) is None and getattr(out_config, key, None) is not None:
            data[key] = getattr(out_config, key)
    if data.get("pad_token_id") is None and data.get("eos_token_id") is not None:
        eos = data["eos_token_id"]
        data["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    (directory / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
