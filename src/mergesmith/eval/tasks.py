"""Evaluation tasks: our JSONL format, validated line by line before any model is loaded.

A task is anything with a `name`, the `metrics` it reports and an `evaluate(model, tokenizer, ...)`
that returns `{metric: score, metric + "_stderr": stderr, "n": count}`. JSONL tasks and lm-eval
tasks are two implementations; recipe search plugs in its own (a KL objective) the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mergesmith.errors import MergeError
from mergesmith.eval.examples import AnswerExample, ChoiceExample


@runtime_checkable
class Task(Protocol):
    name: str
    metrics: tuple[str, ...]

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None
    ) -> dict[str, float]:
        """Score `model` (already loaded, in eval mode) and return metrics, their stderrs and `n`."""
        ...


def _string(row: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    if key not in row:
        if optional:
            return None
        raise MergeError(f"missing field '{key}'", where)
    value = row[key]
    if not isinstance(value, str):
        raise MergeError(f"field '{key}' must be a string, got {type(value).__name__}", where)
    return value


def parse_row(row: Any, where: str) -> AnswerExample | ChoiceExample:
    """One JSONL row -> an example; `where` is `file:line` and every error names the field."""
    if not isinstance(row, dict):
        raise MergeError(f"each line must be a JSON object, got {type(row).__name__}", where)
    known = {"prompt", "answer", "stop", "choices", "label", "id"}
    unknown = sorted(set(row) - known)
    if unknown:
        raise MergeError(f"unknown field '{unknown[0]}' (expected {', '.join(sorted(known))})", where)
    prompt = _string(row, "prompt", where)
    ident = row.get("id")
    if ident is not None and not isinstance(ident, str | int):
        raise MergeError("field 'id' must be a string or an integer", where)
    ident = None if ident is None else str(ident)
    if "answer" in row and "choices" in row:
        raise MergeError("a row has either 'answer' (exact match) or 'choices' + 'label', not both", where)
    if "answer" in row:
        answer = _string(row, "answer", where)
        stop = row.get("stop", [])
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise MergeError("field 'stop' must be a list of non-empty strings", where)
        return AnswerExample(prompt, answer, tuple(stop), ident)  # type: ignore[arg-type]
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MergeError("field 'choices' must be a list of at least two non-empty strings", where)
        if "label" not in row:
            raise MergeError("missing field 'label' (index of the correct choice)", where)
        label = row["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            raise MergeError(f"field 'label' must be an integer, got {label!r}", where)
        if not 0 <= label < len(choices):
            raise MergeError(f"field 'label' is {label}, out of range for {len(choices)} choices", where)
        return ChoiceExample(prompt, tuple(choices), label, ident)  # type: ignore[arg-type]
    if "stop" in row or "label" in row:
        raise MergeError("missing field 'answer' or 'choices'", where)
    raise MergeError("missing field 'answer' (exact match) or 'choices' + 'label' (multiple choice)", where)


def read_jsonl(path: Path) -> list[AnswerExample] | list[ChoiceExample]:
    """All examples of a JSONL task file, of one kind; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError("task file not found", str(path)) from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise MergeError(f"cannot read the task file ({type(err).__name__})", str(path)) from None
    examples: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MergeError(f"not valid JSON ({err.msg} at column {err.colno})", where) from None
        example = parse_row(row, where)
        if examples and type(example) is not type(examples[0]):
            kinds = {AnswerExample: "'answer'", ChoiceExample: "'choices'"}
            raise MergeError(
                f"this row uses {kinds[type(example)]} but earlier rows use {kinds[type(examples[0])]};"
                " one kind per file",
                where,
            )
        examples.append(example)
    if not examples:
        raise MergeError("the task file has no examples", str(path))
    return examples


@dataclass
class JsonlTask:
    """A task in our JSONL format: exact match of greedy continuations, or multiple choice by log-likelihood."""

    name: str
    path: Path
    examples: list[AnswerExample] | list[ChoiceExample]
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return "exact_match" if isinstance(self.examples[0], AnswerExample) else "multiple_choice"

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("exact_match",) if self.kind == "exact_match" else ("acc", "acc_norm")

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None
    ) -> dict[str, float]:
        from mergesmith.eval import scoring  # (imports torch: only when a model is scored)

        examples = self.examples[:limit] if limit is not None else self.examples
        if self.kind == "exact_match":
            hits = scoring.exact_match(model, tokenizer, examples, batch_size=batch_size)  # type: ignore[arg-type]
            return scoring.summarise({"exact_match": hits})
        accs = scoring.choice_accuracy(model, tokenizer, examples, batch_size=batch_size)  # type: ignore[arg-type]
        return scoring.summarise(accs)


def load_jsonl_task(path: str | Path) -> JsonlTask:
    path = Path(path)
    return JsonlTask(path.stem, path, read_jsonl(path))


def load_tasks(specs: list[str]) -> list[Task]:
    """Validate every task spec (files, lines, lm-eval names) before any model is loaded.

    A spec ending in `.jsonl` is our format; anything else is an lm-eval task: a registered name,
    or the path of a task YAML.
    """
    if not specs:
        raise MergeError("give at least one --task", "--task")
    tasks: list[Task] = []
    lm_specs = [s for s in specs if not s.endswith(".jsonl")]
    if lm_specs:
        from mergesmith.eval.lmeval import load_lm_eval_tasks

        lm_tasks = iter(load_lm_eval_tasks(lm_specs))
    for spec in specs:
        tasks.append(load_jsonl_task(spec) if spec.endswith(".jsonl") else next(lm_tasks))
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise MergeError(f"two tasks are named '{name}'; rename one of the files", "--task")
    return tasks
