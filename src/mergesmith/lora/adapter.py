"""Reading a peft LoRA adapter: its config, and which base tensors it changes and how.

Keys in `adapter_model.safetensors` are `base_model.model.<module>.lora_A.weight` and friends.
Every other key (`<module>.weight` of `modules_to_save`, biases saved with `bias: all`,
`<module>.base_layer.weight` of embedding layers) replaces the base tensor of the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.lora.algebra import lora_scale
from mergesmith.sources.jsonfile import read_json
from mergesmith.sources.model import TensorMeta, load_bin, read_safetensors_header, resolve_directory
from mergesmith.sources.refs import ModelRef

PREFIX = "base_model.model."
LORA_PARTS = {
    "lora_A.weight": "a",
    "lora_B.weight": "b",
    "lora_B.bias": "bias",
    "lora_embedding_A": "a",
    "lora_embedding_B": "b",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
# Config keys of adapter variants whose merged weights are not W + scale * B @ A.
UNSUPPORTED = (
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "megatron_config",
)


@dataclass
class LoraModule:
    """One adapted module: adapter tensor keys by role, and its scale."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)  # role (a, b, bias, magnitude) -> adapter key
    embedding: bool = False
    scale: float = 1.0


@dataclass
class Adapter:
    ref: ModelRef
    directory: Path
    config: dict[str, Any]
    metas: dict[str, TensorMeta]
    modules: dict[str, LoraModule]
    replacements: dict[str, str]  # base tensor name (as in the adapter) -> adapter key
    _state: dict[str, torch.Tensor] | None = None
    _handle: Any = None

    @property
    def label(self) -> str:
        return f"adapter '{self.ref}'"

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.directory / "adapter_model.safetensors"), framework="pt", device="cpu")
        return self._handle.get_tensor(key)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise MergeError("adapter_config.json must be a JSON object", where)
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise MergeError(f"peft_type '{kind}' is not supported (only LORA adapters can be applied exactly)", where)
    for key in UNSUPPORTED:
        if config.get(key):
            raise MergeError(f"the adapter uses '{key}', which mergesmith cannot apply exactly in weight space", where)


def load_adapter(ref: ModelRef, cache_dir: str | None = None) -> Adapter:
    directory = resolve_directory(ref, cache_dir)
    where = f"adapter {ref}"
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise MergeError(f"no adapter_config.json in {directory}: not a peft adapter", where)
    config = read_json(config_path)
    check_config(config, where)
    state = None
    if (directory / "adapter_model.safetensors").exists():
        metas = read_safetensors_header(directory / "adapter_model.safetensors")
    elif (directory / "adapter_model.bin").exists():
        state = load_bin(directory / "adapter_model.bin")
        metas = {k: TensorMeta(tuple(v.shape), str(v.dtype).removeprefix("torch."), "") for k, v in state.items()}
    else:
        raise MergeError(
            f"adapter weights missing: expected adapter_model.safetensors (or adapter_model.bin) in {directory}", where
        )
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    for key in metas:
        name = key.removeprefix(PREFIX)
        for part, role in LORA_PARTS.items():
            if name.endswith("." + part):
                module = name[: -len(part) - 1]
                entry = modules.setdefault(module, LoraModule(module))
                entry.keys[role] = key
                entry.embedding = entry.embedding or "lora_embedding" in part
                break
        else:
            replacements[name.replace(".base_layer.", ".")] = key
    rslora = bool(config.get("use_rslora"))
    for module in modules.values():
        if "a" not in module.keys or "b" not in module.keys:
            raise MergeError(f"module '{module.name}' lacks its lora_A or lora_B tensor", where)
        rank = metas[module.keys["a"]].shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, module.name, config.get("lora_alpha", 8))
        module.scale = lora_scale(float(alpha), rank, rslora)
        if len(metas[module.keys["a"]].shape) != 2:
            raise MergeError(f"module '{module.name}' is a convolution LoRA, which is not supported", where)
    adapter = Adapter(ref, directory, config, metas, modules, replacements)
    adapter._state = state
    return adapter
