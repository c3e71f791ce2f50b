"""`mergesmith search`: find the best merge recipe for a genome, resumable, optionally on Ray.

Python API (imported lazily so `mergesmith --help` stays fast)::

    from mergesmith.search import SearchOptions, load_search_definition, run_search
    result = run_search(load_search_definition("genome.yml"), "out/", SearchOptions(max_evals=200))
"""

from typing import Any

_EXPORTS = {
    "Genome": "genome",
    "SearchDefinition": "genome",
    "load_search_definition": "genome",
    "SearchOptions": "runner",
    "SearchResult": "runner",
    "run_search": "runner",
    "Task": "tasks",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"mergesmith.search.{_EXPORTS[name]}"), name)
