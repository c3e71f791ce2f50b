"""`mergesmith extract-lora`: mergekit-extract-lora's flags, plus `--energy`."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from mergesmith.commandline import main, setup_logging, user_errors
from mergesmith.errors import MergeError


@main.command("extract-lora")
@click.option("--model", required=True, help="The fine-tuned model (may be base+adapter).")
@click.option("--base-model", required=True, help="The base model the adapter will apply to.")
@click.option("--out-path", required=True, type=click.Path(file_okay=False), help="Adapter directory to write.")
@click.option("--max-rank", type=int, default=128, show_default=True, help="Largest rank per module.")
@click.option("--energy", type=float, default=None, help="Smallest rank keeping this share of sigma^2 (0-1].")
@click.option("--distribute-scale/--no-distribute-scale", default=True, help="Split sqrt(sigma) into A and B.")
@click.option("--embed-lora/--no-embed-lora", default=False, help="Factor embeddings too (else keep them whole).")
@click.option("--save-module", multiple=True, help="Module name (or last part) to keep whole; repeatable.")
@click.option("-i", "--include-regex", multiple=True, help="Only modules whose name matches (re.search).")
@click.option("-e", "--exclude-regex", multiple=True, help="Leave out modules whose name matches.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True, help="Drop singular values <= this.")
@click.option("--skip-undecomposable", is_flag=True, help="Leave out changed tensors that cannot be factored.")
@click.option("--cuda/--no-cuda", default=False, help="Run the SVDs on the GPU.")
@click.option("--device", default=None, help="SVD device: cpu, cuda, cuda:1.")
@click.option("--transformers-cache", default=None, help="Hugging Face download cache directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out-path.")
@click.option("--quiet", is_flag=True, help="Only the final line.")
@click.option("-v", "--verbose", count=True)
@user_errors
def extract_lora(**opts: Any) -> None:
    """Extract the difference between a fine-tune and its base as a peft LoRA adapter.

    \b
    Example:
      mergesmith extract-lora --model ./ft --base-model ./base --out-path ./lora --max-rank 32
    """
    from mergesmith.lora.builder import ExtractOptions
    from mergesmith.lora.extract import extract_lora as run_extract

    setup_logging(opts["verbose"])
    if opts["max_rank"] < 1:
        raise MergeError("--max-rank must be at least 1", "--max-rank")
    if opts["energy"] is not None and not 0 < opts["energy"] <= 1:
        raise MergeError("--energy is a share of the squared singular values, in (0, 1]", "--energy")
    device = opts["device"] or ("cuda" if opts["cuda"] else "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergeError("--cuda was given but no CUDA device is available to torch", "--cuda")
    options = ExtractOptions(
        max_rank=opts["max_rank"],
        energy=opts["energy"],
        sv_epsilon=opts["sv_epsilon"],
        distribute_scale=opts["distribute_scale"],
        embed_lora=opts["embed_lora"],
        save_modules=tuple(opts["save_module"]),
        include=tuple(opts["include_regex"]),
        exclude=tuple(opts["exclude_regex"]),
        skip_undecomposable=opts["skip_undecomposable"],
        device=device,
    )
    summary = run_extract(
        opts["model"],
        opts["base_model"],
        opts["out_path"],
        options,
        overwrite=opts["overwrite"],
        cache_dir=opts["transformers_cache"],
        command_line="mergesmith " + shlex.join(sys.argv[1:]),
    )
    lines = summary.lines()
    for line in lines if not opts["quiet"] else lines[-1:]:
        click.echo(line)
