"""Score models on tasks: one model in memory (the API recipe search calls), or a list of references."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.eval.tasks import Task

log = logging.getLogger("mergesmith")
RECIPE_FILE = "mergesmith_config.yml"


def score_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    seed: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task name: {metric: score, metric_stderr: stderr, "n": count}} for a model already in memory."""
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return {t.name: t.evaluate(model, tokenizer, batch_size=batch_size, limit=limit) for t in tasks}
    finally:
        if was_training:
            model.train()


def primary_metric(task: Task, scores: dict[str, float]) -> str:
    """The metric a task is ranked by: its first declared metric present in the scores."""
    for metric in task.metrics:
        if metric in scores:
            return metric
    return next(m for m in scores if m != "n" and not m.endswith("_stderr"))


@dataclass
class ModelReport:
    model: str
    results: dict[str, dict[str, float]]
    load_seconds: float
    score_seconds: float
    inputs: list[str] = field(default_factory=list)  # the merge's inputs, when the directory has our recipe
    input_of: list[str] = field(default_factory=list)  # merges this model was scored for as an input

    @property
    def examples(self) -> int:
        return int(sum(r.get("n", 0) for r in self.results.values()))

    @property
    def examples_per_second(self) -> float:
        return self.examples / max(self.score_seconds, 1e-9)


@dataclass
class EvalReport:
    tasks: list[Task]
    models: dict[str, ModelReport]

    def primary(self, model: str, task: Task) -> tuple[str, float, float]:
        scores = self.models[model].results[task.name]
        metric = primary_metric(task, scores)
        return metric, scores[metric], scores.get(f"{metric}_stderr", float("nan"))

    def mean(self, model: str) -> float:
        return sum(self.primary(model, t)[1] for t in self.tasks) / len(self.tasks)

    def best_input(self, model: str) -> tuple[str, float] | None:
        """(best scored input of the merge, its mean) or None when the model has no scored inputs."""
        scored = [m for m in self.models[model].inputs if m in self.models]
        if not scored:
            return None
        best = max(scored, key=self.mean)
        return best, self.mean(best)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": {m: r.results for m, r in self.models.items()}, "summary": {}}
        for m, r in self.models.items():
            entry: dict[str, Any] = {"mean": self.mean(m), "examples_per_second": r.examples_per_second}
            best = self.best_input(m)
            if best is not None:
                entry.update(best_input=best[0], delta_to_best_input=self.mean(m) - best[1])
            if r.input_of:
                entry["input_of"] = r.input_of
            out["summary"][m] = entry
        return out


def recipe_inputs(reference: str) -> list[str]:
    """The models our recipe next to a local merged model names (base first), or [] without one."""
    path = Path(reference) / RECIPE_FILE
    if not path.is_file():
        return []
    from mergesmith.plan import referenced_models
    from mergesmith.recipe.schema import load_config

    try:
        config, _ = load_config(path)
    except MergeError as err:
        log.warning("cannot read the merge recipe %s (%s); not comparing with its inputs", path, err)
        return []
    return [str(ref) for ref in referenced_models(config)]


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def evaluate_models(
    references: Sequence[str],
    tasks: Sequence[Task],
    *,
    load: Callable[[str], tuple[Any, Any]],
    batch_size: int = 8,
    limit: int | None = None,
    seed: int | None = None,
    compare_inputs: bool = True,
    on_model: Callable[[ModelReport], None] | None = None,
) -> EvalReport:
    """Load each model once and score it; then score the inputs of merges that carry our recipe."""
    report = EvalReport(list(tasks), {})

    def run(reference: str) -> ModelReport | None:
        start = time.perf_counter()
        model, tokenizer = load(reference)
        loaded = time.perf_counter()
        results = score_model(model, tokenizer, tasks, batch_size=batch_size, limit=limit, seed=seed)
        done = time.perf_counter()
        del model
        entry = ModelReport(reference, results, loaded - start, done - loaded)
        report.models[reference] = entry
        if on_model is not None:
            on_model(entry)
        return entry

    for reference in references:
        if reference not in report.models:
            run(reference)
    if not compare_inputs:
        return report
    for reference in list(references):
        entry = report.models[reference]
        for source in recipe_inputs(reference):
            known = next((m for m in report.models if _same_model(m, source)), None)
            if known is None:
                try:
                    run(source)
                except MergeError as err:
                    log.warning("input %s of %s is not reachable (%s); not compared", source, reference, err)
                    continue
                known = source
            if known != reference:
                entry.inputs.append(known)
                report.models[known].input_of.append(reference)
    return report
