"""`mergesmith search` after the search: --holdout, --save-final-model, and a worker lost mid-evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file
from search_tasks import KLToTarget
from test_search import cli_env, comparable, genome, read_history, trio  # noqa: F401  (trio is a fixture)

from mergesmith.toymodels import load_state_dict


def load_merged(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_holdout_scores_the_best_recipe_on_held_out_tasks_and_prints_both(trio, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MERGESMITH_TEST_HOLDOUT_TARGET", str(trio["ft2"]))
    spec = tmp_path / "genome.yml"
    spec.write_text(yaml.safe_dump(genome(trio)))
    store = tmp_path / "search"
    res = run_cli(
        "search", spec, "--storage-path", store, "--max-evals", "6", "--cpus-per-worker", "1", "--quiet",
        "--holdout", "python:search_tasks:kl_to_holdout_target",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    stored = json.loads((store / "holdout.json").read_text())
    best = min(read_history(store), key=lambda e: (-e["fitness"], e["index"]))
    assert stored["index"] == best["index"] and stored["search"] == best["scores"]

    # independently: merge best_config.yaml with `mergesmith run`, load it, score both objectives here
    recipe = yaml.safe_load((store / "best_config.yaml").read_text())
    assert recipe == best["recipe"]
    assert run_cli("run", store / "best_config.yaml", tmp_path / "best", "--quiet").exit_code == 0
    model = load_merged(tmp_path / "best")
    with torch.no_grad():
        search_kl = KLToTarget(str(trio["target"])).evaluate(model, None)["neg_kl"]
        holdout_kl = KLToTarget(str(trio["ft2"]), seed=7).evaluate(model, None)["neg_kl"]
    assert stored["search"] == {"kl": search_kl}
    assert stored["holdout"] == {"kl_holdout": holdout_kl}
    lines = res.output.splitlines()
    assert f"search tasks:  kl {search_kl:.6g}" in lines
    assert f"holdout tasks: kl_holdout {holdout_kl:.6g}" in lines


def test_save_final_model_writes_the_best_merge_bit_for_bit(trio, tmp_path):  # noqa: F811
    spec = tmp_path / "genome.yml"
    spec.write_text(yaml.safe_dump(genome(trio)))
    store = tmp_path / "search"
    res = run_cli(
        "search", spec, "--storage-path", store, "--max-evals", "6", "--cpus-per-worker", "1", "--quiet",
        "--save-final-model",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    final = store / "final_model"
    assert run_cli("run", store / "best_config.yaml", tmp_path / "ref", "--quiet").exit_code == 0
    saved, ref = load_state_dict(final), load_state_dict(tmp_path / "ref")
    assert saved.keys() == ref.keys() and saved
    for name, t in ref.items():
        assert saved[name].dtype == t.dtype and torch.equal(saved[name], t), name
    # same files, same shard layout
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    for s in shards:
        a, b = load_file(final / s), load_file(tmp_path / "ref" / s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # transformers loads it, and it scores what the search said the best candidate scores
    best = min(read_history(store), key=lambda e: (-e["fitness"], e["index"]))
    model = load_merged(final)
    with torch.no_grad():
        assert KLToTarget(str(trio["target"])).evaluate(model, None)["neg_kl"] == best["scores"]["kl"]


def test_a_lost_ray_worker_s_candidate_is_scored_elsewhere_once(trio, tmp_path):  # noqa: F811
    pytest.importorskip("ray")
    marker = tmp_path / "died"
    dying = genome(trio)
    dying["tasks"][0]["args"]["die_once"] = str(marker)  # the first evaluation anywhere: os._exit(1)
    spec = tmp_path / "genome.yml"
    spec.write_text(yaml.safe_dump(dying))
    evals = 12
    common = ["--max-evals", str(evals), "--cpus-per-worker", "1", "--quiet"]
    ray_out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "mergesmith.cli", "search", str(spec), "--storage-path", str(ray_out)]
    proc = subprocess.run([*cmd, "--workers", "2", "-v", *common], env=cli_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "no worker died: the test did not test anything"
    assert "a worker was lost" in proc.stderr, proc.stderr[-3000:]
    assert f"({evals} scored now)" in proc.stdout, proc.stdout
    history = read_history(ray_out)
    assert [e["index"] for e in history] == list(range(evals))  # none lost, none twice
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump(genome(trio)))
    res = run_cli("search", plain, "--storage-path", tmp_path / "serial", "--workers", "1", *common)
    assert res.exit_code == 0, res.output
    assert comparable(history) == comparable(read_history(tmp_path / "serial"))
