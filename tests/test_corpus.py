"""Published recipes run unchanged: tests/corpus/ holds recipes copied from model cards and
repositories (each file names its source), run through the installed `mergesmith` console script
on stand-ins of the models they name (tests/corpus_harness.py).

tests/corpus/expected.yml says, per recipe, what mergekit 0.1.5 does with it and what we must do:
`runs` (exit 0, the warnings listed, exactly) or `refused` (exit 2 with the message fragment given,
and the reason mergekit refuses it too). Regenerate the observed side with
`MERGESMITH_CORPUS_UPDATE=1 pytest tests/test_corpus.py` and review the diff before committing.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from corpus_harness import CORPUS, Outcome, Recipe, StandIns, corpus, run_recipe, stand_in

EXPECTED_FILE = CORPUS / "expected.yml"
RECIPES = corpus()


def load_expected() -> dict[str, dict]:
    return yaml.safe_load(EXPECTED_FILE.read_text()) if EXPECTED_FILE.exists() else {}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Outcome, str]]:
    """Every recipe run once (two at a time: the runs are mostly interpreter start-up)."""
    root = tmp_path_factory.mktemp("corpus")
    models = StandIns(root / "models")
    texts = {r.name: stand_in(r, models) for r in RECIPES}  # stand-ins built here, one thread

    def one(recipe: Recipe) -> tuple[str, tuple[Outcome, str]]:
        text = texts[recipe.name]  # None for YAML that does not parse: run as written, it names no model
        return recipe.name, (run_recipe(recipe, text or recipe.text, root / recipe.name), str(models.root))

    with ThreadPoolExecutor(2) as pool:
        done = dict(pool.map(one, RECIPES))
    if os.environ.get("MERGESMITH_CORPUS_UPDATE"):
        write_expected(done)
    return done


def observed(outcome: Outcome, root: str) -> dict:
    """What a run showed, with the temporary directories replaced: the warnings about what mergekit
    ignores (the MoE gates' diagnostics depend on the stand-ins' weights and are left out), or the error."""
    tmp = str(Path(root).parent)

    def clean(text: str) -> str:
        return text.replace(root, "<stand-ins>").replace(tmp, "<tmp>")

    if outcome.code == 0:
        return {"runs": True, "warnings": [clean(w) for w in outcome.warnings if "as mergekit does" in w]}
    text = outcome.output
    error = text[text.index("error: ") :].strip() if "error: " in text else text.strip()[-300:]
    return {"runs": False, "error": clean(error)}


def write_expected(done: dict[str, tuple[Outcome, str]]) -> None:
    old = load_expected()
    new = {}
    for name, (outcome, root) in done.items():
        entry = {**old.get(name, {}), **observed(outcome, root)}
        if entry["runs"]:
            entry.pop("error", None)
        else:
            entry.pop("warnings", None)
        new[name] = entry
    EXPECTED_FILE.write_text(yaml.safe_dump(new, sort_keys=True, allow_unicode=True, width=120))


def test_the_corpus_is_large_and_covers_every_method():
    assert len(RECIPES) >= 50
    methods = set()
    for r in RECIPES:
        try:
            docs = r.documents()
        except yaml.YAMLError:
            continue
        methods |= {d.get("merge_method") for d in docs if isinstance(d, dict)}
        assert r.text.startswith("# source: http"), r.name
    mergekit = {"linear", "slerp", "nuslerp", "karcher", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    mergekit |= {"breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nearswap", "arcee_fusion"}
    assert mergekit | {"passthrough"} <= methods
    kinds = {r.kind for r in RECIPES}
    assert kinds == {"run", "moe", "multi"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_published_recipe(recipe: Recipe, outcomes: dict[str, tuple[Outcome, str]]) -> None:
    expected = load_expected().get(recipe.name)
    assert expected is not None, f"{recipe.name}: no entry in {EXPECTED_FILE.name}"
    outcome, root = outcomes[recipe.name]
    got = observed(outcome, root)
    assert "Traceback" not in outcome.output, outcome.output
    assert expected.get("mergekit") in ("runs", "refuses"), f"{recipe.name}: say what mergekit does"
    if expected["mergekit"] == "runs":  # the compatibility rule: what mergekit runs, we run
        assert got["runs"], outcome.output
    assert got["runs"] == expected["runs"], outcome.output
    if got["runs"]:
        assert got["warnings"] == expected["warnings"], outcome.output
        out = Path(outcome.out)
        if not out.exists():  # a multi-stage file whose documents are all named: its last stage
            out = out.parent / "stages" / [d for d in recipe.documents() if isinstance(d, dict)][-1]["name"]
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("num_hidden_layers", 0) > 0
    else:
        assert outcome.code == 2 and got["error"] == expected["error"], outcome.output
