"""Objectives: anything with a name that scores a resident model.

A `Task` returns a dict of metrics for a loaded `transformers` model and its tokenizer. Genome
tasks come in three forms:

- `python: "module:factory"` (with optional `args:`): `factory(**args)` returns a Task. This is how
  custom evaluators plug in (a KL divergence to a teacher, a reward model, a unit-test pass rate).
- `path: tasks.jsonl` or an lm-eval YAML, or `name: some_task`: scored by `mergesmith eval`'s
  in-memory API (imported lazily, so the search itself does not need it).

The search maximises an aggregate of the weighted task scores (`fitness:`, search/fitness.py), or
keeps the Pareto front over them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mergesmith.errors import MergeError
from mergesmith.search.genome import SearchDefinition, TaskDefinition


@runtime_checkable
class Task(Protocol):
    name: str

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]: ...


@dataclass
class WeightedTask:
    task: Task
    weight: float
    metric: str | None
    where: str

    @property
    def label(self) -> str:
        return self.task.name + (f"/{self.metric}" if self.metric else "")

    def score(self, model: Any, tokenizer: Any) -> float:
        metrics = self.task.evaluate(model, tokenizer)
        metric = self.metric
        if metric is not None and metric not in metrics and metric.split(",")[0] in metrics:
            metric = metric.split(",")[0]  # lm-eval's "acc,none" is our "acc"
        if metric is None and hasattr(self.task, "primary_metric"):
            metric = self.task.primary_metric(metrics)
        if metric is None:
            if len(metrics) != 1:
                raise MergeError(
                    f"task '{self.task.name}' returns several metrics ({', '.join(metrics)}); say which with 'metric:'",
                    self.where,
                )
            return float(next(iter(metrics.values())))
        if metric not in metrics:
            raise MergeError(
                f"task '{self.task.name}' has no metric '{metric}' (it returns {', '.join(metrics)})", self.where
            )
        return float(metrics[metric])


def load_python_task(spec: str, args: dict[str, Any] | None, where: str) -> Task:
    """`module:factory` -> factory(**args)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MergeError(f"expected 'module:factory', got '{spec}'", where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MergeError(f"cannot import '{module_name}': {err}", where) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise MergeError(f"module '{module_name}' has no '{attr}'", where)
    task = factory(**(args or {}))
    if not isinstance(task, Task):
        raise MergeError(
            f"'{spec}' did not return a task (an object with 'name' and 'evaluate(model, tokenizer)')", where
        )
    return task


class EvalTask:
    """Adapter to `mergesmith eval` (imported lazily): one TASK as `mergesmith eval` accepts it.

    Uses eval's in-memory API: `load_tasks([spec])` validates and loads the task once (no model
    loaded), `task.evaluate(model, tokenizer, limit=...)` scores the resident model. The genome's
    `limit` is applied there, per evaluation, as `mergesmith eval --limit` applies it: the first
    `limit` examples of a JSONL file, lm-eval's own `limit` for an lm-eval task.
    """

    def __init__(self, spec: str, limit: int | None = None, where: str = "tasks") -> None:
        try:
            from mergesmith import eval as mse  # the `mergesmith eval` package
        except ImportError:
            raise MergeError(
                "scoring eval tasks needs the `mergesmith eval` package, which this build lacks; use a `python:` task",
                where,
            ) from None
        (self.task,) = mse.load_tasks([spec])
        self.name = self.task.name
        self.limit = limit

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        scores = self.task.evaluate(model, tokenizer, limit=self.limit)
        return {k: float(v) for k, v in scores.items() if k != "n" and not k.endswith("_stderr")}

    def primary_metric(self, scores: dict[str, float]) -> str:
        from mergesmith.eval import primary_metric

        return primary_metric(self.task, scores)


def check_task_definition(t: TaskDefinition, where: str) -> None:
    given = [k for k in ("name", "path", "python") if getattr(t, k) is not None]
    if len(given) != 1:
        raise MergeError("a task needs exactly one of 'name', 'path' or 'python'", where)
    if t.path is not None and not Path(t.path).expanduser().is_file():
        raise MergeError("task file not found", f"{where}.path ({t.path})")


def load_tasks(definition: SearchDefinition) -> list[WeightedTask]:
    """Build every task of the genome file (imports python tasks, checks files); raises MergeError."""
    for i, t in enumerate(definition.tasks):
        check_task_definition(t, f"tasks[{i}]")
    out = []
    for i, t in enumerate(definition.tasks):
        where = f"tasks[{i}]"
        if t.python is not None:
            task: Task = load_python_task(t.python, t.args, where)
            metric = t.metric
        else:
            task = EvalTask(str(t.path or t.name), definition.limit, where)
            metric = t.metric
        out.append(WeightedTask(task, t.weight, metric, where))
    return out


def parse_task_arg(text: str, where: str = "--holdout") -> WeightedTask:
    """A command-line TASK: `python:module:factory`, a task file, or a task name."""
    if text.startswith("python:"):
        return WeightedTask(load_python_task(text.removeprefix("python:"), None, where), 1.0, None, where)
    if ("/" in text or text.endswith((".jsonl", ".yaml", ".yml"))) and not Path(text).expanduser().is_file():
        raise MergeError("task file not found", f"{where} ({text})")
    return WeightedTask(EvalTask(text, None, where), 1.0, None, where)
