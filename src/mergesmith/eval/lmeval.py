"""lm-eval-harness tasks, run through its Python API with its Hugging Face backend on a loaded model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.extras import require

BOOTSTRAP_ITERS = 1000  # mean metrics get closed-form stderrs; others (bleu, f1) a short bootstrap


def _import_lm_eval() -> Any:
    lm_eval = require("lm_eval", "an lm-eval task", "--task")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval


def is_yaml_spec(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


@dataclass
class LmEvalTask:
    """One lm-eval task (built once: its dataset is read before any model loads), evaluated per model."""

    name: str
    spec: str
    task: Any
    manager: Any
    metrics: tuple[str, ...] = field(default=())

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None
    ) -> dict[str, float]:
        lm_eval = _import_lm_eval()
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[self.task],
                task_manager=self.manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=BOOTSTRAP_ITERS,
            )
        except Exception as err:  # lm-eval raises many kinds; the user needs the one line
            raise MergeError(f"lm-eval failed: {type(err).__name__}: {err}", self.spec) from None
        results = res["results"]
        key = self.name if self.name in results else next(iter(results))
        out: dict[str, float] = {}
        for metric, value in results[key].items():
            if "," not in metric or not isinstance(value, int | float):
                continue
            name, _, filt = metric.partition(",")
            label = name if filt == "none" else f"{name},{filt}"
            out[label] = float(value)
        samples = res.get("n-samples", {}).get(key, {})
        out["n"] = samples.get("effective", samples.get("original", 0))
        self.metrics = tuple(m for m in out if m != "n" and not m.endswith("_stderr"))
        return out


def registered_names() -> list[str]:
    """Every registered lm-eval task, group and tag name; cached per lm-eval version (indexing takes ~15 s)."""
    import json
    import os

    lm_eval = _import_lm_eval()
    version = getattr(lm_eval, "__version__", "unknown")
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergesmith"
    cache = cache_root / f"lm-eval-{version}-tasks.json"
    try:
        return list(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    names = list(TaskManager().all_tasks)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(names), encoding="utf-8")
    except OSError:
        pass
    return names


def _manager(specs: list[str]) -> Any:
    from lm_eval.tasks import TaskManager

    # indexing every registered task takes ~15 s; task YAMLs alone need none of it
    return TaskManager(include_defaults=not all(is_yaml_spec(s) for s in specs))


def load_lm_eval_tasks(specs: list[str]) -> list[LmEvalTask]:
    """Resolve each spec (registered name or task YAML path) and read its data, or fail naming it."""
    _import_lm_eval()
    for spec in specs:
        if is_yaml_spec(spec) and not Path(spec).is_file():
            raise MergeError("task YAML not found", spec)
    names = set(registered_names()) if not all(is_yaml_spec(s) for s in specs) else set()
    for spec in specs:
        if not is_yaml_spec(spec) and spec not in names:
            if Path(spec).suffix:
                raise MergeError("not a task file: use .jsonl (our format) or .yaml (an lm-eval task)", spec)
            raise MergeError(
                f"unknown task: not a .jsonl file and not a registered lm-eval task{did_you_mean(spec, names)}",
                spec,
            )
    manager = _manager(specs)
    out = []
    for spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise MergeError(f"lm-eval could not load this task ({type(err).__name__}: {first})", spec) from None
        tasks = loaded["tasks"]
        if not tasks:
            raise MergeError("lm-eval found no task in this spec", spec)
        if len(tasks) > 1:
            raise MergeError(
                f"this is an lm-eval group of {len(tasks)} tasks; give its tasks one by one (e.g. {next(iter(tasks))})",
                spec,
            )
        name, task = next(iter(tasks.items()))
        out.append(LmEvalTask(name=name, spec=spec, task=task, manager=manager))
    return out
