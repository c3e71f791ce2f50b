"""`mergesmith moe CONFIG OUT_DIR`: a Mixtral / Qwen-MoE / Qwen3-MoE / GraniteMoE model from dense experts."""

from __future__ import annotations

from typing import Any

import click

from mergesmith.commandline import STRICT_HELP, log, main, parse_size, setup_logging, user_errors
from mergesmith.errors import MergeError


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--cuda/--no-cuda", default=False, help="Run the base model for `hidden` gates on the GPU.")
@click.option("--device", default=None, help="Device for the gate computation: cpu, cuda, cuda:1.")
@click.option("--out-shard-size", default="5B", show_default=True, help="Max bytes per output shard (k/m/b suffixes).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Copy the base model's tokenizer.")
@click.option("--write-model-card/--no-write-model-card", default=True, help="Write README.md listing the experts.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Passed to transformers.")
@click.option("--random-seed", type=int, default=None, help="Seed for random gates and noise_scale; default 0.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_identical",
    is_flag=True,
    help="Allow every expert to be the same model (for upcycling before training).",
)
@click.option("--load-in-4bit", is_flag=True, hidden=True)
@click.option("--load-in-8bit", is_flag=True, hidden=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_PATH.")
@click.option("--resume", is_flag=True, help="Reuse the finished shards of an interrupted build of the same MoE.")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf in output tensors instead of failing.")
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option("--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
@user_errors
def moe(config_file: str, out_path: str, **opts: Any) -> None:
    """Build a mixture of experts from dense fine-tunes of one base (a mergekit-moe YAML config).

    \b
    Example:
      mergesmith moe moe.yml ./my-moe --random-seed 0
    """
    from mergesmith.merge import MergeOptions
    from mergesmith.moe.build import run_moe
    from mergesmith.moe.config import load_moe_config
    from mergesmith.recipe.leniency import enforce, unknown_keys

    setup_logging(opts["verbose"])
    if opts["load_in_4bit"] or opts["load_in_8bit"]:
        click.echo("note: --load-in-4bit/8bit is not needed; the base model runs in bfloat16", err=True)
    config, text = load_moe_config(config_file)
    ignored = list(unknown_keys(config))
    enforce(ignored, opts["strict"], config_file)
    for f in ignored:
        log.warning(f.line())
    device = opts["device"] or ("cuda" if opts["cuda"] else "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergeError("--cuda was given but no CUDA device is available to torch", "--cuda")
    options = MergeOptions(
        device=device,
        out_shard_size=parse_size(opts["out_shard_size"]),
        copy_tokenizer=opts["copy_tokenizer"],
        write_model_card=opts["write_model_card"],
        random_seed=opts["random_seed"],
        overwrite=opts["overwrite"],
        transformers_cache=opts["transformers_cache"],
        trust_remote_code=opts["trust_remote_code"],
        resume=opts["resume"],
        allow_nonfinite=opts["allow_nonfinite"],
        allow_identical_experts=opts["allow_identical"],
    )
    summary = run_moe(config, text, out_path, options)
    click.echo(summary.line())
    for note in summary.notes:
        click.echo(note)
