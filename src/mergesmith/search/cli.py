"""`mergesmith search GENOME.yml --storage-path DIR`: the command and its live progress display."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mergesmith.commandline import main, merge_options, setup_logging, user_errors
from mergesmith.search.optimizers import OPTIMIZERS


class SearchProgress:
    """Evaluations done, best score so far and the ETA, on stderr."""

    def __init__(self, total: int, disable: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=disable,
        )
        self.task = self.progress.add_task("search", total=total, best="-")

    def __call__(self, done: int, best: dict[str, Any] | None) -> None:
        shown = "-" if best is None else f"{best['fitness']:.6g} (#{best['index']})"
        self.progress.update(self.task, completed=done, best=shown)


@main.command()
@click.argument("genome_file", type=click.Path(dir_okay=False))
@click.option("--storage-path", required=True, type=click.Path(file_okay=False), help="Where results are kept.")
@click.option("--max-evals", type=int, default=100, show_default=True, help="Candidates to evaluate in all.")
@click.option("--time-budget", type=float, default=None, help="Stop starting candidates after this many seconds.")
@click.option("--random-seed", type=int, default=0, show_default=True, help="Same seed + budget = same candidates.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="cmaes", show_default=True)
@click.option("--population-size", type=int, default=None, help="Candidates per generation (default: per optimiser).")
@click.option("--workers", type=int, default=1, show_default=True, help="Parallel workers (local Ray when > 1).")
@click.option("--ray-address", default=None, help="Run on an existing Ray cluster (e.g. auto, ray://host:10001).")
@click.option(
    "--cpus-per-worker", type=int, default=None, help="CPUs per worker (and torch threads); default 1 on Ray."
)
@click.option("--device", default="cpu", show_default=True, help="Device for serial evaluation (cpu, cuda).")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("--lora-merge-cache", default=None, help="Directory to keep materialised base+LoRA models.")
@click.option("--lora-merge-dtype", default=None, help="dtype for LoRA materialisation.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Passed to transformers.")
@click.option("--resume", is_flag=True, help="Continue the search stored in --storage-path.")
@click.option("--save-final-model/--no-save-final-model", default=False, help="Write the best merge to final_model/.")
@click.option("--holdout", multiple=True, help="TASK to score the best recipe on afterwards (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
@user_errors
def search(genome_file: str, storage_path: str, **opts: Any) -> None:
    """Search merge coefficients for a genome (mergekit-evolve format) and keep the best recipe.

    \b
    Example:
      mergesmith search genome.yml --storage-path ./search --max-evals 200
      mergesmith search genome.yml --storage-path ./search --resume --max-evals 400
    """
    from mergesmith.search.genome import load_search_definition
    from mergesmith.search.runner import SearchOptions, prepare, run_search
    from mergesmith.search.tasks import parse_task_arg

    setup_logging(opts["verbose"])
    definition = load_search_definition(genome_file)
    prepared = prepare(definition)  # every user error before anything runs
    holdout = [parse_task_arg(t) for t in opts["holdout"]]
    options = SearchOptions(
        max_evals=opts["max_evals"],
        time_budget=opts["time_budget"],
        seed=opts["random_seed"],
        optimizer=opts["optimizer"],
        popsize=opts["population_size"],
        workers=opts["workers"],
        ray_address=opts["ray_address"],
        cpus_per_worker=opts["cpus_per_worker"],
        resume=opts["resume"],
        device=opts["device"],
        merge=merge_options({**opts, "random_seed": None, "resume": False, "workers": None, "ray_address": None}),
    )
    start = time.perf_counter()
    display = SearchProgress(options.max_evals, opts["quiet"])
    with display.progress:
        result = run_search(definition, storage_path, options, progress=display, prepared=prepared)
    best = result.best
    click.echo(
        f"searched {len(result.history)} candidates ({result.evaluated} scored now) in"
        f" {time.perf_counter() - start:.1f} s -> {storage_path}"
    )
    if best is None:
        return
    scores = ", ".join(f"{k} {v:.6g}" for k, v in best["scores"].items())
    click.echo(f"best: candidate {best['index']}, fitness {best['fitness']:.6g} ({scores})")
    click.echo(f"recipe: {Path(storage_path) / 'best_config.yaml'}")
    if result.front:
        click.echo(f"pareto front: {len(result.front)} candidates -> {Path(storage_path) / 'pareto_front.json'}")
    if holdout:
        from mergesmith.search.inmemory import InMemoryMerger
        from mergesmith.search.report import holdout_report
        from mergesmith.search.storage import Storage

        merger = InMemoryMerger(best["recipe"], holdout, device=options.device, options=options.merge)
        held = merger.score(best["recipe"]).scores
        weights = [t.weight for t in prepared.tasks]
        lines, record = holdout_report(best["scores"], held, weights, definition.fitness)
        for line in lines:
            click.echo(line)
        Storage(storage_path).write_json(
            "holdout.json", {"index": best["index"], "search": best["scores"], "holdout": held, **record}
        )
    if opts["save_final_model"]:
        import yaml

        from mergesmith.merge import run_merge
        from mergesmith.recipe.schema import parse_config

        text = yaml.safe_dump(best["recipe"], sort_keys=False)
        summary = run_merge(
            parse_config(best["recipe"], "best_config.yaml"),
            text,
            Path(storage_path) / "final_model",
            replace(options.merge, overwrite=True),  # seed 0, as the candidates were scored
        )
        click.echo(summary.line())
