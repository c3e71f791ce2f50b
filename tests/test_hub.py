"""Hub ids (`org/name`, `org/name@rev`) against a local fake hub (tests/fakehub.py) speaking the HTTP
protocol of the installed huggingface_hub: `run` fetches only what the merge needs, `validate` and
`run --dry-run` only metadata, revisions pick the right weights, errors name the YAML path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, tensors
from fakehub import RESOLVE, FakeHub, hub  # noqa: F401  (hub is a fixture)
from formulas import f64

from mergesmith.output.card import front_matter
from mergesmith.sources.model import load_model_info, load_model_metadata
from mergesmith.sources.refs import parse_ref

EXTRAS = {"notes.txt": "training notes\n", "modeling_custom.py": "raise SystemExit('never fetched')\n"}


@pytest.fixture(scope="module")
def repos(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Repository contents: org/ft at main (= ft1) and rev2 (= ft2, sharded), each with files a merge
    does not need (a .txt, a .py, a pytorch_model.bin duplicate; rev2 also a consolidated.safetensors); org/binonly (= ft3, .bin only)."""
    root = tmp_path_factory.mktemp("repos")
    out = {}
    for name, src in (("ft_main", "ft1"), ("ft_rev2", "ft2"), ("binonly", "ft3")):
        out[name] = Path(shutil.copytree(models[src], root / name))
    for name in ("ft_main", "ft_rev2"):
        for file, text in EXTRAS.items():
            (out[name] / file).write_text(text)
        shutil.copy(models["ft3"] / "pytorch_model.bin", out[name] / "pytorch_model.bin")
    shutil.copy(models["ft1"] / "model.safetensors", out["ft_rev2"] / "consolidated.safetensors")  # not in the index
    return out


@pytest.fixture
def served(hub: FakeHub, repos: dict[str, Path]) -> FakeHub:  # noqa: F811
    hub.add("org/ft", repos["ft_main"])
    hub.add("org/ft", repos["ft_rev2"], revision="rev2")
    hub.add("org/binonly", repos["binonly"])
    return hub


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))


def test_run_mixes_local_and_hub_models_and_picks_the_revision(served, models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["base"]), "parameters": {"weight": 0.5}},
            {"model": "org/ft@rev2", "parameters": {"weight": 0.3}},
            {"model": "org/binonly", "parameters": {"weight": 0.2}},
        ],
        "dtype": "float32",
    }
    result = run_cli("run", write(tmp_path, recipe), tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    out, base, ft2, ft3 = (tensors(d) for d in (tmp_path / "out", models["base"], models["ft2"], models["ft3"]))
    assert set(out) == set(base)
    for name, t in out.items():  # rev2 is ft2, not main's ft1
        expected = 0.5 * f64(base[name]) + 0.3 * f64(ft2[name]) + 0.2 * f64(ft3[name])
        torch.testing.assert_close(f64(t), expected, rtol=1e-6, atol=1e-6)

    fetched = served.fetched()
    assert not [f for f in fetched if f.endswith((".txt", ".py"))], fetched
    ft_files = [r.path.rsplit("/", 1)[1] for r in served.requests if r.method == "GET" and "/org/ft/resolve/" in r.path]
    # the repo has safetensors, so its .bin duplicate is not needed; consolidated.* is not in the index
    assert "pytorch_model.bin" not in ft_files and "consolidated.safetensors" not in ft_files
    rev2_shards = sorted(p.name for p in models["ft2"].glob("*.safetensors"))
    assert set(rev2_shards) <= set(ft_files) and "model.safetensors" not in ft_files  # rev2's shards, not main's file
    bin_files = [r.path for r in served.requests if r.method == "GET" and "/org/binonly/resolve/" in r.path]
    assert any(p.endswith("/pytorch_model.bin") for p in bin_files)  # a .bin-only repo: its checkpoint is fetched

    card = front_matter((tmp_path / "out" / "README.md").read_text())
    assert card["base_model"] == ["org/ft", "org/binonly"]  # the hub ids, not the local directory
    assert "org/ft@rev2" in (tmp_path / "out" / "mergesmith_config.yml").read_text()


def test_validate_hub_ids_reads_metadata_only(served, models, repos, tmp_path):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": "org/ft", "parameters": {"weight": 0.5}},
            {"model": "org/ft@rev2", "parameters": {"weight": 0.5}},
        ],
    }
    path = write(tmp_path, recipe)
    for args in (("validate", path), ("run", path, "--dry-run")):
        served.requests.clear()
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert "no problems found" in result.output and "plan: task_arithmetic" in result.output
        weights = weight_bytes(repos["ft_main"]) + weight_bytes(repos["ft_rev2"])
        assert served.bytes_sent() < weights / 20, (served.bytes_sent(), weights)
        for r in served.requests:
            m = RESOLVE.match(r.path)
            if m and m["path"].endswith((".safetensors", ".bin")) and r.method == "GET":
                assert r.range is not None and m["path"].endswith(".safetensors"), r  # header range reads only
        assert not [f for f in served.fetched() if not f.endswith((".json", ".safetensors"))]
        ranged = [r for r in served.requests if r.range and r.range != "bytes=0-7"]
        assert ranged and all(r.sent < 10_000 for r in ranged)  # one header each, never a tensor


