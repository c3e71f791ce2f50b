"""Commands: `mergesmith validate CONFIG` (also behind `run --dry-run`) and `mergesmith verify OUT`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from mergesmith.commandline import STRICT_HELP, main, parse_size, setup_logging, user_errors
from mergesmith.errors import MergeError

if TYPE_CHECKING:
    from mergesmith.plan import Plan


def report_validation(
    config_file: str,
    *,
    cuda: bool,
    cache_dir: str | None,
    verbose: int,
    strict: bool = False,
    extra: Callable[[Plan], list[str]] | None = None,
) -> int:
    """Print every problem (or the plan and the estimates, and `extra`'s lines); returns the exit
    code (2: problems). Keys and parameters mergekit would ignore are listed as warnings; problems
    only with `strict`."""
    from mergesmith.reliability.validate import summary_line, validate_recipe

    v = validate_recipe(config_file, cache_dir=cache_dir, cuda=cuda, strict=strict)
    if not strict:
        for f in v.ignored:
            if f.level == "warning" or verbose:
                click.echo(f"{f.level}: {f.line()}", err=True)
    if v.problems:
        click.echo(f"{len(v.problems)} problem(s) in {config_file}:", err=True)
        for p in v.problems:
            click.echo(f"  {p.line()}", err=True)
        return 2
    assert v.plan is not None and v.estimate is not None
    for w in v.plan.warnings:
        click.echo(f"warning: {w}", err=True)
    for line in v.plan.structure:
        click.echo(line)
    if verbose >= 2:
        for line in v.plan.describe():
            click.echo(line)
    click.echo(summary_line(v.plan))
    for line in v.estimate.lines():
        click.echo(line)
    for line in extra(v.plan) if extra is not None else []:
        click.echo(line)
    click.echo("no problems found")
    return 0


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--cuda", is_flag=True, help="Also estimate GPU memory.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("-v", "--verbose", count=True, help="-vv prints the per-tensor plan.")
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@user_errors
def validate(config_file: str, cuda: bool, transformers_cache: str | None, verbose: int, strict: bool) -> None:
    """Check a recipe from metadata only: every problem at once, with its YAML path and a fix.

    \b
    Example:
      mergesmith validate recipe.yml --cuda
    """
    setup_logging(verbose)
    if is_moe_config(config_file):
        sys.exit(report_moe_validation(config_file, strict))
    sys.exit(report_validation(config_file, cuda=cuda, cache_dir=transformers_cache, verbose=verbose, strict=strict))


def is_moe_config(config_file: str) -> bool:
    """mergekit-moe configs list `experts`; merge recipes never do."""
    from mergesmith.recipe.schema import load_yaml

    try:
        data = load_yaml(config_file)
    except Exception:  # the merge-recipe path reports unreadable files with their own message
        return False
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def report_moe_validation(config_file: str, strict: bool = False) -> int:
    from mergesmith.moe.config import moe_ignored
    from mergesmith.moe.prepare import validate_moe_config

    problems = validate_moe_config(config_file, strict)
    if not strict:
        for f in moe_ignored(config_file):
            click.echo(f"{f.level}: {f.line()}", err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {config_file}:", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        return 2
    click.echo("MoE config: no problems found")
    return 0


def schedule_lines(plan: Plan, *, workers: int, shard_size: int, bandwidth: int) -> list[str]:
    """The `--workers` schedule of `plan`: the shards a run would write, dealt to its tasks."""
    from mergesmith.engine import schedule
    from mergesmith.shard_layout import layout_shards

    if bandwidth <= 0:
        raise MergeError("--bandwidth must be a positive number of bytes per second, like 1B or 500M", "--bandwidth")
    shards = layout_shards([(t.name, t.dtype, t.shape) for t in plan.tensors], shard_size)
    return schedule.schedule_lines(schedule.schedule(plan, shards, workers), bandwidth)


def dry_run(config_file: str, opts: dict[str, Any]) -> None:
    """`run --dry-run`: the same checks as `validate`; with `--workers`, the tasks' schedule too."""
    cuda = bool(opts.get("cuda") or opts.get("gpu_rich") or str(opts.get("device") or "").startswith("cuda"))
    extra = None
    if opts.get("workers"):
        extra = functools.partial(
            schedule_lines,
            workers=opts["workers"],
            shard_size=parse_size(opts.get("out_shard_size") or "5B"),
            bandwidth=parse_size(opts.get("bandwidth") or "1B"),
        )
    code = report_validation(
        config_file,
        cuda=cuda,
        cache_dir=opts.get("transformers_cache"),
        verbose=opts.get("verbose", 0),
        strict=opts.get("strict", False),
        extra=extra,
    )
    if code:
        sys.exit(code)


@main.command()
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--load", is_flag=True, help="Also load it with transformers and run a forward pass.")
@user_errors
def verify(out_path: str, load: bool) -> None:
    """Re-check a merged model directory: index vs files, headers, NaN/Inf, config.json vs tensors.

    \b
    Example:
      mergesmith verify ./merged --load
    """
    from pathlib import Path

    from mergesmith.reliability.verify import load_and_run, verify_directory

    problems, tensors = verify_directory(Path(out_path))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {out_path}:", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)
    click.echo(f"ok: {len(tensors)} tensors, index and headers consistent, all finite, config.json matches")
    if load:
        click.echo(load_and_run(Path(out_path)))
