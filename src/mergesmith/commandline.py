"""What every command module shares: the `main` group, logging set-up, the error wrapper, sizes and flags.

Below `cli.py` and the feature command modules (reliability/, eval/, search/, inspect/, moe/,
lora/ and commands_multi), so they register on `main` without importing `cli.py`, which imports
them: the command layer stays free of import cycles.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from mergesmith.errors import MergeError

log = logging.getLogger("mergesmith")


def parse_size(text: str) -> int:
    """`5B`, `500M`, `1.5b`, `1000000` -> bytes (k/m/b/t = 10^3/10^6/10^9/10^12, as mergekit)."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kmbtKMBT]?)\s*", text)
    if m is None:
        raise click.BadParameter(f"'{text}' is not a size like 1B, 500M or 1000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[m[2].lower()]
    return int(float(m[1]) * scale)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MergeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)

    return wrapper


def setup_logging(verbose: int) -> None:
    """`--quiet` hides progress bars only: warnings always show."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("mergesmith")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the record (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mergesmith")
def main() -> None:
    """mergesmith: merge language models from mergekit-compatible YAML recipes."""


# Flags that only tune mergekit's own scheduler: accepted so recipes' command lines run unchanged.
TUNING_FLAGS = [
    click.option(
        "--low-cpu-memory/--no-low-cpu-memory", default=False, help="Accepted (mergesmith is always low-memory)."
    ),
    click.option("--read-to-gpu/--no-read-to-gpu", default=False, help="Accepted; inputs are staged by the engine."),
    click.option("--multi-gpu/--no-multi-gpu", default=False, help="Accepted; one device is used."),
    click.option("--gpu-rich", is_flag=True, help="Same as --cuda."),
    click.option("--async-write/--no-async-write", default=False, help="Accepted; writes are always streamed."),
    click.option("--write-threads", type=int, default=1, help="Accepted and ignored (as in mergekit)."),
    click.option(
        "--lazy-unpickle/--no-lazy-unpickle",
        default=False,
        help="Accepted: .bin inputs are always memory-mapped and read weights-only.",
    ),
    click.option(
        "--allow-crimes/--no-allow-crimes",
        default=False,
        help="Allow merging models of different architectures (mergesmith infers layers from names).",
    ),
    click.option(
        "--clone-tensors/--no-clone-tensors", default=False, help="Accepted; repeated layers are always written."
    ),
]


# What each accepted-but-inert flag means here, printed once when a command line sets it.
INERT_FLAGS = {
    "low_cpu_memory": "--low-cpu-memory: mergesmith always streams one tensor at a time",
    "read_to_gpu": "--read-to-gpu: inputs are staged to the device by the engine",
    "multi_gpu": "--multi-gpu: one device is used",
    "async_write": "--async-write: shards are always written by a writer thread",
    "lazy_unpickle": "--lazy-unpickle: .bin inputs are always memory-mapped and read weights-only",
    "allow_crimes": "--allow-crimes: layers are inferred from tensor names, so this check does not exist here",
    "clone_tensors": "--clone-tensors: repeated layers are always written as separate tensors",
}


def note_inert_flags(opts: dict[str, Any]) -> None:
    for key, note in INERT_FLAGS.items():
        if opts.get(key):
            click.echo(f"note: {note}", err=True)
    if opts.get("write_threads", 1) != 1:
        click.echo("note: --write-threads is ignored, as in mergekit", err=True)


STRICT_HELP = "Stop on any key or parameter that mergekit would ignore (by default each is a warning)."


def tuning_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(TUNING_FLAGS):
        fn = option(fn)
    return fn


def merge_options(opts: dict[str, Any]) -> Any:
    """MergeOptions from the merge flags shared by `run` and the commands that merge (multi, legacy, ...)."""
    from mergesmith.merge import MergeOptions

    device = opts.get("device") or ("cuda" if opts.get("cuda") or opts.get("gpu_rich") else "cpu")
    if device == "auto" or device.startswith("cuda"):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif not torch.cuda.is_available():
            raise MergeError("--cuda was given but no CUDA device is available to torch", "--cuda")
    return MergeOptions(
        device=device,
        out_shard_size=parse_size(opts.get("out_shard_size") or "5B"),
        copy_tokenizer=opts.get("copy_tokenizer", True),
        write_model_card=opts.get("write_model_card", True),
        random_seed=opts.get("random_seed"),
        overwrite=opts.get("overwrite", False),
        transformers_cache=opts.get("transformers_cache"),
        safe_serialization=opts.get("safe_serialization", True),
        trust_remote_code=opts.get("trust_remote_code", False),
        lora_merge_cache=opts.get("lora_merge_cache"),
        lora_merge_dtype=opts.get("lora_merge_dtype"),
        resume=opts.get("resume", False),
        allow_nonfinite=opts.get("allow_nonfinite", False),
        strict=opts.get("strict", False),
        workers=opts.get("workers") or 0,
        ray_address=opts.get("ray_address"),
        sync=opts.get("sync", True),
    )
