"""`mergesmith demo`: build two tiny fine-tunes of a tiny Llama, merge them, load and generate.

Everything is made locally (no hub), so it proves an installation works end to end.
"""

from __future__ import annotations

from pathlib import Path

from mergesmith.merge import MergeOptions, MergeSummary, run_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.toymodels import make_base, make_finetune

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.5
      density: 0.6
  - model: {ft2}
    parameters:
      weight: [0.3, 0.7]   # a gradient over the layers
      density: 0.6
parameters:
  normalize: true
dtype: bfloat16
"""


def run_demo(workdir: Path) -> tuple[MergeSummary, str]:
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    base = make_base(workdir / "base", layers=4, hidden=64, vocab=128, seed=0)
    ft1 = make_finetune(base, workdir / "finetune-1", seed=1)
    ft2 = make_finetune(base, workdir / "finetune-2", seed=2, shards=2)
    write_demo_task(workdir / "demo-task.jsonl")
    recipe = RECIPE.format(base=base, ft1=ft1, ft2=ft2)
    (workdir / "recipe.yml").write_text(recipe)
    config = parse_config(yaml.safe_load(recipe), str(workdir / "recipe.yml"))
    summary = run_merge(config, recipe, workdir / "merged", MergeOptions(overwrite=True))
    return summary, generate(workdir / "merged")


def write_demo_task(path: Path) -> None:
    """A small multiple-choice task in mergesmith eval's JSONL format, to compare the merge with its inputs."""
    import json

    rows = [
        {"prompt": "one two", "choices": ["three", "cat", "blue"], "label": 0},
        {"prompt": "red green", "choices": ["dog", "blue", "yes"], "label": 1},
        {"prompt": "hello", "choices": ["world", "four", "no"], "label": 0},
        {"prompt": "the cat and the", "choices": ["red", "five", "dog"], "label": 2},
        {"prompt": "yes or", "choices": ["no", "model", "layer"], "label": 0},
        {"prompt": "merge the", "choices": ["bad", "weights", "green"], "label": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generate(model_dir: Path, prompt: str = "hello world the model") -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
