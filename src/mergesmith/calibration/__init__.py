"""Calibration statistics for the data-aware methods (`regmean`, `fisher`): read the recipe's
`calibration:` block, collect each model's statistics once (`collect`), cache them as safetensors
keyed by the model's files, the data and the settings, and hand each output tensor its inputs'
statistics (`Statistics.inputs`).

    calibration:
      data: {./ft-a: a.jsonl, ./ft-b: b.jsonl}   # one {"prompt": ...} or {"text": ...} per line
      samples: 128
      max_length: 256

A second merge with the same models, data and settings reads the cache and runs no model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.recipe.schema import CalibrationConfig
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.refs import parse_ref

log = logging.getLogger("mergesmith")

VERSION = 2  # of the statistics' definition: part of every cache key (2: fisher of the model's own predictions)


def default_cache() -> Path:
    return Path(os.environ.get("MERGESMITH_CALIBRATION_CACHE", Path.home() / ".cache" / "mergesmith" / "calibration"))


def read_texts(path: Path, samples: int, where: str) -> list[str]:
    """The first `samples` prompts of a JSONL file ({"prompt": ...} or {"text": ...} per line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MergeError(f"cannot read calibration data: {err.strerror or err}", where) from None
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MergeError(f"line {n} is not JSON: {err.msg}", f"{path}") from None
        text = row.get("text", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise MergeError(f'line {n} needs a "prompt" or "text" string', f"{path}")
        texts.append(text)
        if len(texts) == samples:
            break
    if not texts:
        raise MergeError("no calibration prompts in the file", where)
    return texts


def cache_key(kind: str, info: ModelInfo, data: Path, settings: CalibrationConfig) -> str:
    """A digest of what the statistics depend on: the model's config and weight files (path, size,
    mtime), the data's bytes, the settings and the statistics' version."""
    files = sorted({Path(info.directory) / m.file for m in info.tensors.values()})
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    parts = {
        "kind": kind,
        "version": VERSION,
        "config": info.config,
        "files": stamp,
        "data": hashlib.sha256(data.read_bytes()).hexdigest(),
        "samples": settings.samples,
        "max_length": settings.max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Statistics:
    """Each model's statistics of one kind, read from their cache files as tensors are merged."""

    def __init__(self, kind: str, files: Mapping[str, Path]) -> None:
        from safetensors import safe_open

        self.kind = kind
        self._files = {key: safe_open(str(path), framework="pt") for key, path in files.items()}
        self._names = {key: set(f.keys()) for key, f in self._files.items()}

    def get(self, model: str, name: str) -> Any:
        """The statistic of tensor `name` of `model`, or None when it has none (not a linear layer)."""
        if name not in self._names.get(model, ()):
            return None
        return self._files[model].get_tensor(name)

    def inputs(self, others: Sequence[Any]) -> list[Any]:
        """The statistics of a planned tensor's non-base inputs (`plan.InputTensor`s), in order."""
        return [self.get(x.model, x.name) for x in others]


def calibrate(
    kind: str, settings: CalibrationConfig | None, models: Mapping[str, ModelInfo], merged: Sequence[str], device: str
) -> Statistics:
    """The statistics of `kind` for every model in `merged` (model keys), collected or from the cache."""
    if settings is None:
        raise MergeError(
            f"this method needs statistics of the models: add a 'calibration:' block with data for each model ({kind})",
            "calibration",
        )
    data = {parse_ref(ref, f"calibration.data.{ref}").key: Path(path) for ref, path in settings.data.items()}
    missing = [m for m in merged if m not in data]
    if missing:
        raise MergeError(f"no calibration data for {', '.join(missing)}", "calibration.data")
    cache = Path(settings.cache) if settings.cache else default_cache()
    files: dict[str, Path] = {}
    for key in merged:
        where = f"calibration.data.{key}"
        if not data[key].is_file():
            raise MergeError(f"calibration data not found: {data[key]}", where)
        path = cache / f"{kind}-{cache_key(kind, models[key], data[key], settings)}.safetensors"
        if path.is_file():
            log.info("calibration: %s statistics of %s reused from %s", kind, key, path)
        else:
            _collect_into(path, kind, models[key], read_texts(data[key], settings.samples, where), settings, device)
        files[key] = path
    return Statistics(kind, files)


def _collect_into(
    path: Path, kind: str, info: ModelInfo, texts: list[str], settings: CalibrationConfig, device: str
) -> None:
    from safetensors.torch import save_file

    from mergesmith.calibration.collect import collect

    log.info("calibration: collecting %s statistics of %s over %d prompts", kind, info.directory, len(texts))
    stats = collect(kind, Path(info.directory), texts, settings.max_length, device)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in stats.items()}, str(partial), metadata={"kind": kind})
    os.replace(partial, path)  # whole or absent: a second run never reads half a file
