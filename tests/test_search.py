"""`mergesmith search`: recovering a hidden merge, resume after kill -9, Ray, recipes, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from mergesmith.search.genome import SearchDefinition
from mergesmith.search.runner import SearchOptions, run_search
from mergesmith.toymodels import load_state_dict, make_base, make_finetune, save_state_dict

HIDDEN = (0.2, 0.5, 0.3)
SRC = Path(__file__).parents[1] / "src"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny fine-tunes and the hidden target sum_i w_i ft_i, computed here in float64."""
    root = tmp_path_factory.mktemp("search_models")
    base = make_base(root / "base", layers=2, hidden=16, vocab=64, seed=0)
    fts = [make_finetune(base, root / f"ft{i}", seed=i, scale=0.05) for i in (1, 2, 3)]
    sds = [load_state_dict(f) for f in fts]
    target = {k: sum(w * sd[k].double() for w, sd in zip(HIDDEN, sds, strict=True)).float() for k in sds[0]}
    shutil.copytree(fts[0], root / "target")
    save_state_dict(root / "target", target)
    return {"base": base, "ft1": fts[0], "ft2": fts[1], "ft3": fts[2], "target": root / "target"}


def genome(trio: dict[str, Path], delay: float = 0.0, **extra: object) -> dict:
    args = {"target": str(trio["target"])}
    if delay:
        args["delay"] = delay
    return {
        "genome": {
            "models": [str(trio[f"ft{i}"]) for i in (1, 2, 3)],
            "merge_method": "linear",
            "normalize": True,
            "dtype": "float32",
            **extra,
        },
        "tasks": [{"python": "search_tasks:kl_to_target", "args": args}],
    }


def weights(recipe: dict) -> list[float]:
    w = [m["parameters"]["weight"] for m in recipe["models"]]
    return [x / sum(w) for x in w]


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


def read_history(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


RESULTS: dict[str, object] = {}


def search(trio: dict[str, Path], out: Path, optimizer: str, evals: int = 200):
    return run_search(
        SearchDefinition.model_validate(genome(trio)),
        out,
        SearchOptions(max_evals=evals, optimizer=optimizer, seed=0, cpus_per_worker=1),
    )


def test_cmaes_recovers_hidden_weights_and_random_search_does_worse(trio, tmp_path):
    cma = search(trio, tmp_path / "cma", "cmaes")
    assert len(cma.history) == 200 and [e["index"] for e in cma.history] == list(range(200))
    found = weights(cma.best["recipe"])
    assert max(abs(a - b) for a, b in zip(found, HIDDEN, strict=True)) < 0.05, found
    rnd = search(trio, tmp_path / "rnd", "random")
    assert len(rnd.history) == 200
    rnd_err = max(abs(a - b) for a, b in zip(weights(rnd.best["recipe"]), HIDDEN, strict=True))
    cma_err = max(abs(a - b) for a, b in zip(found, HIDDEN, strict=True))
    # KL is quadratic in the weight error near the optimum: CMA-ES should be far closer
    assert -cma.best["fitness"] * 10 < -rnd.best["fitness"], (cma.best["fitness"], rnd.best["fitness"])
    assert cma_err < rnd_err
    for name in ("best_config.yaml", "history.jsonl", "progress.png", "search.json"):
        assert (tmp_path / "cma" / name).exists(), name
    RESULTS["cma"] = (tmp_path / "cma", cma)


def test_best_config_runs_and_reproduces_the_best_candidate(trio, tmp_path):
    if "cma" not in RESULTS:
        pytest.skip("needs the CMA-ES search of the previous test")
    storage, result = RESULTS["cma"]
    best = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert best == result.best["recipe"]
    res = run_cli("run", storage / "best_config.yaml", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    merged = load_state_dict(tmp_path / "out")
    w = [m["parameters"]["weight"] for m in best["models"]]
    sds = [load_state_dict(trio[f"ft{i}"]) for i in (1, 2, 3)]
    for name, t in merged.items():
        expect = sum(wi * sd[name].double() for wi, sd in zip(w, sds, strict=True)) / sum(w)
        torch.testing.assert_close(t.double(), expect, atol=1e-6, rtol=1e-5)
    # the in-memory merge that was scored holds the same tensors
    from mergesmith.search.inmemory import InMemoryMerger

    merger = InMemoryMerger(best, [])
    merger.load_weights(best)
    state = merger.model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), name


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}


