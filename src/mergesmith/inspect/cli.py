"""`mergesmith inspect`: the figures of a merge's inputs, before (or after) merging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mergesmith.commandline import main, setup_logging, user_errors
from mergesmith.errors import MergeError


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--base", default=None, metavar="BASE", help="The base model; then INPUTS are the task models.")
@click.option("--merged", default=None, metavar="OUT", help="A finished merge: how far it moved towards each input.")
@click.option("--json", "json_file", default=None, type=click.Path(dir_okay=False), help="Write every figure as JSON.")
@click.option("--html", "html_file", default=None, type=click.Path(dir_okay=False), help="Write a self-contained page.")
@click.option("--density", type=float, default=None, help="Density for the kept-mass figures (default: the recipe's).")
@click.option("--rank", type=click.IntRange(1, 1024), default=32, show_default=True, help="Singular values per matrix.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
@user_errors
def inspect(inputs: tuple[str, ...], **opts: Any) -> None:
    """Compare task vectors before merging: norms, cosines, sign conflict, density cut, spectra.

    INPUTS is a recipe (its models against its base_model), or with --base the task models.

    \b
    Examples:
      mergesmith inspect recipe.yml --html report.html --json report.json
      mergesmith inspect --base ./base ./ft-a ./ft-b --density 0.5
      mergesmith inspect recipe.yml --merged ./merged
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mergesmith.inspect.findings import findings
    from mergesmith.inspect.inputs import from_models, from_recipe
    from mergesmith.inspect.page import write_page
    from mergesmith.inspect.report import build_report, write_json
    from mergesmith.inspect.survey import survey
    from mergesmith.inspect.table import summary_lines

    setup_logging(opts["verbose"])
    density = opts["density"]
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}", "--density")
    common = {"merged": opts["merged"], "density": density, "cache_dir": opts["transformers_cache"]}
    if opts["base"] is not None:
        subject = from_models(opts["base"], list(inputs), **common)
    elif len(inputs) == 1 and Path(inputs[0]).is_file():
        subject = from_recipe(inputs[0], base=None, **common)
    else:
        raise click.UsageError("give one recipe file, or --base BASE and the task models")
    total = sum(t.numel for t in subject.base.tensors.values() if t.shape)
    bar = Progress(
        TextColumn("[bold]inspecting"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=opts["quiet"],
        transient=True,
    )
    with bar:
        task = bar.add_task("inspecting", total=total)
        result = survey(subject, rank=opts["rank"], progress=lambda name, n: bar.advance(task, n))
    report = build_report(result, opts["rank"])
    report["findings"] = findings(report)
    if opts["json_file"]:
        write_json(report, opts["json_file"])
    if opts["html_file"]:
        write_page(report, opts["html_file"])
    for line in summary_lines(report):
        click.echo(line)
    for label, path in (("json", opts["json_file"]), ("html", opts["html_file"])):
        if path:
            click.echo(f"{label}: {path}", err=True)
    sys.stdout.flush()
