"""The command line. Commands and flags only: every MergeError becomes one clear message and exit 2."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any

import click

from mergesmith.commandline import (
    STRICT_HELP,
    main,
    merge_options,
    note_inert_flags,
    setup_logging,
    tuning_flags,
    user_errors,
)
from mergesmith.errors import MergeError


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
@click.option(
    "--sync/--no-sync",
    default=True,
    help="Have the output on the disk before reporting success (the default); --no-sync: in the page cache, as "
    "mergekit leaves it (faster on slow disks; a power cut soon after can lose or tear it).",
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
