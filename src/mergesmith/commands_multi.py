"""Commands: multi (multi-stage recipes), legacy (old-style command lines), bakllama, upload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mergesmith.commandline import STRICT_HELP, main, setup_logging, tuning_flags, user_errors
from mergesmith.commandline import merge_options as cli_merge_options

MERGE_FLAGS = [
    click.option("--cuda/--no-cuda", default=False, help="Run the arithmetic on the GPU."),
    click.option("--device", default=None, help="Math device: cpu, cuda, cuda:1, auto."),
    click.option("--out-shard-size", default="5B", show_default=True, help="Max bytes per output shard."),
    click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Copy the donor model's tokenizer."),
    click.option("--write-model-card/--no-write-model-card", default=True, help="Write README.md and the recipe."),
    click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Passed to transformers."),
    click.option("--random-seed", type=int, default=None, help="Seed for random methods (DARE, DELLA)."),
    click.option("--safe-serialization/--no-safe-serialization", default=True, help="Write safetensors."),
    click.option("--transformers-cache", default=None, help="Hugging Face download cache directory."),
    click.option("--lora-merge-cache", default=None, help="Directory to keep materialised base+LoRA models."),
    click.option("--lora-merge-dtype", default=None, help="dtype for LoRA materialisation."),
    click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory."),
    click.option("--strict", is_flag=True, help=STRICT_HELP),
    click.option("--quiet", is_flag=True, help="Less output."),
    click.option("-v", "--verbose", count=True, help="-v info, -vv debug."),
]


def merge_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(MERGE_FLAGS):
        fn = option(fn)
    return tuning_flags(fn)


def merge_options(opts: dict[str, Any]) -> Any:
    setup_logging(opts.get("verbose", 0))
    return cli_merge_options(opts)


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("-I", "--intermediate-dir", required=True, type=click.Path(file_okay=False), help="Stage outputs.")
@click.option("--out-path", type=click.Path(file_okay=False), default=None, help="Output of the unnamed recipe.")
@click.option("--lazy/--no-lazy", default=True, help="Reuse complete stage outputs (default) or rebuild all.")
@click.option("--dry-run", is_flag=True, help="Show the stages, their order and what would run; merge nothing.")
@merge_flags
@user_errors
def multi(
    config_file: str, intermediate_dir: str, out_path: str | None, lazy: bool, dry_run: bool, **opts: Any
) -> None:
    """Run a multi-stage recipe: YAML documents with a `name`, each a merge that later ones can use by name.

    \b
    Example:
      mergesmith multi stages.yml -I ./stages --out-path ./final
    """
    from mergesmith.multi import decide, load_multi, run_multi
    from mergesmith.recipe.leniency import check_recipe, enforce

    options = merge_options(opts)
    recipe = load_multi(config_file, intermediate_dir, out_path)
    for stage in recipe.stages:  # with --strict, every stage is checked before any runs
        enforce(check_recipe(stage.config), options.strict, recipe.where(stage))
    if dry_run:
        for stage, run, why in decide(recipe, lazy):
            deps = ", ".join(stage.depends) or "-"
            click.echo(f"{'run ' if run else 'skip'} {stage.label} -> {stage.out} (needs: {deps}; {why})")
        return

    def report(stage: Any, run: bool, why: str) -> None:
        if not opts["quiet"]:
            click.echo(f"{'running' if run else 'skipping'} stage {stage.label} ({why})")

    results = run_multi(recipe, options, lazy, on_stage=report)
    ran = [r for r in results if r.ran]
    click.echo(f"{len(ran)} stage(s) merged, {len(results) - len(ran)} reused")
    for r in ran:
        click.echo(f"  {r.stage.label}: {r.summary.line()}")


@main.command()
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--merge", "merge_", multiple=True, metavar="MODEL", help="A model to merge (repeat).")
@click.option("--base-model", default=None, help="Base model.")
@click.option("--weight", type=float, multiple=True, help="Weight per model (one value: all models).")
@click.option("--density", type=float, multiple=True, help="Density per model (one value: all models).")
@click.option("--method", default="ties", show_default=True, help="Merge method.")
@click.option("--normalize/--no-normalize", default=True, help="Divide by the sum of the weights.")
@click.option("--int8-mask/--no-int8-mask", default=False, help="Accepted (masks are never materialised).")
@click.option("--bf16/--no-bf16", default=True, help="dtype bfloat16 (default, as mergekit-legacy).")
@click.option("--naive-count/--no-naive-count", default=False, help="Accepted; no effect (as in mergekit).")
@click.option("--print-yaml/--no-print-yaml", default=False, help="Print the recipe built (then merge).")
@click.option("--dry-run", is_flag=True, help="With --print-yaml: print the recipe and stop.")
@merge_flags
@user_errors
def legacy(out_path: str, merge_: tuple[str, ...], **opts: Any) -> None:
    """mergekit-legacy's command line: build a `models:` recipe from flags and run it.

    \b
    Example:
      mergesmith legacy ./out --base-model org/base --merge org/a --merge org/b \\
        --weight 0.5 --density 0.5 --print-yaml
    """
    import yaml

    from mergesmith.legacy import legacy_recipe
    from mergesmith.merge import run_merge
    from mergesmith.recipe.schema import parse_config

    options = merge_options(opts)
    if opts["naive_count"]:
        click.echo("warning: --naive-count has no effect (as in mergekit)", err=True)
    recipe = legacy_recipe(
        list(merge_),
        base_model=opts["base_model"],
        weight=list(opts["weight"]),
        density=list(opts["density"]),
        method=opts["method"],
        normalize=opts["normalize"],
        int8_mask=opts["int8_mask"],
        bf16=opts["bf16"],
    )
    text = yaml.safe_dump(recipe, sort_keys=False)
    if opts["print_yaml"]:
        click.echo(text, nl=False)
    if opts["dry_run"]:
        return
    summary = run_merge(parse_config(recipe, "legacy command line"), text, out_path, options)
    click.echo(summary.line())


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--clone-tensors/--no-clone-tensors", default=False, help="Accepted; layers are always written.")
@click.option("--fp16/--no-fp16", default=False, help="Write float16.")
@click.option("--print-yaml", is_flag=True, help="Print the passthrough recipe built, then merge.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Copy the first model's tokenizer.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_PATH.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@user_errors
def bakllama(config_file: str, out_path: str, fp16: bool, print_yaml: bool, **opts: Any) -> None:
    """Stack layers from a bakllama config (`layer_slices`, `embedding_source`, `lm_head_source`).

    \b
    Example:
      mergesmith bakllama stack.yml ./stacked
    """
    import yaml

    from mergesmith.bakllama import bakllama_recipe, load_bakllama, run_bakllama

    options = merge_options(opts)
    config = load_bakllama(config_file)
    dtype = "float16" if fp16 else None
    if print_yaml:
        click.echo(yaml.safe_dump(bakllama_recipe(config, dtype), sort_keys=False), nl=False)
    summary = run_bakllama(config, out_path, options, dtype)
    click.echo(summary.line())


@main.command()
@click.argument("out_path", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="Check the merge and list the files that would be uploaded.")
@user_errors
def upload(out_path: str, repo_id: str, private: bool, dry_run: bool) -> None:
    """Upload a finished merge to the Hugging Face hub (after checking it is complete).

    \b
    Example:
      mergesmith upload ./merged my-user/my-merge --private
    """
    from mergesmith.hub import upload as do_upload
    from mergesmith.hub import upload_plan

    files = upload_plan(out_path)
    if dry_run:
        click.echo(f"would upload {len(files)} file(s) to {repo_id}{' (private)' if private else ''}:")
        for f in files:
            click.echo(f"  {f}")
        return
    url = do_upload(out_path, repo_id, private)
    click.echo(f"uploaded {len(files)} file(s): {url}")
