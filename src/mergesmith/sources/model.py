"""Input models: resolve a reference to a directory and read its metadata without reading tensors.

safetensors headers are parsed directly (8-byte length + JSON), so planning a merge touches no
tensor data. PyTorch `.bin` checkpoints are opened only with `torch.load(weights_only=True)`
(memory-mapped), which refuses pickles that would run code.

A hub id goes through `sources.hub`: `load_model_info` downloads the files a merge reads,
`load_model_metadata` (validate, --dry-run) only the small files and each safetensors header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.errors import MergeError
from mergesmith.safetensors_header import read_header
from mergesmith.sources import hub
from mergesmith.sources.jsonfile import read_json
from mergesmith.sources.kinds import LoadOptions, kind_for
from mergesmith.sources.refs import ModelRef

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    file: str  # file name inside the model directory

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class ModelInfo:
    ref: ModelRef
    directory: Path
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    format: str  # "safetensors" or "bin" ("memory": `sources.memory`)
    #: A `.bin` checkpoint's tensors: torch.load reads the whole file (memory-mapped), so they are kept
    #: from the metadata read rather than loaded again per tensor.
    bin_tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    #: Makes this model's tensor source when it is not a plain directory (a registered kind, e.g.
    #: base+adapter, sets it); None: a TensorReader of `directory`.
    opener: Callable[[], Any] | None = field(default=None, repr=False, compare=False)  # -> reader.TensorSource
    #: The tokenizer.align.VocabAlignment these tensors' embedding rows were put on (typed `object`
    #: because sources/ may not import tokenizer/); None: the model's own vocabulary.
    vocab_alignment: object | None = field(default=None, repr=False, compare=False)
    #: plan.py's (module, layer) -> tensors index of this model, built once per model and reused by
    #: every plan over it (a search plans many).
    layer_index: dict[tuple[str, int], list[tuple[tuple[str, str], str]]] | None = field(
        default=None, repr=False, compare=False
    )
    #: For a model whose tensors live in memory (`sources.memory`, no files): a digest of their bytes,
    #: which the resume fingerprint counts instead of the files' sizes and mtimes.
    digest: str | None = field(default=None, repr=False, compare=False)

    @cached_property
    def name(self) -> str:
        return str(self.ref)


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor metadata from a safetensors file, checking the header and the file size agree."""
    _, entries = read_header(path)
    return {name: TensorMeta(e.shape, e.dtype, path.name) for name, e in entries.items()}


