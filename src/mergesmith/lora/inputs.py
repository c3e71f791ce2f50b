"""`base+adapter` references: the base's metadata with the adapter bound to it, read through a
LoraSource. With `--lora-merge-cache DIR` the applied model is also written to DIR once and reused."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

from mergesmith.lora.adapter import load_adapter
from mergesmith.lora.source import LoraSource, bind
from mergesmith.sources.model import ModelInfo, TensorMeta
from mergesmith.sources.refs import ModelRef


def load_lora_model_info(ref: ModelRef, cache_dir: str | None = None, merge_cache: str | None = None) -> ModelInfo:
    from mergesmith.sources.model import load_model_info

    assert ref.lora is not None
    base = load_model_info(ModelRef(ref.path, ref.revision, None, ref.override_architecture), cache_dir)
    adapter = load_adapter(ref.lora, cache_dir)
    bound = bind(adapter, base)
    info = ModelInfo(
        ref=ref, directory=base.directory, config=base.config, tensors=bound.metas(base.tensors), format=base.format
    )
    info._extra.update(base._extra)
    info._extra["lora"] = (base, bound)
    if merge_cache is None:
        return info
    target = Path(merge_cache).expanduser() / cache_name(ref)
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


def lora_source(info: ModelInfo) -> LoraSource:
    from mergesmith.sources.reader import TensorReader

    base, bound = info._extra["lora"]
    return LoraSource(TensorReader(base), bound)


def materialise(info: ModelInfo, target: Path) -> None:
    """Write base+adapter as a plain model directory (atomically), in the base's dtypes."""
    from mergesmith.output import model_files
    from mergesmith.output.shards import ShardWriter, layout_shards
    from mergesmith.output.staging import StagedOutput

    staged = StagedOutput(target, overwrite=True)
    directory = staged.begin()
    try:
        metas: dict[str, TensorMeta] = info.tensors
        writer = ShardWriter(directory, layout_shards([(n, m.dtype, m.shape) for n, m in metas.items()], 5 * 10**9))
        source = lora_source(info)
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
