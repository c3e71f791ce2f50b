"""`mergesmith verify OUT`: re-check a finished model directory without trusting how it was made."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from mergesmith import kernels
from mergesmith.errors import MergeError
from mergesmith.reliability.checks import config_problems
from mergesmith.sources.jsonfile import read_json
from mergesmith.sources.model import TensorMeta, read_safetensors_header

INDEX = "model.safetensors.index.json"


def verify_directory(directory: Path) -> tuple[list[str], dict[str, TensorMeta]]:
    """Problems found (index vs files, headers, NaN/Inf, config.json vs tensors) and the tensors read."""
    problems: list[str] = []
    tensors: dict[str, TensorMeta] = {}
    if not directory.is_dir():
        return [f"{directory}: not a directory"], tensors
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    expected: dict[str, str] = {}
    if (directory / INDEX).exists():
        try:
            index = read_json(directory / INDEX)
            expected = dict(index["weight_map"])
            total = int(index.get("metadata", {}).get("total_size", -1))
        except MergeError as err:
            return [str(err)], tensors
        except (KeyError, TypeError, ValueError, AttributeError):
            return [f"{directory / INDEX}: no valid 'weight_map'"], tensors
        for file in sorted(set(expected.values()) - set(files)):
            problems.append(f"{directory / file}: named in the index but missing")
        for file in sorted(set(files) - set(expected.values())):
            problems.append(f"{directory / file}: not named in the index")
    elif files != ["model.safetensors"]:
        return [f"{directory}: expected model.safetensors or an index with shards, found {files or 'none'}"], tensors
    for file in files:
        try:
            metas = read_safetensors_header(directory / file)
        except MergeError as err:
            problems.append(str(err))
            continue
        for name, meta in metas.items():
            if expected and expected.get(name) != file:
                problems.append(f"{directory / file}: tensor {name} is not mapped to this file by the index")
            tensors[name] = meta
        with safe_open(str(directory / file), framework="pt", device="cpu") as f:
            for name in metas:
                bad = kernels.nonfinite(f.get_tensor(name))
                if bad:
                    problems.append(f"{directory / file}: tensor {name} has {bad} NaN/Inf values")
    if expected:
        for name in sorted(set(expected) - set(tensors)):
            problems.append(f"{directory / INDEX}: tensor {name} is in the index but in no file")
        size = sum(m.nbytes for m in tensors.values())
        if total not in (-1, size):
            problems.append(f"{directory / INDEX}: total_size is {total} but the tensors take {size} bytes")
    config_path = directory / "config.json"
    if not config_path.exists():
        problems.append(f"{config_path}: missing")
    else:
        try:
            config = read_json(config_path)
            if not isinstance(config, dict):
                raise MergeError("config.json must be a JSON object", str(config_path))
            problems += [
                f"{config_path}: {p}" for p in config_problems(config, {n: m.shape for n, m in tensors.items()})
            ]
        except MergeError as err:
            problems.append(str(err))
    return problems, tensors


def load_and_run(directory: Path) -> str:
    """Load in the class config.json names (AutoModelForCausalLM if transformers has none of that
    name) and run a forward pass on a few tokens; returns a one-line result."""
    import torch
    import transformers

    names = (read_json(directory / "config.json") or {}).get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM
    try:
        model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    except Exception as err:
        raise MergeError(f"transformers cannot load the model: {type(err).__name__}: {err}", str(directory)) from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            shown = ", ".join(str(k) for k in list(info[kind])[:5])
            raise MergeError(f"{type(model).__name__} reports {kind.replace('_', ' ')}: {shown}", str(directory))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(1, 1 + min(8, vocab - 1)).unsqueeze(0)
    with torch.no_grad():
        extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
        logits = model(input_ids=ids, **extra).logits
    if not torch.isfinite(logits).all():
        raise MergeError("the forward pass produced NaN/Inf logits", str(directory))
    return f"loaded {type(model).__name__} and ran a forward pass on {ids.shape[1]} tokens: logits {list(logits.shape)}, finite"
