"""Score models on the user's own tasks and on lm-eval-harness tasks.

The API recipe search calls, for a model already in memory::

    tasks = load_tasks(["qa.jsonl", "mc.jsonl", "my_lm_eval_task.yaml"])   # validated, no model loaded
    scores = score_model(model, tokenizer, tasks, batch_size=16)         # {task: {metric: score, ...}}

Custom objectives implement the `Task` protocol (`name`, `metrics`, `evaluate(model, tokenizer, ...)`).
"""

from mergesmith.eval.models import load_model
from mergesmith.eval.runner import EvalReport, ModelReport, evaluate_models, primary_metric, score_model
from mergesmith.eval.tasks import AnswerExample, ChoiceExample, JsonlTask, Task, load_jsonl_task, load_tasks

__all__ = [
    "AnswerExample",
    "ChoiceExample",
    "EvalReport",
    "JsonlTask",
    "ModelReport",
    "Task",
    "evaluate_models",
    "load_jsonl_task",
    "load_model",
    "load_tasks",
    "primary_metric",
    "score_model",
]
