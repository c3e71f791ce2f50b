"""Quality benchmark: which merge keeps four fine-tunes' skills, on held-out prompts.

    PYTHONPATH=src:benchmarks/quality python benchmarks/quality/run.py [--root DIR] [--regime shared|distinct]
        [--evals 60] [--only ties,regmean,search]

Builds everything here, on the CPU, in a few minutes: a tiny Llama pretrained (`shared`: on the
skills' prompt format with random answers, so it learns the format, not the skills; `distinct`:
on six general operations in a general format, so it is competent), four full fine-tunes of it,
each on one skill (skills.py) until it is ~100% on that skill's prompts, then every method with
its default parameters and tuned on the validation prompts (a small grid), regmean and fisher
with each fine-tune's own training prompts as calibration data, and two `mergesmith search`
runs, all scored on the test prompts. Prints a markdown table: token accuracy per skill, the
mean and its standard error (binomial per skill, combined). docs/quality.md has both regimes' tables.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from skills import GENERAL_OPS, REGIMES, SKILLS, Regime, answer_loss, batch, general_batch, token_accuracy

N_TEST = 512


def train(
    model: Any,
    sample: Any,
    ops: tuple[str, ...],
    steps: int,
    seed: int,
    lr: float,
    random_answers: bool = False,
    schedule: bool = False,
) -> None:
    """`steps` AdamW steps of 64 `sample(op, n, split, gen)` sequences each, the ops in turn; with
    `schedule`, 100 warm-up steps then a linear decay to 0 (a constant 2e-3 stalls on `reverse`
    and `swap` in the distinct regime's longer pretraining)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # made only when used: a LambdaLR sets the learning rate to its step-0 value when it is made
    decay = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100) * max(0.0, 1 - s / steps))
        if schedule
        else None
    )
    model.train()
    for step in range(steps):
        ids, start = sample(ops[step % len(ops)], 64, "train", gen)
        if random_answers:  # the format without the skill: answers are random symbols
            ids[:, start:] = ids[torch.randperm(len(ids), generator=gen), 1 : 1 + ids.shape[1] - start]
        loss = answer_loss(model, ids, start)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
    model.eval()


def build_models(root: Path, regime: Regime) -> dict[str, Path]:
    """The base (pretrained: on the skills' format with random answers in `shared`, on the general
    mixture with real answers in `distinct`) and one full fine-tune of it per skill."""
    from transformers import AutoModelForCausalLM

    from mergesmith.toymodels import make_base

    out = {"base": root / "base", **{s: root / f"ft-{s}" for s in SKILLS}}
    if all((p / "config.json").exists() for p in out.values()):
        return out
    make_base(root / "init", layers=4, hidden=64, vocab=regime.vocab, seed=0)
    model = AutoModelForCausalLM.from_pretrained(root / "init", dtype=torch.float32)
    if regime.general:
        sample = lambda op, n, split, gen: general_batch(op, n, split, gen, regime)  # noqa: E731
        train(
            model, sample, GENERAL_OPS, regime.pretrain_steps, seed=0, lr=regime.pretrain_lr, schedule=regime.schedule
        )
    else:
        sample = lambda op, n, split, gen: batch(op, n, split, gen, regime)  # noqa: E731
        train(model, sample, SKILLS, regime.pretrain_steps, seed=0, lr=regime.pretrain_lr, random_answers=True)
    model.save_pretrained(out["base"])
    _copy_tokenizer(root / "init", out["base"])
    for i, skill in enumerate(SKILLS):
        ft = AutoModelForCausalLM.from_pretrained(out["base"], dtype=torch.float32)
        sample = lambda op, n, split, gen: batch(op, n, split, gen, regime)  # noqa: E731
        train(ft, sample, (skill,), regime.finetune_steps, seed=1 + i, lr=regime.finetune_lr, schedule=regime.schedule)
        ft.save_pretrained(out[skill])
        _copy_tokenizer(root / "init", out[skill])
    return out


