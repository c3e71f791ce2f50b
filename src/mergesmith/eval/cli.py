"""`mergesmith eval`: score models side by side on JSONL and lm-eval tasks."""

from __future__ import annotations

import click

from mergesmith.commandline import main, setup_logging, user_errors
from mergesmith.errors import MergeError
from mergesmith.extras import require


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "-t", "--task", "tasks", multiple=True, required=True, help="A .jsonl task, an lm-eval task name or YAML."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N examples of each task.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--output-json", type=click.Path(dir_okay=False), default=None, help="Write all scores as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Draw grouped bars to a PNG file.")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed set before each model is scored.")
@click.option("--compare-inputs/--no-compare-inputs", default=True, help="Also score the inputs of merges.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Passed to transformers.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
@user_errors
def eval_command(models: tuple[str, ...], tasks: tuple[str, ...], **opts: object) -> None:
    """Score MODELS (directories, hub ids, base+adapter) on TASKs and compare them side by side.

    \b
    Example:
      mergesmith eval ./merged org/parent-a org/parent-b -t qa.jsonl -t mc.jsonl --plot scores.png
    """
    from rich.console import Console

    from mergesmith.eval import evaluate_models, load_model, load_tasks
    from mergesmith.eval.models import pick_device
    from mergesmith.eval.report import plot, table, write_json

    setup_logging(int(opts["verbose"]))
    if opts["plot"] and not str(opts["plot"]).lower().endswith(".png"):
        raise MergeError("the plot is written as PNG: give a file name ending in .png", "--plot")
    if opts["plot"]:
        require("matplotlib", "mergesmith eval --plot", "--plot")  # before any model is scored
    device = pick_device(str(opts["device"]))
    task_list = load_tasks(list(tasks))  # every file and task name checked before a model loads
    console = Console(stderr=True)

    def load(reference: str) -> tuple[object, object]:
        with console.status(f"loading {reference}"):
            return load_model(
                reference,
                device=device,
                dtype=str(opts["dtype"]),
                trust_remote_code=bool(opts["trust_remote_code"]),
                cache_dir=opts["transformers_cache"],  # type: ignore[arg-type]
            )

    report = evaluate_models(
        list(models),
        task_list,
        load=load,
        batch_size=int(opts["batch_size"]),  # type: ignore[call-overload]
        limit=opts["limit"],  # type: ignore[arg-type]
        seed=opts["seed"],  # type: ignore[arg-type]
        compare_inputs=bool(opts["compare_inputs"]),
        on_model=lambda r: console.print(
            f"scored {r.model}: {r.examples} examples in {r.score_seconds:.2f} s"
            f" ({r.examples_per_second:.1f} examples/s; loaded in {r.load_seconds:.2f} s)"
        ),
    )
    Console(width=max(100, Console().width)).print(table(report))
    if opts["output_json"]:
        write_json(report, str(opts["output_json"]))
    if opts["plot"]:
        plot(report, str(opts["plot"]))
