"""The search loop: ask a population, score what is new, tell the scores back in order, save.

The loop is the same for a fresh search and a resumed one: candidate `i` is always the `i`-th
genotype the seeded optimiser asks for, given the scores of the earlier generations. Candidates
already in history.jsonl take their stored scores (they are not scored twice), so `--resume`
rebuilds the optimiser by replay and carries on where the killed run stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.preparation import MergeOptions
from mergesmith.search.fitness import aggregate
from mergesmith.search.genome import Genome, SearchDefinition
from mergesmith.search.inmemory import Scored
from mergesmith.search.optimizers import make_optimizer
from mergesmith.search.storage import Storage, recipe_key
from mergesmith.search.tasks import WeightedTask, load_tasks
from mergesmith.search.workers import Job, RayWorkers, SerialWorkers

log = logging.getLogger("mergesmith")
PLOT_EVERY = 30.0  # seconds between progress.png refreshes during a search (it is always drawn at the end)


@dataclass
class SearchOptions:
    max_evals: int = 100
    time_budget: float | None = None  # seconds
    seed: int = 0
    optimizer: str = "cmaes"
    popsize: int | None = None
    workers: int = 1
    ray_address: str | None = None
    cpus_per_worker: int | None = None
    resume: bool = False
    device: str = "cpu"
    merge: MergeOptions = field(default_factory=MergeOptions)  # run's options for the in-memory merges

    def settings(self) -> dict[str, Any]:
        """What must not change between a run and its --resume (the budget may)."""
        return {"seed": self.seed, "optimizer": self.optimizer, "popsize": self.popsize}


@dataclass
class SearchResult:
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    front: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0  # candidates scored by this run (not taken from history or the cache)


Progress = Callable[[int, dict[str, Any] | None], None]  # (candidates done, best entry)


def genome_layer_count(definition: SearchDefinition) -> int:
    """Layer count of the genome's models (metadata only); they must agree."""
    from mergesmith.sources import arch
    from mergesmith.sources.model import load_model_info
    from mergesmith.sources.refs import parse_ref

    g = definition.genome
    names = list(dict.fromkeys(g.models + ([g.base_model] if g.base_model else [])))
    counts = {}
    for i, name in enumerate(names):
        info = load_model_info(parse_ref(name, f"genome.models[{i}]"))
        counts[name] = arch.layer_count(info.tensors.keys())
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise MergeError(f"the genome's models have different layer counts ({detail})", "genome.models")
    return next(iter(counts.values()))


@dataclass
class Prepared:
    genome: Genome
    tasks: list[WeightedTask]


def prepare(definition: SearchDefinition) -> Prepared:
    """Every check that can fail before a candidate is scored: method, models, granularity, tasks."""
    from mergesmith.methods.registry import get_method

    get_method(definition.genome.merge_method, "genome.merge_method")
    genome = Genome.build(definition.genome, genome_layer_count(definition))
    return Prepared(genome, load_tasks(definition))


def is_better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is None or a["fitness"] > b["fitness"]


