"""Building a peft adapter from weight differences, one tensor at a time.

`AdapterBuilder.add(name, value, base)` takes one tensor of the target model and the base's
tensor of the same name. Weights of Linear and Conv1D layers (and of embeddings, when asked)
become truncated-SVD factors; a changed bias of a factored layer becomes `lora_B.bias`; every
other changed tensor is kept whole through `modules_to_save`. Unchanged tensors are left out.
Memory holds the adapter (small factors, plus whatever is kept whole), never the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergesmith.errors import MergeError
from mergesmith.lora.algebra import decompose
from mergesmith.lora.kinds import kind_of
from mergesmith.sources import arch

PREFIX = "base_model.model."
HEAD = "lm_head"  # the output head peft ties to the input embedding (peft's EMBEDDING_LAYER_NAMES)


@dataclass(frozen=True)
class ExtractOptions:
    max_rank: int = 128
    energy: float | None = None
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    device: str = "cpu"


@dataclass
class ModuleReport:
    module: str
    kind: str  # linear, conv1d, embedding, or "full" (modules_to_save)
    shape: list[int]
    rank: int
    error: float  # relative Frobenius error of the reconstructed difference


@dataclass
class AdapterBuilder:
    options: ExtractOptions
    kinds: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, ModuleReport] = field(default_factory=dict)
    full: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> its tensors, kept whole
    biases: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (diff, value)
    skipped: list[str] = field(default_factory=list)
    conv1d: bool = False
    all_modules: dict[str, str] = field(default_factory=dict)  # every seen factorable module -> kind
    tied: bool = False  # the base ties its output head to the input embedding (no head tensor of its own)
    warnings: list[str] = field(default_factory=list)

    def is_tied_embedding(self, module: str) -> bool:
        return self.tied and arch.is_embedding(module) and not arch.is_lm_head(module)

    def selected(self, module: str) -> bool:
        o = self.options
        if o.include and not any(re.search(p, module) for p in o.include):
            return False
        return not any(re.search(p, module) for p in o.exclude)

    def add(self, name: str, value: torch.Tensor, base: torch.Tensor | None) -> None:
        module, _, leaf = name.rpartition(".")
        if not module or not self.selected(module):
            return
        kind = kind_of(module, tuple(value.shape), self.kinds)
        factorable = kind in ("linear", "conv1d") or (kind == "embedding" and self.options.embed_lora)
        if leaf == "weight" and factorable and value.dim() == 2:
            self.all_modules[module] = kind
        same_shape = base is not None and base.shape == value.shape
        if same_shape and torch.equal(value, base):
            return
        if module in self.options.save_modules or module.rpartition(".")[2] in self.options.save_modules:
            self._keep(module, leaf, value)
        elif leaf == "weight" and factorable and value.dim() == 2 and same_shape and self.is_tied_embedding(module):
            # peft (0.21) runs a LoRA on tied embeddings correctly but merge_and_unload adds it twice: keep it whole
            if not self.options.skip_undecomposable:
                self.warnings.append(
                    f"'{name}' is tied to the output head: kept whole in modules_to_save (tied to {HEAD}) instead of"
                    " factored, since peft's merge_and_unload applies a LoRA on tied embeddings twice"
                )
            self._keep(module, leaf, value)
        elif leaf == "weight" and factorable and value.dim() == 2 and same_shape:
            self._factor(module, kind, value.float() - base.float(), value.dtype)
        elif leaf == "bias" and same_shape and self.kinds.get(module, kind) in ("linear", "conv1d"):
            self.biases[module] = (value.float() - base.float(), value.detach().cpu().clone())
        else:
            self._keep(module, leaf, value)

    def _keep(self, module: str, leaf: str, value: torch.Tensor) -> None:
        if self.options.skip_undecomposable:
            self.skipped.append(f"{module}.{leaf}")
            return
        self.full.setdefault(module, {})[leaf] = value.detach().cpu().clone()
        self.report[module] = ModuleReport(module, "full", list(value.shape), -1, 0.0)

    def _factor(self, module: str, kind: str, delta: torch.Tensor, dtype: torch.dtype) -> None:
        o = self.options
        # peft's factor orientation: [out, in] for Linear; Conv1D and embeddings store the transpose.
        oriented = delta.T if kind in ("conv1d", "embedding") else delta
        f = decompose(
            oriented.to(o.device), o.max_rank, energy=o.energy, sv_epsilon=o.sv_epsilon, distribute=o.distribute_scale
        )
        self.report[module] = ModuleReport(module, kind, list(delta.shape), f.rank, f.error)
        if f.rank == 0:
            return
        self.conv1d = self.conv1d or kind == "conv1d"
        if kind == "embedding":
            keys = (f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B")
        else:
            keys = (f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight")
        self.tensors[keys[0]] = f.a.to("cpu", dtype).contiguous()
        self.tensors[keys[1]] = f.b.to("cpu", dtype).contiguous()

    def finish(self) -> dict[str, object]:
        """Attach biases, collect modules_to_save; returns the adapter_config.json content."""
        ranks = {m: r.rank for m, r in self.report.items() if r.kind != "full" and r.rank > 0}
        lora_bias, bias = False, "none"
        # peft refuses lora_bias when any adapted layer is an Embedding: save those biases whole instead
        embedding_lora = any(self.report[m].kind == "embedding" for m in ranks)
        for module, (delta, value) in self.biases.items():
            if module in ranks and embedding_lora:
                self.tensors[f"{PREFIX}{module}.base_layer.bias"] = value
                bias = "lora_only"
            elif module in ranks:
                self.tensors[f"{PREFIX}{module}.lora_B.bias"] = delta.to(self._dtype(module))
                lora_bias = True
            else:  # the layer's weight is unchanged or kept whole: keep the bias whole too
                self._keep(module, "bias", value)
        for module, parts in self.full.items():
            for leaf, value in parts.items():
                self.tensors[f"{PREFIX}{module}.{leaf}"] = value
        tie = [m for m in self.full if "weight" in self.full[m] and self.is_tied_embedding(m)]
        if tie:  # the head is saved as the same tensor, and ensure_weight_tying keeps the two tied in peft
            self.tensors[f"{PREFIX}{HEAD}.weight"] = self.full[tie[0]]["weight"].clone()
        if not ranks and not self.full:
            raise MergeError("the two models are identical on every selected tensor: there is nothing to extract")
        r = max(ranks.values(), default=1)
        lows = {m: k for m, k in ranks.items() if k != r}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": r,
            "rank_pattern": lows,
            "alpha_pattern": dict(lows),
            "target_modules": self._targets(set(ranks)),
            "modules_to_save": sorted(self.full) + ([HEAD] if tie else []) or None,
            "ensure_weight_tying": bool(tie),
            "fan_in_fan_out": self.conv1d,
            "lora_bias": lora_bias,
            "bias": bias,
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def _dtype(self, module: str) -> torch.dtype:
        return self.tensors[f"{PREFIX}{module}.lora_A.weight"].dtype

    def _targets(self, factored: set[str]) -> list[str]:
        """Last name parts where they cover exactly the factored modules, else full module names."""
        out: set[str] = set()
        for module in factored:
            leaf = module.rpartition(".")[2]
            same = {m for m in self.all_modules if m.rpartition(".")[2] == leaf}
            out.add(leaf if same <= factored and leaf not in self.full else module)
        return sorted(out)

    def save(
        self, directory: Path, base_name: str, extra_config: dict[str, object] | None = None
    ) -> list[ModuleReport]:
        from safetensors.torch import save_file

        config = {**self.finish(), "base_model_name_or_path": base_name, **(extra_config or {})}
        save_file(self.tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        reports = sorted(self.report.values(), key=lambda r: r.module)
        payload = {"modules": [asdict(r) for r in reports], "skipped": self.skipped}
        (directory / "lora_report.json").write_text(json.dumps(payload, indent=2) + "\n")
        return reports