def describe(models: dict[str, Path], regime: Regime) -> None:
    """What the regime's models are, to stderr: the base's accuracy on the pretraining mixture (the
    distinct regime's base is meant to be competent) and each task vector's size relative to the
    base's weights (the distinct regime's fine-tunes are meant to be small changes)."""
    from transformers import AutoModelForCausalLM

    from mergesmith.toymodels import load_state_dict

    if regime.general:
        base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(5)
        acc = {op: token_accuracy(base, *general_batch(op, 256, "test", gen, regime)) for op in GENERAL_OPS}
        print(
            "base on the general mixture (test prompts): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()),
            file=sys.stderr,
        )
    b = load_state_dict(models["base"])
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in b.values()))
    for s in SKILLS:
        ft = load_state_dict(models[s])
        tv = math.sqrt(sum(float((ft[k].double() - b[k].double()).square().sum()) for k in b))
        print(f"task vector {s}: |tau| / |base| = {tv / norm:.3f}", file=sys.stderr)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for f in src.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copyfile(f, dst / f.name)


def recipe(method: str, models: dict[str, Path], params: dict[str, Any], weights: bool, post: Any = None) -> dict:
    entries = [{"model": str(models[s])} for s in SKILLS]
    if weights:  # equal weights: the tuning is in the global parameters
        for e in entries:
            e["parameters"] = {"weight": 1.0}
    r: dict[str, Any] = {"merge_method": method, "models": entries, "dtype": "float32"}
    if method != "linear":
        r["base_model"] = str(models["base"])
    if params:
        r["parameters"] = params
    if post:
        r["post"] = post
    return r


# method -> (default parameters, grid for tuning, takes per-model weights)
GRID: dict[str, tuple[dict[str, Any], dict[str, list[Any]], bool]] = {
    "linear": ({}, {}, True),
    "task_arithmetic": ({"lambda": 1.0}, {"lambda": [0.3, 0.5, 0.7, 0.9, 1.1]}, True),
    "ties": ({"density": 0.5}, {"density": [0.2, 0.5, 0.8], "lambda": [0.6, 1.0, 1.4]}, True),
    "dare_ties": ({"density": 0.5}, {"density": [0.3, 0.5, 0.8], "lambda": [0.5, 0.8, 1.1]}, True),
    "breadcrumbs_ties": ({"density": 0.9, "gamma": 0.01}, {"density": [0.5, 0.9], "lambda": [0.5, 0.8, 1.1]}, True),
    "della": ({"density": 0.5, "epsilon": 0.1}, {"density": [0.3, 0.5, 0.7], "lambda": [0.5, 0.8, 1.1]}, True),
    "model_stock": ({}, {}, False),
    "tsv": ({}, {"lambda": [0.5, 0.75, 1.0, 1.25, 1.5]}, False),
    "iso_c": ({}, {"lambda": [0.5, 0.75, 1.0, 1.25, 1.5]}, False),
    "iso_cts": ({}, {"common_fraction": [0.5, 0.8], "lambda": [0.75, 1.0, 1.25, 1.5]}, False),
}
MERGEKIT = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "model_stock")
# LiNeS on top of the tuned recipe: scales alpha .. alpha + beta times its lambda, above or below 1
LINES_GRID = [[{"lines": {"alpha": a, "beta": b}}] for a in (0.4, 0.7, 1.0) for b in (0.3, 0.6, 1.0)]


class Scorer:
    def __init__(self, models: dict[str, Path], regime: Regime) -> None:
        from mergesmith.search.inmemory import InMemoryMerger

        self.merger = InMemoryMerger(recipe("task_arithmetic", models, {}, True), [])
        gen = torch.Generator().manual_seed(123)
        self.sets = {
            split: {s: batch(s, N_TEST if split == "test" else 256, split, gen, regime) for s in SKILLS}
            for split in ("val", "test")
        }

    def scores(self, r: dict[str, Any], split: str) -> dict[str, float]:
        self.merger.load_weights(r)
        return {s: token_accuracy(self.merger.model, ids, start) for s, (ids, start) in self.sets[split].items()}


