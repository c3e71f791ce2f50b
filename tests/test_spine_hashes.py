"""Byte-identical outputs across refactors of the merge spine (issue #18).

Every case below runs a command the way users do (the CLI, real tiny models built here) and hashes
every file it writes. The hashes were recorded before the spine was refactored; a change to the engine,
the planner, the sources or the writers that changes one output byte fails here. Where a change fixes
a bug on purpose, regenerate with `MERGESMITH_SPINE_UPDATE=1 python -m pytest tests/test_spine_hashes.py`
and say which hash changed and why in the commit.

Paths differ between runs (temporary directories): recipes name the models relative to their root, the
working directory (seeded draws are keyed by the model reference), the root is replaced by `<ROOT>` in
what is hashed, and merge_report.json's resume fingerprint (a digest over absolute paths) is left out,
as are the library versions a run records (merge_report.json's `versions`, config.json's
`transformers_version`): a new transformers release changes no merge.
torch's softmax, exp and log round differently per CPU capability (AVX2, AVX512), so the tensors of the
cases in `CAPABILITY_DEPENDENT` are recorded per capability and checked where one was recorded.
LAPACK's SVDs (`--as-lora`, tsv, iso_*) round differently with the thread count, so the cases run with
one torch thread; the hashes hold for the default environment (OMP_NUM_THREADS unset: with
OMP_NUM_THREADS=1 iso_cts's SVD rounds differently again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from lora_adapters import build_adapter

from mergesmith.toymodels import make_base, make_finetune, make_vocab_variant

HASHES = Path(__file__).parent / "spine_hashes.json"
UPDATE = os.environ.get("MERGESMITH_SPINE_UPDATE") == "1"
MOE_FLAG = "--i-understand-this-is-not-useful-without-training"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spine")
    z: dict[str, Path] = {"root": root}
    base = z["base"] = make_base(root / "base", layers=4, hidden=32, vocab=96, seed=0)
    z["ft1"] = make_finetune(base, root / "ft1", seed=1)
    z["ft2"] = make_finetune(base, root / "ft2", seed=2, shards=3)
    z["ft3"] = make_finetune(base, root / "ft3", seed=3, fmt="bin")
    z["chatml"] = make_vocab_variant(
        base, root / "chatml", seed=4, added=("<|im_start|>", "<|im_end|>"), eos_token="<|im_end|>"
    )
    z["llama3"] = make_vocab_variant(base, root / "llama3", seed=5, added=("<|eot_id|>",), shuffle=True)
    build_adapter(base, root / "adapter", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    z["adapter"] = root / "adapter"
    z["qwen2"] = make_base(root / "qwen2", family="qwen2", layers=2, tie=True, seed=11)
    z["qwen2_ft"] = make_finetune(z["qwen2"], root / "qwen2_ft", seed=12, scale=0.05)
    z["qwen3"] = make_base(root / "qwen3", family="qwen3", layers=2, seed=14)
    z["qwen3_ft"] = make_finetune(z["qwen3"], root / "qwen3_ft", seed=15, scale=0.05)
    z["granite"] = make_base(root / "granite", family="granite", layers=2, seed=16)
    z["granite_ft"] = make_finetune(z["granite"], root / "granite_ft", seed=17, scale=0.05)
    return z


def two(method: str, **params: object) -> dict:
    """`method` of ft1 and ft2 onto the base, per-model weights where the method reads them."""
    weights = [0.6, 0.4]
    return {
        "merge_method": method,
        "base_model": "{base}",
        "models": [
            {"model": m, "parameters": {"weight": w, **params}}
            for m, w in zip(("{ft1}", "{ft2}"), weights, strict=True)
        ],
        "dtype": "float32",
    }


def plain(method: str, models: tuple[str, ...], base: bool = True, **params: object) -> dict:
    recipe: dict = {"merge_method": method, "models": [{"model": m} for m in models], "dtype": "float32"}
    if base:
        recipe["base_model"] = "{base}"
    if params:
        recipe["parameters"] = params
    return recipe


PROMPTS = ["hello world", "the cat and the dog", "one two three", "red green blue"]


def experts(*names: str) -> list[dict]:
    return [{"source_model": n, "positive_prompts": [PROMPTS[i % len(PROMPTS)]]} for i, n in enumerate(names)]


# name -> (command, recipe, flags)
CASES: dict[str, tuple[str, object, tuple[str, ...]]] = {
    "linear": ("run", plain("linear", ("{ft1}", "{ft2}", "{ft3}"), base=False, weight=[1.0, 0.5]), ()),
    "slerp": ("run", plain("slerp", ("{ft1}",), t=[0.0, 0.3, 1.0]), ()),
    "nuslerp": ("run", {**two("nuslerp")}, ()),
    "nuslerp_rows": ("run", {**two("nuslerp", nuslerp_flatten=False)}, ()),
    "multislerp": ("run", {**two("multislerp")}, ()),
    "karcher": ("run", plain("karcher", ("{ft1}", "{ft2}", "{ft3}"), base=False), ()),
    "task_arithmetic": ("run", two("task_arithmetic", **{"lambda": 0.8}), ()),
    "ties": ("run", two("ties", density=0.5), ()),
    "ties_bf16": ("run", {**two("ties", density=0.3), "dtype": "bfloat16", "out_dtype": "float16"}, ()),
    "dare_linear": ("run", two("dare_linear", density=0.5), ("--random-seed", "7")),
    "dare_ties": ("run", two("dare_ties", density=0.5), ()),
    "breadcrumbs": ("run", two("breadcrumbs", density=0.8, gamma=0.05), ()),
    "breadcrumbs_ties": ("run", two("breadcrumbs_ties", density=0.8, gamma=0.05), ()),
    "della": ("run", two("della", density=0.5, epsilon=0.1), ()),
    "della_linear": ("run", two("della_linear", density=0.5, epsilon=0.1), ()),
    "sce": ("run", plain("sce", ("{ft1}", "{ft2}", "{ft3}"), select_topk=0.5), ()),
    "sce_all": ("run", plain("sce", ("{ft1}", "{ft2}")), ()),
    "model_stock": ("run", plain("model_stock", ("{ft1}", "{ft2}", "{ft3}")), ()),
    "nearswap": ("run", plain("nearswap", ("{ft1}",), t=0.01), ()),
    "arcee_fusion": ("run", plain("arcee_fusion", ("{ft1}",)), ()),
    "ram": ("run", plain("ram", ("{ft1}", "{ft2}")), ()),
    "ramplus_tl": ("run", plain("ramplus_tl", ("{ft1}", "{ft2}")), ()),
    "tsv": ("run", plain("tsv", ("{ft1}", "{ft2}")), ()),
    "iso_c": ("run", plain("iso_c", ("{ft1}", "{ft2}")), ()),
    "iso_cts": ("run", plain("iso_cts", ("{ft1}", "{ft2}")), ()),
    "lines": ("run", {**two("task_arithmetic"), "post": [{"lines": {"alpha": 0.3, "beta": 0.7}}]}, ()),
    "gradients_filters": (
        "run",
        {
            **plain("ties", ("{ft1}", "{ft2}")),
            "parameters": {
                "weight": [
                    {"filter": "self_attn", "value": [0.2, 0.9]},
                    {"filter": "mlp", "value": 0.5},
                    {"value": 0.7},
                ],
                "density": [1.0, 0.4],
            },
        },
        (),
    ),
    "frankenmerge": (
        "run",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "{ft1}", "layer_range": [0, 3]}]},
                {"sources": [{"model": "{ft2}", "layer_range": [1, 4], "parameters": {"scale": 0.5}}]},
            ],
            "dtype": "float32",
        },
        (),
    ),
    "slices_slerp": (
        "run",
        {
            "merge_method": "slerp",
            "base_model": "{base}",
            "slices": [
                {"sources": [{"model": "{base}", "layer_range": [0, 4]}, {"model": "{ft1}", "layer_range": [0, 4]}]}
            ],
            "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]},
            "dtype": "bfloat16",
        },
        (),
    ),
    "union": (
        "run",
        {
            **plain("linear", ("{base}", "{chatml}", "{llama3}"), base=False, weight=1.0),
            "tokenizer": {"source": "union"},
        },
        (),
    ),
    "tokens": (
        "run",
        {
            **two("ties", density=0.5),
            "models": [{"model": "{chatml}", "parameters": {"weight": 0.5, "density": 0.5}}],
            "tokenizer": {
                "source": "base",
                "tokens": {
                    "<|im_start|>": {"source": {"kind": "model_token", "model": "{chatml}", "token": "<|im_end|>"}},
                    "hello": {"source": {"kind": "zero"}, "force": True},
                    "<|custom|>": {},
                },
            },
        },
        (),
    ),
    "adapter_input": (
        "run",
        two("task_arithmetic") | {"models": [{"model": "{base}+{adapter}", "parameters": {"weight": 1.0}}]},
        (),
    ),
    "as_lora": ("run", two("ties", density=0.5), ("--as-lora", "4")),
    "as_lora_union": (
        "run",
        {**plain("linear", ("{base}", "{chatml}"), weight=1.0), "tokenizer": {"source": "union"}},
        ("--as-lora", "4"),
    ),
    "moe_hidden": ("moe", {"base_model": "{base}", "gate_mode": "hidden", "experts": experts("{ft1}", "{ft2}")}, ()),
    "moe_cheap_embed": (
        "moe",
        {"base_model": "{base}", "gate_mode": "cheap_embed", "experts": experts("{ft1}", "{ft2}", "{ft3}")},
        (),
    ),
    "moe_random": (
        "moe",
        {
            "base_model": "{base}",
            "gate_mode": "random",
            "experts": [{"source_model": "{ft1}", "noise_scale": 0.01}, {"source_model": "{ft2}"}],
        },
        ("--random-seed", "3"),
    ),
    "moe_uniform_random": (
        "moe",
        {
            "base_model": "{base}",
            "gate_mode": "uniform_random",
            "experts": [{"source_model": "{ft1}"}, {"source_model": "{ft2}"}],
        },
        (),
    ),
    "moe_qwen2_shared": (
        "moe",
        {
            "base_model": "{qwen2}",
            "gate_mode": "cheap_embed",
            "experts": experts("{qwen2}", "{qwen2_ft}"),
            "shared_experts": [{"source_model": "{qwen2_ft}", "positive_prompts": ["one two"], "residual_scale": 0.5}],
        },
        (),
    ),
    "moe_qwen3": (
        "moe",
        {"base_model": "{qwen3}", "gate_mode": "hidden_avg", "experts": experts("{qwen3}", "{qwen3_ft}")},
        (),
    ),
    "moe_granite": (
        "moe",
        {"base_model": "{granite}", "gate_mode": "hidden_last", "experts": experts("{granite}", "{granite_ft}")},
        (),
    ),
    "multi": (
        "multi",
        "name: mix\nmerge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n"
        "  - model: {ft2}\n    parameters: {{weight: 0.3}}\ndtype: float32\n---\n"
        "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: mix\n"
        "parameters: {{t: 0.4}}\ndtype: float32\n",
        (),
    ),
}


def fill(recipe: object, zoo: dict[str, Path]) -> str:
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    names = {k: f"./{v.name}" for k, v in zoo.items()}
    if isinstance(recipe, str):
        return text.format(**names)
    for k, v in names.items():
        text = text.replace("{" + k + "}", v)
    return text


def digest(path: Path, root: Path) -> str:
    data = path.read_bytes().replace(str(root).encode(), b"<ROOT>")
    if path.name == "merge_report.json":
        report = json.loads(data)
        report.get("resume", {}).pop("fingerprint", None)
        report.pop("versions", None)
        data = json.dumps(report, sort_keys=True).encode()
    elif path.name in ("config.json", "generation_config.json"):
        config = json.loads(data)
        config.pop("transformers_version", None)
        data = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


CAPABILITY_DEPENDENT = {"arcee_fusion"}  # row softmaxes and logs: torch's vector kernels differ per ISA


def output_hashes(out: Path, root: Path, per_capability: bool = False) -> dict[str, str]:
    """Each file's digest; a capability-dependent case's tensor files and report keyed `name@CAPABILITY`."""
    hashes = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            name = str(p.relative_to(out))
            if per_capability and (name.endswith(".safetensors") or name == "merge_report.json"):  # (its CRCs)
                name = f"{name}@{torch.backends.cpu.get_cpu_capability()}"
            hashes[name] = digest(p, root)
    return hashes


def run_case(name: str, zoo: dict[str, Path]) -> dict[str, str]:
    command, recipe, flags = CASES[name]
    root = zoo["root"]
    work = root / "cases" / name
    work.mkdir(parents=True)
    path = work / "recipe.yml"
    path.write_text(fill(recipe, zoo))
    out = work / "out"
    if command == "multi":
        args = ("multi", path, "-I", work / "stages", "--out-path", out, "--quiet")
    elif command == "moe":
        args = ("moe", path, out, "--quiet", MOE_FLAG, *flags)
    else:
        args = (command, path, out, "--quiet", *flags)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return output_hashes(out, root, per_capability=name in CAPABILITY_DEPENDENT)


def search_hashes(zoo: dict[str, Path]) -> dict[str, str]:
    """search's best recipe and history, with a JSONL task (evaluation in memory)."""
    root = zoo["root"]
    work = root / "cases" / "search"
    work.mkdir(parents=True)
    rows = [{"prompt": "one two", "choices": ["three", "cat"], "label": 0}] * 2
    rows += [{"prompt": "red green", "choices": ["dog", "blue"], "label": 1}] * 2
    (work / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    genome = {
        "genome": {
            "models": ["./ft1", "./ft2"],
            "merge_method": "ties",
            "base_model": "./base",
            "layer_granularity": 2,
        },
        "tasks": [{"path": str(work / "qa.jsonl"), "weight": 1.0}],
    }
    (work / "genome.yml").write_text(yaml.safe_dump(genome))
    result = run_cli(
        "search", work / "genome.yml", "--storage-path", work / "store", "--max-evals", "3",
        "--optimizer", "random", "--random-seed", "5", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    best = work / "store" / "best_config.yaml"
    hashes = {"best_config.yaml": digest(best, root)}
    scores = [json.loads(line)["scores"] for line in (work / "store" / "history.jsonl").read_text().splitlines()]
    hashes["scores"] = hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, str]]:
    found = json.loads(HASHES.read_text()) if HASHES.exists() else {}
    yield found
    if UPDATE:
        HASHES.write_text(json.dumps(dict(sorted(found.items())), indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", [*CASES, "search"])
def test_outputs_are_byte_identical(
    name: str, zoo: dict[str, Path], recorded: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(zoo["root"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's SVD (--as-lora) rounds differently with the thread count
    try:
        got = search_hashes(zoo) if name == "search" else run_case(name, zoo)
    finally:
        torch.set_num_threads(threads)
    if UPDATE:  # keeps what other CPU capabilities recorded
        recorded[name] = {**{k: v for k, v in recorded.get(name, {}).items() if "@" in k}, **got}
        return
    assert name in recorded, f"no recorded hashes for {name}: run with MERGESMITH_SPINE_UPDATE=1"
    want = recorded[name]
    # a capability's tensor hash is checked where it was recorded (CAPABILITY_DEPENDENT)
    files = {f for f in set(got) | set(want) if "@" not in f or (f in got and f in want)}
    changed = sorted(f for f in files if got.get(f) != want.get(f))
    assert not changed, f"{name}: output files changed: {changed}"