def pareto_front(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries no other entry dominates on every objective (each task's weight x metric)."""
    objs = [np.array(e["objectives"]) for e in entries]
    front = []
    for i, a in enumerate(objs):
        if not any(np.all(b >= a) and np.any(b > a) for j, b in enumerate(objs) if j != i):
            front.append(entries[i])
    return front


def run_search(
    definition: SearchDefinition,
    storage_path: str | Path,
    options: SearchOptions,
    progress: Progress | None = None,
    prepared: Prepared | None = None,
) -> SearchResult:
    """Search `definition` into `storage_path`; `prepared` (from `prepare`) saves loading the tasks twice."""
    prepared = prepared or prepare(definition)
    genome, tasks = prepared.genome, prepared.tasks
    weights = [t.weight for t in tasks]
    storage = Storage(storage_path)
    settings = {**options.settings(), "genome": definition.model_dump(mode="json")}
    history = storage.open(settings, options.resume)
    by_index = {e["index"]: e for e in history}
    cache = {recipe_key(e["recipe"]): e for e in history}
    rng = np.random.default_rng(options.seed) if definition.random_init else None
    x0 = genome.initial(rng)
    optimizer = make_optimizer(options.optimizer, x0, genome.bounds(), options.seed, len(tasks), options.popsize)
    objective = (lambda e: e["objectives"]) if options.optimizer == "pareto" else (lambda e: [e["fitness"]])
    workers: SerialWorkers | RayWorkers | None = None
    start = time.monotonic()
    best: dict[str, Any] | None = None
    for e in history:
        if is_better(e, best):
            best = e
    done = len(history)
    evaluated = 0
    if progress:
        progress(done, best)

    def out_of_time() -> bool:
        return options.time_budget is not None and time.monotonic() - start >= options.time_budget

    index = 0
    generation = 0
    last_plot = time.monotonic()
    try:
        while index < options.max_evals and not out_of_time():
            xs = optimizer.ask()
            n = min(len(xs), options.max_evals - index)
            results: dict[int, dict[str, Any]] = {}
            jobs: list[Job] = []
            owners: dict[str, int] = {}
            for j in range(n):
                i = index + j
                recipe = genome.decode(xs[j])
                key = recipe_key(recipe)
                if i in by_index:
                    if recipe_key(by_index[i]["recipe"]) != key:
                        raise MergeError(
                            f"history.jsonl candidate {i} is not what this genome and seed produce; "
                            "resume with the same genome file, or use a new storage path",
                            str(storage.history_path),
                        )
                    results[i] = by_index[i]
                elif key in cache or key in owners:
                    continue  # filled in below, once the first copy is scored
                else:
                    owners[key] = i
                    jobs.append(Job(i, recipe))

            def record(job: Job, scored: Scored, gen: int = generation, results: dict = results) -> None:
                nonlocal best, done, evaluated
                values = list(scored.scores.values())
                entry = {
                    "index": job.index,
                    "generation": gen,
                    "recipe": job.recipe,
                    "scores": scored.scores,
                    "objectives": [w * v for w, v in zip(weights, values, strict=True)],
                    "fitness": aggregate(values, weights, definition.fitness),
                    "seconds": round(scored.seconds, 4),
                    "cached": False,
                }
                results[job.index] = entry
                history.append(entry)
                cache[recipe_key(job.recipe)] = entry
                storage.write_history(history)
                done += 1
                evaluated += 1
                if is_better(entry, best):
                    best = entry
                    storage.write_best(entry["recipe"])
                if progress:
                    progress(done, best)

            if jobs:
                if workers is None:
                    workers = _start_workers(tasks, definition, options, jobs[0].recipe)
                workers.map(jobs, record, out_of_time)
            complete = True
            for j in range(n):
                i = index + j
                if i in results:
                    continue
                key = recipe_key(genome.decode(xs[j]))
                first = cache.get(key)
                if first is None:  # its first copy was not scored (time budget): stop here
                    complete = False
                    continue
                entry = {**first, "index": i, "generation": generation, "seconds": 0.0, "cached": True}
                results[i] = entry
                history.append(entry)
                storage.write_history(history)
                done += 1
                if progress:
                    progress(done, best)
            if not complete or n < len(xs):
                break
            optimizer.tell(list(xs), [objective(results[index + j]) for j in range(n)])
            index += n
            generation += 1
            if time.monotonic() - last_plot > PLOT_EVERY:
                storage.plot(history)
                last_plot = time.monotonic()
    finally:
        if workers is not None:
            workers.close()
    history.sort(key=lambda e: e["index"])
    best = _best(history)
    if best is not None:
        storage.write_best(best["recipe"])
    storage.write_history(history)
    storage.plot(history)
    front = pareto_front(history) if options.optimizer == "pareto" and history else []
    if front:
        storage.write_json("pareto_front.json", [{k: e[k] for k in ("index", "scores", "recipe")} for e in front])
    storage.write_json("state.json", {"evaluations": len(history), "best_index": best and best["index"]})
    return SearchResult(history, best, front, evaluated)


def _best(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for e in history:
        if is_better(e, best):
            best = e
    return best


def _start_workers(
    tasks: list[WeightedTask], definition: SearchDefinition, options: SearchOptions, first_recipe: dict[str, Any]
) -> SerialWorkers | RayWorkers:
    if options.workers > 1 or options.ray_address:
        return RayWorkers(
            first_recipe,
            definition,
            workers=options.workers,
            address=options.ray_address,
            cpus_per_worker=options.cpus_per_worker or 1,
            options=options.merge,
        )
    return SerialWorkers(first_recipe, tasks, options.device, options.cpus_per_worker, options.merge)
