"""One end-to-end test per console command, through the installed `mergesmith` script: the output
and exit code of a good call, and of the command's most common bad input (exit 2, one `error:` line
naming the file, key or option, never a traceback).

`run --resume`, `search`, `eval` + `demo`, the missing extras and the docs' examples have their own
files (test_cli_resume_finished.py, test_cli_search.py, test_demo.py, test_cli_extras.py,
test_docs.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from console import mergesmith
from fakehub import FakeHub

from mergesmith.toymodels import load_state_dict, make_base, make_finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = make_base(root / "base", layers=2, hidden=16, vocab=64, seed=0)
    return {
        "root": root,
        "base": base,
        "a": make_finetune(base, root / "a", seed=1),
        "b": make_finetune(base, root / "b", seed=2),
    }


def write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_line(output: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("error:")]
    return line


def linear(tiny: dict[str, Path], wa: float = 0.25, wb: float = 0.75) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["a"]), "parameters": {"weight": wa}},
            {"model": str(tiny["b"]), "parameters": {"weight": wb}},
        ],
        "dtype": "float32",
    }


def test_run_writes_the_formula_and_a_missing_model_is_named(tiny: dict[str, Path], tmp_path: Path) -> None:
    write(tmp_path / "r.yml", linear(tiny))
    ok = mergesmith("run", "r.yml", "out", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    assert "merged in" in ok.stdout and "audit:" in ok.stdout
    got = load_state_dict(tmp_path / "out")
    a, b = load_state_dict(tiny["a"]), load_state_dict(tiny["b"])
    for name in a:
        expected = (0.25 * a[name].double() + 0.75 * b[name].double()) / 1.0
        assert torch.allclose(got[name].double(), expected, atol=1e-6), name

    bad = linear(tiny)
    bad["models"][1]["model"] = str(tmp_path / "no-such-model")
    write(tmp_path / "bad.yml", bad)
    proc = mergesmith("run", "bad.yml", "out2", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_line(proc.stdout) == f"error: {tmp_path / 'no-such-model'}: model directory not found"
    assert not (tmp_path / "out2").exists()

    missing = mergesmith("run", "nope.yml", "out3", cwd=tmp_path)
    assert missing.returncode == 2 and error_line(missing.stdout) == "error: nope.yml: recipe file not found"

    dry = mergesmith("run", "r.yml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "model.embed_tokens.weight" in dry.stdout or "tensors" in dry.stdout, dry.stdout


def test_validate_lists_every_problem(tiny: dict[str, Path], tmp_path: Path) -> None:
    write(tmp_path / "r.yml", linear(tiny))
    ok = mergesmith("validate", "r.yml", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    bad = linear(tiny)
    bad["models"][0]["model"] = str(tmp_path / "no-such-model")
    bad["dtype"] = "float33"
    write(tmp_path / "bad.yml", bad)
    proc = mergesmith("validate", "bad.yml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "no-such-model" in proc.stdout and "float33" in proc.stdout, proc.stdout


def test_verify_a_merge_and_a_damaged_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    write(tmp_path / "r.yml", linear(tiny))
    assert mergesmith("run", "r.yml", "out", "--quiet", cwd=tmp_path).returncode == 0
    ok = mergesmith("verify", "out", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    bad = mergesmith("verify", "out", cwd=tmp_path)
    assert bad.returncode != 0 and "model.safetensors" in bad.stdout, bad.stdout


def test_methods_lists_shows_and_suggests(tmp_path: Path) -> None:
    listing = mergesmith("methods", cwd=tmp_path)
    assert listing.returncode == 0 and all(m in listing.stdout for m in ("linear", "ties", "slerp", "della"))
    one = mergesmith("methods", "ties", cwd=tmp_path)
    assert one.returncode == 0 and "paper: https://arxiv.org/abs/2306.01708" in one.stdout
    typo = mergesmith("methods", "tiess", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean 'ties'" in error_line(typo.stdout)


def test_multi_runs_stages_in_order_and_names_an_unknown_stage(tiny: dict[str, Path], tmp_path: Path) -> None:
    stage = {"name": "mix", **linear(tiny, 0.5, 0.5)}
    final = {
        "merge_method": "linear",
        "models": [
            {"model": "mix", "parameters": {"weight": 0.5}},
            {"model": str(tiny["a"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    write(tmp_path / "m.yml", yaml.safe_dump(stage) + "---\n" + yaml.safe_dump(final))
    ok = mergesmith("multi", "m.yml", "-I", "stages", "--out-path", "final", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    assert "2 stage(s) merged, 0 reused" in ok.stdout
    a, b = load_state_dict(tiny["a"]), load_state_dict(tiny["b"])
    got = load_state_dict(tmp_path / "final")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(got[name].double(), 0.75 * a[name].double() + 0.25 * b[name].double(), atol=1e-6)
    again = mergesmith("multi", "m.yml", "-I", "stages", "--out-path", "final", "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and "0 stage(s) merged, 2 reused" in again.stdout, again.stdout

    final["models"][0]["model"] = "mixx"
    write(tmp_path / "bad.yml", yaml.safe_dump(stage) + "---\n" + yaml.safe_dump(final))
    bad = mergesmith("multi", "bad.yml", "-I", "stages2", "--out-path", "final2", cwd=tmp_path)
    assert bad.returncode == 2 and "mixx" in error_line(bad.stdout), bad.stdout


def test_moe_builds_experts_and_refuses_one_prompt_set(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "base_model": str(tiny["base"]),
        "gate_mode": "random",
        "experts": [
            {"source_model": str(tiny["a"]), "positive_prompts": ["one two"]},
            {"source_model": str(tiny["b"]), "positive_prompts": ["red green"]},
        ],
    }
    write(tmp_path / "moe.yml", config)
    ok = mergesmith("moe", "moe.yml", "out", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2
    config["experts"][1]["positive_prompts"] = ["one two"]
    config["gate_mode"] = "hidden"
    write(tmp_path / "bad.yml", config)
    bad = mergesmith("moe", "bad.yml", "out2", cwd=tmp_path)
    assert bad.returncode == 2 and "same prompts" in bad.stdout, bad.stdout


def test_extract_lora_and_a_missing_base(tiny: dict[str, Path], tmp_path: Path) -> None:
    args = ["extract-lora", "--model", tiny["a"], "--base-model", tiny["base"], "--out-path", "lora", "--max-rank", "4"]
    ok = mergesmith(*args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] <= 4
    bad = mergesmith(
        "extract-lora", "--model", tiny["a"], "--base-model", tmp_path / "nope", "--out-path", "l2", cwd=tmp_path
    )
    assert bad.returncode == 2 and "nope" in error_line(bad.stdout), bad.stdout


def test_legacy_builds_the_recipe_and_checks_weight_counts(tiny: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--base-model", tiny["base"], "--merge", tiny["a"], "--merge", tiny["b"], "--density", "0.5"]
    ok = mergesmith("legacy", "out", *flags, "--weight", "0.5", "--print-yaml", "--dry-run", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    recipe = yaml.safe_load(ok.stdout)
    assert recipe["merge_method"] == "ties" and len(recipe["models"]) >= 2
    flags[3] = tmp_path / "missing-model"
    bad = mergesmith("legacy", "out", *flags, "--weight", "0.5", cwd=tmp_path)
    assert bad.returncode == 2 and "missing-model" in error_line(bad.stdout), bad.stdout
    assert not (tmp_path / "out").exists()


def test_bakllama_stacks_slices_and_refuses_a_range_past_the_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "layer_slices": [
            {"model": str(tiny["a"]), "start": 0, "end": 2},
            {"model": str(tiny["b"]), "start": 1, "end": 2},
        ]
    }
    write(tmp_path / "b.yml", config)
    ok = mergesmith("bakllama", "b.yml", "out", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    got, b = load_state_dict(tmp_path / "out"), load_state_dict(tiny["b"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    config["layer_slices"][1]["end"] = 5
    write(tmp_path / "bad.yml", config)
    bad = mergesmith("bakllama", "bad.yml", "out2", cwd=tmp_path)
    assert bad.returncode == 2, bad.stdout
    assert "layer_range [1, 5] goes beyond the model, which has 2 layers" in error_line(bad.stdout)


def test_eval_and_a_missing_task_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    rows = [
        {"prompt": "one two", "choices": ["three", "three"], "label": 1},
        {"prompt": "a", "choices": ["b", "b"], "label": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok = mergesmith("eval", tiny["a"], "-t", "mc.jsonl", "--output-json", "s.json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    (scores,) = json.loads((tmp_path / "s.json").read_text())["results"].values()
    assert scores["mc"]["acc"] == 0.5  # equal choices: argmax keeps the first, so row 1 is wrong, row 2 right
    bad = mergesmith("eval", tiny["a"], "-t", "nope.jsonl", cwd=tmp_path)
    assert bad.returncode == 2 and error_line(bad.stdout) == "error: nope.jsonl: task file not found"


def test_search_refuses_a_missing_task_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    genome = {
        "genome": {"models": [str(tiny["a"]), str(tiny["b"])], "merge_method": "linear"},
        "tasks": [{"path": "qa.jsonl"}],
    }
    write(tmp_path / "g.yml", genome)
    bad = mergesmith("search", "g.yml", "--storage-path", "s", cwd=tmp_path)
    assert bad.returncode == 2 and error_line(bad.stdout) == "error: tasks[0].path (qa.jsonl): task file not found"


def test_upload_to_a_local_hub_and_refuse_a_partial_merge(tiny: dict[str, Path], tmp_path: Path) -> None:
    write(tmp_path / "r.yml", linear(tiny))
    assert mergesmith("run", "r.yml", "out", "--quiet", cwd=tmp_path).returncode == 0
    hub = FakeHub(tmp_path / "hub")
    hub.start()
    try:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "HF_TOKEN": "hf_local_test_token",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
        }
        ok = mergesmith("upload", "out", "me/merged", cwd=tmp_path, **env)
        assert ok.returncode == 0, ok.stdout
        sent = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hub" / "me" / "merged").iterdir()
        }
        local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").iterdir()}
        assert sent == local and "model.safetensors" in sent
        (tmp_path / ".out.mergesmith-partial").mkdir()  # a merge into `out` is under way
        bad = mergesmith("upload", "out", "me/merged", cwd=tmp_path, **env)
        assert bad.returncode == 2 and "unfinished" in error_line(bad.stdout), bad.stdout
    finally:
        hub.stop()
