"""`base+adapter` references: the base's metadata with the adapter bound to it, read through a
LoraSource. With `--lora-merge-cache DIR` the applied model is also written to DIR once and reused.
With `--lora-merge-dtype S` every floating tensor of base+adapter is read (and cached) in dtype S, the
adapter applied in float32 and the result rounded to S, as mergekit materialises in that dtype.

Importing this module registers the `base+adapter` kind with sources/kinds.py (lora/__init__.py imports
it, so any use of mergesmith.lora makes such references loadable)."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

from mergesmith.dtypes import DTYPE_ALIASES
from mergesmith.errors import MergeError
from mergesmith.lora.adapter import load_adapter
from mergesmith.lora.source import LoraSource, bind
from mergesmith.sources.kinds import LoadOptions, SourceKind, register_kind
from mergesmith.sources.model import ModelInfo, TensorMeta, load_model_info
from mergesmith.sources.reader import TensorReader
from mergesmith.sources.refs import ModelRef

MERGE_DTYPES = {"bfloat16", "float16", "float32", "float64"}


def merge_dtype(text: str | None) -> str | None:
    """The canonical name of a `--lora-merge-dtype` value (None: keep the base's dtypes)."""
    if text is None:
        return None
    name = DTYPE_ALIASES.get(text.lower().removeprefix("torch."), text.lower().removeprefix("torch."))
    if name not in MERGE_DTYPES:
        raise MergeError(f"unknown dtype '{text}'; use one of {sorted(MERGE_DTYPES)}", "--lora-merge-dtype")
    return name


def load_lora_model_info(
    ref: ModelRef, cache_dir: str | None = None, merge_cache: str | None = None, dtype: str | None = None
) -> ModelInfo:
    assert ref.lora is not None
    dtype = merge_dtype(dtype)
    base = load_model_info(ModelRef(ref.path, ref.revision, None, ref.override_architecture), cache_dir)
    adapter = load_adapter(ref.lora, cache_dir)
    bound = bind(adapter, base)
    metas = bound.metas(base.tensors)
    if dtype is not None:
        metas = {
            n: TensorMeta(m.shape, dtype if m.dtype in MERGE_DTYPES else m.dtype, m.file) for n, m in metas.items()
        }
    info = ModelInfo(
        ref=ref,
        directory=base.directory,
        config=base.config,
        tensors=metas,
        format=base.format,
        bin_tensors=base.bin_tensors,
        opener=lambda: LoraSource(TensorReader(base), bound, dtype),
    )
    if merge_cache is None:
        return info
    target = Path(merge_cache).expanduser() / (cache_name(ref) + (f"_{dtype}" if dtype else ""))
    if not (target / "model.safetensors").exists() and not (target / "model.safetensors.index.json").exists():
        materialise(info, target)
    cached = load_model_info(ModelRef(str(target)), cache_dir)
    cached.ref = ref
    return cached


def cache_name(ref: ModelRef) -> str:
    """`<base>_<crc32>_<lora>_<crc32>`, as mergekit names its LoRA merge cache entries."""
    assert ref.lora is not None
    base = str(ModelRef(ref.path, ref.revision))
    lora = str(ref.lora)

    def part(text: str) -> str:
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_')[-60:]}_{zlib.crc32(text.encode()):08x}"

    return f"{part(base)}_{part(lora)}"


def _load(ref: ModelRef, options: LoadOptions) -> ModelInfo:
    return load_lora_model_info(ref, options.cache_dir, options.lora_merge_cache, options.lora_merge_dtype)


BASE_PLUS_ADAPTER = SourceKind("base+adapter", lambda ref: ref.lora is not None, _load)
register_kind(BASE_PLUS_ADAPTER)


def materialise(info: ModelInfo, target: Path) -> None:
    """Write base+adapter as a plain model directory (atomically), in the base's dtypes."""
    from mergesmith.output import model_files
    from mergesmith.output.shards import ShardWriter
    from mergesmith.output.staging import StagedOutput
    from mergesmith.shard_layout import layout_shards

    staged = StagedOutput(target, overwrite=True)
    directory = staged.begin()
    try:
        metas: dict[str, TensorMeta] = info.tensors
        writer = ShardWriter(directory, layout_shards([(n, m.dtype, m.shape) for n, m in metas.items()], 5 * 10**9))
        assert info.opener is not None
        source = info.opener()
        try:
            import torch

            for name, meta in metas.items():
                writer.write(name, source.get(name).to(getattr(torch, meta.dtype)).contiguous())
        except BaseException:
            writer.abort()
            raise
        writer.close()
        model_files.write_config(directory, info.config, {})
        model_files.copy_tokenizer(directory, info.directory)
        model_files.copy_generation_config(directory, info.directory)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