def mean_se(scores: dict[str, float], n: int) -> tuple[float, float]:
    k = len(scores)
    mean = sum(scores.values()) / k
    se = math.sqrt(sum(p * (1 - p) / n for p in scores.values())) / k
    return mean, se


def tune(scorer: Scorer, method: str, models: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    default, grid, weights = GRID[method]
    best = (-1.0, default, None)
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        params = {**default, **dict(zip(keys, values, strict=True))}
        val = scorer.scores(recipe(method, models, dict(params), weights), "val")
        m = sum(val.values()) / len(val)
        if m > best[0]:
            best = (m, params, None)
    return default, best[1], None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/mergesmith-quality")
    ap.add_argument("--regime", choices=sorted(REGIMES), default="shared", help="docs/quality.md: the two regimes")
    ap.add_argument("--evals", type=int, default=60, help="search budget (0: no search)")
    ap.add_argument("--only", default="", help="comma list of methods to run (default: all, regmean and fisher too)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.set_num_threads(1)
    regime = REGIMES[args.regime]
    root = Path(args.root) / regime.name
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = build_models(root, regime)
    describe(models, regime)
    scorer = Scorer(models, regime)
    rows: list[tuple[str, str, dict[str, float]]] = []

    def add(name: str, r: dict[str, Any], how: str) -> None:
        rows.append((name, how, scorer.scores(r, "test")))

    for key in ("base", *SKILLS):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(models[key], dtype=torch.float32).eval()
        rows.append(
            (f"input: {key}", "", {s: token_accuracy(m, ids, st) for s, (ids, st) in scorer.sets["test"].items()})
        )
    print(f"models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    try:  # a table of what ran, even if a later row fails
        for method in GRID:
            if only and method not in only:
                continue
            default, tuned, _ = tune(scorer, method, models)
            weights = GRID[method][2]
            add(method, recipe(method, models, dict(default), weights), f"default {default or ''}".strip())
            if GRID[method][1]:
                add(method, recipe(method, models, dict(tuned), weights), f"tuned {tuned}")
            if method in ("task_arithmetic", "tsv", "iso_c", "iso_cts"):  # LiNeS on top of the tuned recipe
                best = (-1.0, None)
                for post in LINES_GRID:
                    val = scorer.scores(recipe(method, models, dict(tuned), weights, post), "val")
                    if sum(val.values()) > best[0]:
                        best = (sum(val.values()), post)
                add(
                    f"{method} + LiNeS",
                    recipe(method, models, dict(tuned), weights, best[1]),
                    f"tuned {tuned} {best[1]}",
                )
            print(f"{method} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for method in DATA_AWARE:
            if not only or method in only:
                rows.extend(data_aware(method, models, root, scorer, regime))
                print(f"{method} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.evals:
            for name in SEARCHES:
                if not only or "search" in only:
                    rows.append(search(name, models, root, args.evals, scorer, regime))
                    print(f"{name} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        print(table(rows))
        print(f"\ntotal {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads\n", file=sys.stderr)


# method -> (default parameters, grid for tuning): merged to files (their statistics come from the
# fine-tunes' own training prompts, `calibration:`), loaded and scored like the others
DATA_AWARE: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "regmean": ({"alpha": 0.9}, {"alpha": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]}),
    "fisher": ({}, {"floor": [1e-8, 1e-6, 1e-4]}),
}


def data_aware(
    method: str, models: dict[str, Path], root: Path, scorer: Scorer, regime: Regime
) -> list[tuple[str, str, dict]]:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.merge import MergeOptions, run_merge
    from mergesmith.recipe.schema import parse_config

    tok = AutoTokenizer.from_pretrained(models["base"])
    gen = torch.Generator().manual_seed(7)
    data = {}
    for s in SKILLS:  # 128 training prompts of each fine-tune's own skill, as text
        ids, _ = batch(s, 128, "train", gen, regime)
        path = root / f"calibration-{s}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": " ".join(tok.convert_ids_to_tokens(r))}) + "\n" for r in ids.tolist())
        )
        data[str(models[s])] = str(path)

    def merged(params: dict[str, Any], split: str) -> dict[str, float]:
        r = recipe(method, models, params, True)
        r["calibration"] = {"data": data, "samples": 128, "max_length": 64, "cache": str(root / "stats")}
        out = root / f"merged-{method}"
        run_merge(parse_config(r), "", out, MergeOptions(overwrite=True, write_model_card=False))
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return {s: token_accuracy(m, ids, st) for s, (ids, st) in scorer.sets[split].items()}

    default, grid = DATA_AWARE[method]
    best = (-1.0, default)
    for values in itertools.product(*grid.values()):
        params = {**default, **dict(zip(grid, values, strict=True))}
        val = merged(params, "val")
        if sum(val.values()) > best[0]:
            best = (sum(val.values()), params)
    return [
        (method, f"default {default or ''}".strip(), merged(dict(default), "test")),
        (method, f"tuned {best[1]}", merged(dict(best[1]), "test")),
    ]