def test_kill_9_then_resume_equals_an_uninterrupted_run(trio, tmp_path):
    spec = tmp_path / "genome.yml"
    spec.write_text(yaml.safe_dump(genome(trio, delay=0.05)))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mergesmith.cli", "search", str(spec), "--storage-path", str(killed)]
    proc = subprocess.Popen(
        [*cmd, "--max-evals", "30", "--cpus-per-worker", "1", "--quiet"], env=cli_env(), stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    k = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "history.jsonl").exists():
            k = len((killed / "history.jsonl").read_text().splitlines())
            if k >= 10:
                break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_history(killed)
    assert 10 <= len(before) < 30
    res = run_cli(
        "search", spec, "--storage-path", killed, "--max-evals", "30", "--resume", "--cpus-per-worker", "1", "--quiet"
    )
    assert res.exit_code == 0, res.output
    assert f"({30 - len(before)} scored now)" in res.output
    res = run_cli(
        "search",
        spec,
        "--storage-path",
        tmp_path / "straight",
        "--max-evals",
        "30",
        "--cpus-per-worker",
        "1",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    resumed, straight = read_history(killed), read_history(tmp_path / "straight")
    assert comparable(resumed[: len(before)]) == comparable(before)
    assert comparable(resumed) == comparable(straight)
    assert (killed / "best_config.yaml").read_text() == (tmp_path / "straight" / "best_config.yaml").read_text()


def test_ray_with_two_workers_gives_the_same_history_as_one(trio, tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "genome.yml"
    spec.write_text(yaml.safe_dump(genome(trio)))
    common = ["--max-evals", "21", "--cpus-per-worker", "1", "--quiet"]
    ray_out = tmp_path / "ray"
    cmd = [
        sys.executable,
        "-m",
        "mergesmith.cli",
        "search",
        str(spec),
        "--storage-path",
        str(ray_out),
        "--workers",
        "2",
    ]
    proc = subprocess.run([*cmd, *common], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = run_cli("search", spec, "--storage-path", tmp_path / "serial", "--workers", "1", *common)
    assert res.exit_code == 0, res.output
    assert comparable(read_history(ray_out)) == comparable(read_history(tmp_path / "serial"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "lienar"}, "unknown merge method 'lienar'; did you mean 'linear'?"),
        ({"layer_granularity": 3}, "layer_granularity 3 does not divide the models' 2 layers"),
        ({"tasks": [{"path": "nowhere/tasks.jsonl"}]}, "task file not found"),
    ],
)
def test_bad_inputs_fail_with_one_message_before_any_evaluation(trio, tmp_path, change, message):
    spec = genome(trio)
    if "tasks" in change:
        spec["tasks"] = change["tasks"]
    else:
        spec["genome"].update(change)
    path = tmp_path / "genome.yml"
    path.write_text(yaml.safe_dump(spec))
    res = run_cli("search", path, "--storage-path", tmp_path / "out", "--quiet")
    assert res.exit_code == 2
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()


def test_pareto_keeps_the_front_over_two_targets(trio, tmp_path):
    pytest.importorskip("optuna")
    spec = genome(trio)
    second = {"python": "search_tasks:kl_to_target", "args": {"target": str(trio["ft2"])}}
    spec["tasks"].append(second)
    options = SearchOptions(max_evals=24, optimizer="pareto", popsize=8, cpus_per_worker=1)
    result = run_search(SearchDefinition.model_validate(spec), tmp_path, options)
    assert len(result.history) == 24 and result.front
    objs = [e["objectives"] for e in result.history]
    for e in result.front:  # nothing in the history dominates a front member
        a = e["objectives"]
        assert not any(all(b_ >= a_ for a_, b_ in zip(a, b, strict=True)) and b != a for b in objs)
    for e in result.history:
        assert e["objectives"] == list(e["scores"].values())
    assert (tmp_path / "pareto_front.json").exists()


def test_time_budget_stops_early_and_resume_extends_it(trio, tmp_path):
    definition = SearchDefinition.model_validate(genome(trio, delay=0.05))
    options = SearchOptions(max_evals=40, time_budget=0.6, cpus_per_worker=1)
    first = run_search(definition, tmp_path, options)
    assert 0 < len(first.history) < 40
    options = SearchOptions(max_evals=40, resume=True, cpus_per_worker=1)
    second = run_search(definition, tmp_path, options)
    assert [e["index"] for e in second.history] == list(range(40))
    assert second.evaluated == 40 - len(first.history)
    assert comparable(second.history[: len(first.history)]) == comparable(first.history)
