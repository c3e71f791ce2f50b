"""Load a model reference (directory, hub id, `base+adapter`) once, ready to score."""

from __future__ import annotations

from typing import Any

from mergesmith.errors import MergeError
from mergesmith.sources.model import resolve_directory
from mergesmith.sources.refs import ModelRef, parse_ref

DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was given but no CUDA device is available to torch", "--device")
    return device


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise MergeError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})", "--dtype")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _adapted(ref: ModelRef, *, dtype: str, device: str, trust_remote_code: bool, cache_dir: str | None) -> Any:
    """base + LoRA adapter, prepared and merged in memory as `mergesmith run` would write it (the same
    folding, the same added rows), so a score of `base+adapter` is the score of that merge."""
    from mergesmith.preparation import MergeOptions
    from mergesmith.recipe.schema import parse_config
    from mergesmith.resident import ResidentMerge

    recipe: dict[str, Any] = {"models": [{"model": str(ref)}], "merge_method": "passthrough"}
    if dtype != "auto":
        recipe["out_dtype"] = dtype
    options = MergeOptions(device=device, transformers_cache=cache_dir, trust_remote_code=trust_remote_code)
    config = parse_config(recipe, str(ref))
    resident = ResidentMerge(config, options, dtype=None if dtype == "auto" else dtype)
    resident.load(config)
    return resident.model


def load_model(
    reference: str | ModelRef,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) for `reference`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = parse_ref(reference, str(reference))
    directory = resolve_directory(ModelRef(ref.path, ref.revision), cache_dir)
    torch_dtype = _torch_dtype(dtype)
    try:
        if ref.lora is not None:
            adapter = resolve_directory(ref.lora, cache_dir)
            model = _adapted(
                ref, dtype=dtype, device=pick_device(device), trust_remote_code=trust_remote_code, cache_dir=cache_dir
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        tok_dir = adapter if ref.lora is not None and (adapter / "tokenizer_config.json").exists() else directory
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    except MergeError:
        raise
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise MergeError(f"transformers could not load this model ({type(err).__name__}: {first})", str(ref)) from None
    return model.to(pick_device(device)).eval(), tokenizer