# the searches: name -> (genome keys beyond models/base/dtype, evaluations per --evals)
SEARCHES: dict[str, tuple[dict[str, Any], int]] = {
    # the issue's search: per-model weights, lambda and LiNeS' alpha and beta (7 genes)
    "search task_arithmetic + LiNeS": (
        {"merge_method": "task_arithmetic", "search_lambda": True, "search_lines": True},
        1,
    ),
    # per layer group (2 groups of 2 layers) and model, ties' weight and density, and lambda (17 genes):
    # the best mergekit method with more freedom than one grid can give it
    "search ties per layer group": ({"merge_method": "ties", "layer_granularity": 2, "search_lambda": True}, 2),
}


def search(
    name: str, models: dict[str, Path], root: Path, evals: int, scorer: Scorer, regime: Regime
) -> tuple[str, str, dict[str, float]]:
    """CMA-ES over `SEARCHES[name]`'s genome, on the validation prompts; the best recipe scored on the test prompts."""
    import json
    import shutil

    from mergesmith.search.genome import SearchDefinition
    from mergesmith.search.runner import SearchOptions, run_search

    genome, factor = SEARCHES[name]
    spec = {
        "genome": {
            "models": [str(models[s]) for s in SKILLS],
            "base_model": str(models["base"]),
            "dtype": "float32",
            **genome,
        },
        "tasks": [{"python": "skills:skill_task", "args": {"skill": s, "regime": regime.name}} for s in SKILLS],
    }
    store = root / "search"
    shutil.rmtree(store, ignore_errors=True)
    budget = evals * factor
    result = run_search(SearchDefinition.model_validate(spec), store, SearchOptions(max_evals=budget, seed=0))
    assert result.best is not None
    best = result.best["recipe"]
    if "models" in best:
        per_model: Any = [m["parameters"] for m in best["models"]]
    else:  # per layer group: one slice per group
        per_model = {
            "layers {}-{}".format(*sl["sources"][0]["layer_range"]): [
                x["parameters"] for x in sl["sources"] if "parameters" in x
            ]
            for sl in best["slices"]
        }
    how = f"search ({budget} evals): per model {json.dumps(per_model)}, {best.get('parameters')}, {best.get('post')}"
    return name, how, scorer.scores(best, "test")


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    head = "| method | recipe | " + " | ".join(SKILLS) + " | mean ± se |"
    lines = [head, "|" + "---|" * (len(SKILLS) + 3)]
    for name, how, scores in rows:
        mean, se = mean_se(scores, N_TEST)
        cells = " | ".join(f"{100 * scores[s]:.1f}" for s in SKILLS)
        mergekit = name.split()[0] in MERGEKIT and "LiNeS" not in name
        tag = "" if name.startswith("input") else (" (mergekit)" if mergekit else " (new)")
        lines.append(f"| {name}{tag} | {how} | {cells} | {100 * mean:.1f} ± {100 * se:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