def test_hub_metadata_equals_the_local_model(served, models):
    for ref, local in (("org/ft@rev2", "ft2"), ("org/ft", "ft1")):
        remote = load_model_metadata(parse_ref(ref, "x"))
        here = load_model_info(parse_ref(str(models[local]), "x"))
        assert remote.tensors == here.tensors and remote.format == "safetensors"
        assert remote.config == here.config
    assert all(f.endswith((".json", ".safetensors")) for f in served.fetched())
    assert all(r.range for r in served.requests if r.method == "GET" and r.path.endswith(".safetensors"))


def test_validate_reports_missing_repo_and_revision_with_yaml_paths(served, models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "org/nope", "parameters": {"weight": 0.5}},
            {"model": "org/ft@v9", "parameters": {"weight": 0.5}},
            {"model": "org/binonly", "parameters": {"weight": 0.5}},
        ],
    }
    result = run_cli("validate", write(tmp_path, recipe))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert "2 problem(s)" in result.output
    assert any("models[0].model:" in line and "no Hugging Face hub repository 'org/nope'" in line for line in lines), (
        result.output
    )
    assert any(
        "models[1].model:" in line and "revision 'v9' not found" in line and "after '@'" in line for line in lines
    ), result.output


def test_run_names_a_missing_revision_in_one_line(served, models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "org/ft@v9", "parameters": {"weight": 1.0}}]}
    result = run_cli("run", write(tmp_path, recipe), tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    assert "revision 'v9' not found in Hugging Face hub repository 'org/ft'" in result.output
    assert not (tmp_path / "out").exists()


def test_cached_hub_model_merges_offline(served, models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["base"]), "parameters": {"weight": 0.5}},
            {"model": "org/ft@rev2", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    path = write(tmp_path, recipe)
    assert run_cli("run", path, tmp_path / "online", "--quiet").exit_code == 0
    served.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("run", path, tmp_path / "offline", "--quiet")
    assert result.exit_code == 0, result.output
    assert served.requests == []
    online, offline = tensors(tmp_path / "online"), tensors(tmp_path / "offline")
    assert all(torch.equal(online[k], offline[k]) for k in online)
    result = run_cli("validate", path)
    assert result.exit_code == 0 and served.requests == [], result.output


def test_transformers_cache_flag_puts_downloads_there(served, models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "org/ft", "parameters": {"weight": 1.0}}]}
    cache = tmp_path / "my_cache"
    result = run_cli("run", write(tmp_path, recipe), tmp_path / "out", "--quiet", "--transformers-cache", cache)
    assert result.exit_code == 0, result.output
    assert list(cache.glob("models--org--ft/snapshots/*/model.safetensors"))
    ft1 = tensors(models["ft1"])
    assert all(torch.equal(t, ft1[k]) for k, t in tensors(tmp_path / "out").items())


def test_upload_sends_exactly_the_merge_and_it_merges_back(served, models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    recipe = {"merge_method": "linear", "models": [{"model": "org/ft@rev2", "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    assert run_cli("run", write(tmp_path, recipe), out, "--quiet").exit_code == 0
    result = run_cli("upload", out, "me/merged")
    assert result.exit_code == 0, result.output
    uploaded = served.find("me/merged", "main").files()
    assert sorted(uploaded) == sorted(p.name for p in out.iterdir())
    assert all(uploaded[name].read_bytes() == (out / name).read_bytes() for name in uploaded)
    again = run_cli(
        "run",
        write(tmp_path, {**recipe, "models": [{"model": "me/merged", "parameters": {"weight": 1.0}}]}, "again.yml"),
        tmp_path / "o2",
    )
    assert again.exit_code == 0, again.output
    merged = tensors(out)
    assert all(torch.equal(t, merged[k]) for k, t in tensors(tmp_path / "o2").items())


def test_unreachable_hub_and_nothing_cached_is_one_clear_problem(served, tmp_path):
    served.stop()  # connection refused from now on
    recipe = {"merge_method": "linear", "models": [{"model": "org/ft@rev2", "parameters": {"weight": 1.0}}]}
    result = run_cli("validate", write(tmp_path, recipe))
    assert result.exit_code == 2
    assert "models[0].model: not a local directory, and fetching it from the Hugging Face hub at" in result.output
    assert "ConnectError" in result.output
