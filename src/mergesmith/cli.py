"""The command line. Commands and flags only: every MergeError becomes one clear message and exit 2."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
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
    )


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False), required=False)
@click.option("--cuda/--no-cuda", default=False, help="Run the arithmetic on the GPU.")
@click.option("--device", default=None, help="Math device: cpu, cuda, cuda:1, auto.")
@click.option("--out-shard-size", default="5B", show_default=True, help="Max bytes per output shard (k/m/b suffixes).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Copy the donor model's tokenizer.")
@click.option("--write-model-card/--no-write-model-card", default=True, help="Write README.md and the recipe copy.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Passed to transformers.")
@click.option("--random-seed", type=int, default=None, help="Seed for random methods (DARE, DELLA); default 0.")
@click.option("--safe-serialization/--no-safe-serialization", default=True, help="Write safetensors.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("--lora-merge-cache", default=None, help="Directory to keep materialised base+LoRA models.")
@click.option("--lora-merge-dtype", default=None, help="dtype for LoRA materialisation.")
@click.option("--as-lora", type=int, default=None, help="Write the merge as a LoRA of base_model, of this max rank.")
@click.option("--as-lora-energy", type=float, default=None, help="As --as-lora, rank by share of sigma^2 (0-1].")
@click.option("-j", "--num-threads", type=int, default=None, help="torch threads.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_PATH.")
@click.option("--resume", is_flag=True, help="Reuse the finished shards of an interrupted run of the same merge.")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf in merged tensors instead of failing.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the bytes to read and write; read no tensor.")
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Split the merge into N Ray tasks (by shard)."
)
@click.option("--ray-address", default=None, help="Ray cluster to run --workers tasks on (default: start a local one).")
@click.option(
    "--bandwidth", default="1B", show_default=True, help="Bytes/s per worker assumed by --dry-run's time estimate."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug (prints the per-tensor plan).")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID", help="Upload the merge when done.")
@tuning_flags
@user_errors
def run(config_file: str, out_path: str | None, **opts: Any) -> None:
    """Run a merge recipe (mergekit YAML) and write the model to OUT_PATH.

    \b
    Example:
      mergesmith run recipe.yml ./merged --cuda --out-shard-size 2B
      mergesmith run recipe.yml ./merged --workers 4 --ray-address auto
    """
    from mergesmith.merge import run_merge
    from mergesmith.recipe.schema import load_config

    setup_logging(opts["verbose"])
    note_inert_flags(opts)
    if opts["dry_run"]:
        from mergesmith.reliability.cli import dry_run

        return dry_run(config_file, opts)
    if opts["num_threads"]:
        import torch

        torch.set_num_threads(opts["num_threads"])
    config, text = load_config(config_file)
    options = merge_options(opts)
    if out_path is None:
        raise click.UsageError("OUT_PATH is required unless --dry-run is given")
    if (options.workers or options.ray_address) and (opts["as_lora"] is not None or opts["as_lora_energy"] is not None):
        raise MergeError("--workers cannot be combined with --as-lora yet", "--workers")
    if opts["push_to_hub"]:
        from mergesmith.hub import check_login

        check_login()  # before the merge, not after it
    from mergesmith.progress import MergeProgress

    with MergeProgress(disable=opts["quiet"]) as progress:
        if opts["as_lora"] is not None or opts["as_lora_energy"] is not None:
            from mergesmith.lora.output import run_merge_as_lora

            summary = run_merge_as_lora(
                config,
                text,
                out_path,
                options,
                rank=opts["as_lora"],
                energy=opts["as_lora_energy"],
                progress=progress.advance if not opts["quiet"] else None,
                on_plan=progress.start,
            )
        else:
            summary = run_merge(
                config,
                text,
                out_path,
                options,
                progress=progress.advance if not opts["quiet"] else None,
                on_plan=progress.start,
            )
    click.echo(summary.line())
    for note in summary.notes:
        click.echo(note)
    if opts["push_to_hub"]:
        from mergesmith.hub import upload

        click.echo(f"uploaded: {upload(out_path, opts['push_to_hub'])}")


@main.command()
@click.argument("name", required=False)
def methods(name: str | None) -> None:
    """List merge methods, or show one method's formula, parameters and paper."""
    from mergesmith.methods.registry import METHODS, get_method

    if name is None:
        for m in sorted(METHODS.values(), key=lambda m: m.name):
            params = ", ".join(f"{p.name}{'*' if p.per_model else ''}={p.default!r}" for p in m.params.values())
            click.echo(f"{m.name:18} {m.summary}")
            click.echo(f"{'':18} params: {params or '-'}  (* per model)")
        return
    try:
        m = get_method(name)
    except MergeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"{m.name}: {m.summary}")
    if m.paper:
        click.echo(f"paper: {m.paper}")
    click.echo(f"base model: {m.base}")
    for p in m.params.values():
        click.echo(f"  {p.name}: {p.type.__name__}, default {p.default!r}{', per model' if p.per_model else ''}")
    if m.formula:
        click.echo("\n" + m.formula)


@main.command()
@click.argument("workdir", type=click.Path(file_okay=False), default="mergesmith-demo")
@user_errors
def demo(workdir: str) -> None:
    """Train two tiny fine-tunes on two skills, TIES-merge them, load the result with transformers and generate."""
    from pathlib import Path

    from mergesmith.demo import run_demo

    summary, text = run_demo(Path(workdir))
    click.echo(summary.line())
    click.echo(f"recipe: {Path(workdir) / 'recipe.yml'}")
    click.echo(f"transformers loaded the merge and generated: {text!r}")


# Feature commands live beside their feature; each module registers its commands on `main`.
COMMAND_MODULES: list[str] = [
    "mergesmith.moe.cli",
    "mergesmith.commands_multi",
    "mergesmith.lora.cli",
    "mergesmith.reliability.cli",
    "mergesmith.eval.cli",
    "mergesmith.search.cli",
    "mergesmith.inspect.cli",
]

for _module in COMMAND_MODULES:
    __import__(_module)


def entry() -> None:
    """The console script: the CLI, then an exit without the interpreter's teardown.

    Unloading torch and the other extension modules takes 1-1.5 s here (measured: a passthrough
    merge done 4.3 s after start, the process gone at 5.8 s). By then every output is written,
    synced and closed; the exit handlers run (logging, thread pools, finalizers), the streams are
    flushed, and the process ends."""
    try:
        main.main(standalone_mode=True)
        code: object = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # Run as `python -m mergesmith.cli`, this file is `__main__`; feature modules register their commands
    # on the group of the imported `mergesmith.cli`, so that is the one to run.
    from mergesmith.cli import entry as registered_entry

    registered_entry()
