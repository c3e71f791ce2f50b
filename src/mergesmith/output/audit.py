"""Is a directory a complete merge? Checked before a stage is reused and before anything is uploaded.

Complete = a readable config.json, weights that are all there (a single safetensors file, or an index
whose every shard exists and whose every tensor is in its shard's header), and no staging directory
beside it (a merge still being written, or one that died).
"""

from __future__ import annotations

import json
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.output.staging import staging_dir
from mergesmith.sources.model import read_safetensors_header


def audit_merge(directory: str | Path) -> list[str]:
    """The files of a complete merge (relative paths, sorted, hidden files left out); raises if incomplete."""
    d = Path(directory)
    if not d.is_dir():
        raise MergeError("not a directory", str(d))
    if staging_dir(d).exists():
        raise MergeError(f"a merge into this directory is unfinished ({staging_dir(d).name} exists)", str(d))
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise MergeError("no config.json: not a complete model", str(d)) from None
    except (OSError, ValueError) as err:
        raise MergeError(f"config.json is not readable JSON ({err})", str(d)) from None
    if not isinstance(config, dict):
        raise MergeError("config.json is not a JSON object", str(d))
    _check_weights(d)
    files = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not p.name.endswith(".partial"):
            files.append(rel.as_posix())
    return files


def is_complete_merge(directory: str | Path) -> bool:
    try:
        audit_merge(directory)
    except MergeError:
        return False
    return True


def _check_weights(d: Path) -> None:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MergeError(f"unreadable index ({err})", str(index)) from None
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in sorted(by_file.items()):
            if not (d / file).is_file():
                raise MergeError(f"shard '{file}' named in the index is missing", str(index))
            missing = names - set(read_safetensors_header(d / file))
            if missing:
                raise MergeError(f"shard '{file}' lacks tensors the index names: {sorted(missing)[:3]}", str(index))
        return
    if (d / "model.safetensors").is_file():
        read_safetensors_header(d / "model.safetensors")  # raises on a truncated file
        return
    if (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        return
    raise MergeError("no model weights (model.safetensors or model.safetensors.index.json)", str(d))
