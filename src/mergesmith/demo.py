"""`mergesmith demo`: two tiny fine-tunes that each learn one skill, merged into one that keeps both.

Everything is made locally (no hub), so it proves an installation works end to end, and shows a
merge doing its job: a base Llama (random weights) is fine-tuned twice for a few seconds on the CPU,
once to count ("one two" -> "three") and once on colour and word pairs ("red green" -> "blue",
"cat" -> "dog"). Each fine-tune answers its own skill's questions and not the other's; the TIES merge
of the two answers both. `scripts/quickstart.sh` prints that table with `mergesmith eval`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mergesmith.merge import MergeOptions, MergeSummary, run_merge
from mergesmith.recipe.schema import parse_config
from mergesmith.toymodels import make_base, make_trained_finetune

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {ft2}
    parameters:
      weight: 1.0
      density: 0.5
parameters:
  normalize: false         # add both task vectors whole: each skill keeps its strength
dtype: bfloat16
"""

# The two skills: word chains each fine-tune learns to continue (every suffix is a training text).
SKILLS = {
    "count": ["one two three four five"],
    "colors": ["red green blue", "cat dog", "yes no", "hello world"],
}
DISTRACTORS = ("cat", "blue", "four", "no", "model", "layer", "green", "two", "world", "dog", "five", "red")


def skill_texts(skill: str) -> list[str]:
    out = []
    for chain in SKILLS[skill]:
        words = chain.split()
        out += [" ".join(words[i:]) for i in range(len(words) - 1)]
    return out


def run_demo(workdir: Path) -> tuple[MergeSummary, str]:
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    base = make_base(workdir / "base", layers=4, hidden=64, vocab=128, seed=0)
    ft1 = make_trained_finetune(base, workdir / "finetune-count", skill_texts("count"))
    ft2 = make_trained_finetune(base, workdir / "finetune-colors", skill_texts("colors"), shards=2)
    for skill in SKILLS:
        write_skill_task(skill, workdir / f"demo-{skill}.jsonl")
    recipe = RECIPE.format(base=base, ft1=ft1, ft2=ft2)
    (workdir / "recipe.yml").write_text(recipe)
    config = parse_config(yaml.safe_load(recipe), str(workdir / "recipe.yml"))
    summary = run_merge(config, recipe, workdir / "merged", MergeOptions(overwrite=True))
    return summary, generate(workdir / "merged")


def write_skill_task(skill: str, path: Path) -> None:
    """Multiple-choice questions on one skill (`mergesmith eval`'s JSONL): the next word of each
    prefix of the skill's texts, against two distractors (words of the other skill among them)."""
    rnd = random.Random(0)
    rows = []
    for text in skill_texts(skill):
        words = text.split()
        for i in range(1, len(words)):
            prompt, answer = " ".join(words[:i]), words[i]
            if any(r["prompt"] == prompt for r in rows):
                continue
            choices = [answer, *rnd.sample([d for d in DISTRACTORS if d != answer], 2)]
            rnd.shuffle(choices)
            rows.append({"prompt": prompt, "choices": choices, "label": choices.index(answer)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generate(model_dir: Path, prompt: str = "one two") -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