def resolve_directory(ref: ModelRef, cache_dir: str | None = None) -> Path:
    """A local directory for `ref`: the path itself, or a hub snapshot of only the needed files."""
    local = Path(ref.path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise MergeError("a model reference must be a directory (or a hub id), not a file", str(local))
        return local
    if hub.looks_local(ref.path):
        raise MergeError("model directory not found", ref.path)
    return hub.download(ref, cache_dir)  # a hub id: only the files the merge needs


def tokenizer_directory(ref: ModelRef, cache_dir: str | None = None) -> Path:
    """A directory with `ref`'s tokenizer files (for a hub id, only its small files are fetched)."""
    local = Path(ref.path).expanduser()
    if local.is_dir():
        return local
    if hub.looks_local(ref.path):
        raise MergeError("model directory not found", ref.path)
    return hub.small_files_snapshot(ref, cache_dir)


def _weights_index(directory: Path) -> tuple[str, dict[str, str]]:
    """(format, tensor name -> file name) for the model in `directory`."""
    for fmt, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / index).exists():
            data = read_json(directory / index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise MergeError("index has no 'weight_map'", str(directory / index))
            for file in set(weight_map.values()):
                if not (directory / file).exists():
                    raise MergeError(f"shard '{file}' named in the index is missing", str(directory / index))
            return fmt, weight_map
        if (directory / single).exists():
            return fmt, {}
    if (directory / "adapter_config.json").exists():
        cfg = read_json(directory / "adapter_config.json")
        base = cfg.get("base_model_name_or_path", "BASE") if isinstance(cfg, dict) else "BASE"
        raise MergeError(f"this is a LoRA adapter, not a model; reference it as '{base}+{directory}'", str(directory))
    raise MergeError(
        "no model weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])",
        str(directory),
    )


def load_bin(path: Path) -> dict[str, Any]:
    """A `.bin` state dict through torch's weights-only unpickler, memory-mapped. Never runs code."""
    import pickle

    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise MergeError(
            f"refused to load: this pickle is not plain tensor data and loading it could run code ({first})",
            str(path),
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MergeError(f"cannot read PyTorch checkpoint: {err}", str(path)) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MergeError("not a state dict of tensors", str(path))
    return sd


def load_model_info(
    ref: ModelRef,
    cache_dir: str | None = None,
    lora_merge_cache: str | None = None,
    lora_merge_dtype: str | None = None,
) -> ModelInfo:
    kind = kind_for(ref)
    if kind is not None:  # e.g. base+adapter: a layer above registered how to read it
        return kind.load(ref, LoadOptions(cache_dir, lora_merge_cache, lora_merge_dtype))
    if ref.lora is not None:
        raise MergeError("base+adapter inputs need mergesmith.lora (import mergesmith.lora first)", str(ref))
    directory = resolve_directory(ref, cache_dir)
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        raise MergeError("config.json must be a JSON object", str(config_path))
    if ref.override_architecture:
        config = {**config, "architectures": [ref.override_architecture]}
    fmt, weight_map = _weights_index(directory)
    tensors: dict[str, TensorMeta] = {}
    bin_tensors: dict[str, torch.Tensor] | None = None
    files = sorted(set(weight_map.values())) or (
        ["model.safetensors"] if fmt == "safetensors" else ["pytorch_model.bin"]
    )
    for file in files:
        if fmt == "safetensors":
            metas = read_safetensors_header(directory / file)
        else:
            sd = load_bin(directory / file)
            bin_tensors = bin_tensors if bin_tensors is not None else {}
            bin_tensors.update(sd)
            metas = {k: TensorMeta(tuple(v.shape), str(v.dtype).removeprefix("torch."), file) for k, v in sd.items()}
        for name, meta in metas.items():
            if weight_map and weight_map.get(name) not in (None, file):
                continue
            tensors[name] = meta
    missing = [n for n, f in weight_map.items() if n not in tensors]
    if missing:
        raise MergeError(f"index names tensors that its shards lack: {missing[:3]}", str(directory))
    return ModelInfo(ref=ref, directory=directory, config=config, tensors=tensors, format=fmt, bin_tensors=bin_tensors)


def load_model_metadata(ref: ModelRef, cache_dir: str | None = None) -> ModelInfo:
    """ModelInfo for any reference, touching no weight bytes of a hub model with safetensors."""
    if ref.lora is not None or not hub.is_hub_ref(ref):
        return load_model_info(ref, cache_dir)
    try:
        listing = hub.list_repo(ref)
    except Exception as err:
        if not hub.unreachable(err):
            raise hub.hub_error(err, ref) from None
        return load_model_info(ref, cache_dir)  # the cached snapshot, if there is one
    try:
        return _remote_model_info(ref, listing, cache_dir)
    except Exception as err:
        raise hub.hub_error(err, ref) from None


def _remote_model_info(ref: ModelRef, listing: hub.Listing, cache_dir: str | None) -> ModelInfo:
    fmt, files = hub.weight_files(listing, cache_dir)
    if fmt != "safetensors":
        if fmt == "none" and "adapter_config.json" in listing.files:
            raise MergeError(f"this is a LoRA adapter, not a model; reference it as 'BASE+{ref}'", str(ref))
        if fmt == "none":
            raise MergeError(
                "no model weights in the hub repository (expected model.safetensors[.index.json] or"
                " pytorch_model.bin[.index.json])",
                str(ref),
            )
        return load_model_info(ref, cache_dir)  # .bin: no header to read, so it is downloaded
    config: dict[str, Any] = {}
    directory = hub.snapshot_dir(listing, cache_dir)
    if "config.json" in listing.files:
        path = hub.fetch(listing, "config.json", cache_dir)
        directory = path.parent
        config = read_json(path)
        if not isinstance(config, dict):
            raise MergeError("config.json must be a JSON object", str(path))
    if ref.override_architecture:
        config = {**config, "architectures": [ref.override_architecture]}
    weight_map: dict[str, str] = {}
    if files[0] == hub.ST_INDEX:
        weight_map = read_json(hub.fetch(listing, hub.ST_INDEX, cache_dir))["weight_map"]
        files = files[1:]
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        for name, e in hub.read_remote_header(listing, file).items():
            if weight_map and weight_map.get(name) not in (None, file):
                continue
            tensors[name] = TensorMeta(e.shape, e.dtype, file)
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise MergeError(f"index names tensors that its shards lack: {missing[:3]}", str(ref))
    return ModelInfo(ref=ref, directory=directory, config=config, tensors=tensors, format="safetensors")
