"""`mergesmith moe` as a plan run by `run`'s engine: resumable, audited, one seeded RNG.

Real tiny models, the real CLI. The noise formula (SplitMix64 words, Box-Muller) is written out
here independently of `mergesmith.kernels` and `mergesmith.rng`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, tensors

from mergesmith.toymodels import load_state_dict, make_base, make_finetune, save_state_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")
FLAG = "--i-understand-this-is-not-useful-without-training"
SHARD = "1M"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models big enough (~15 MB each) that an MoE of them spans many 1 MB shards."""
    root = tmp_path_factory.mktemp("moe_big")
    base = make_base(root / "base", layers=6, hidden=256, vocab=1000, seed=0)
    return {"root": root, "base": base, "ft": make_finetune(base, root / "ft", seed=1)}


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def noisy_random(big: dict[str, Path]) -> dict:
    experts = [{"source_model": str(big["ft"]), "noise_scale": 0.01}, {"source_model": str(big["base"])}]
    return {"base_model": str(big["base"]), "gate_mode": "random", "experts": experts}


def embed_gates(big: dict[str, Path], prompts: tuple[str, str]) -> dict:
    experts = [
        {"source_model": str(big[k]), "positive_prompts": [p]} for k, p in zip(("ft", "base"), prompts, strict=True)
    ]
    return {"base_model": str(big["base"]), "gate_mode": "cheap_embed", "experts": experts}


def hashes(directory: Path) -> dict[str, str]:
    """Every file's digest (merge_report.json without the fingerprint over absolute paths)."""
    out = {}
    for p in sorted(directory.iterdir()):
        data = p.read_bytes()
        if p.name == "merge_report.json":
            report = json.loads(data)
            report["resume"].pop("fingerprint")
            data = json.dumps(report, sort_keys=True).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def build(recipe: Path, out: Path, *flags: str) -> dict[str, str]:
    out.parent.mkdir(exist_ok=True)
    result = run_cli("moe", recipe, out, "--quiet", "--out-shard-size", SHARD, "--random-seed", "5", *flags)
    assert result.exit_code == 0, result.output
    return hashes(out)


def staging(out: Path) -> Path:
    return out.parent / f".{out.name}.mergesmith-partial"


def journal(out: Path) -> dict[str, str]:
    try:
        return json.loads((staging(out) / ".mergesmith-journal.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def stamps(directory: Path, files: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each shard, final or still .partial: a reused shard keeps both."""
    found = {}
    for f in files:
        path = next(p for p in (directory / f, directory / f"{f}.partial") if p.exists())
        st = path.stat()
        found[f] = (st.st_ino, st.st_mtime_ns)
    return found


def test_killed_build_resumes_reusing_finished_shards(big, tmp_path):
    recipe = write(tmp_path / "moe.yml", noisy_random(big))
    clean = build(recipe, tmp_path / "clean" / "out")  # the card names the directory
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mergesmith.cli", "moe", str(recipe), str(out), "--quiet"]
    cmd += ["--out-shard-size", SHARD, "--random-seed", "5"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(journal(out)) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # it finished before the kill landed: whole, never partial
        assert hashes(out) == clean
        pytest.skip("the build finished before it could be killed")
    done = sorted(journal(out))
    assert done, "killed before any shard was finished"
    before = stamps(staging(out), done)
    assert build(recipe, out, "--resume") == clean
    assert stamps(out, done) == before  # the finished shards were reused, not written again
    assert not staging(out).exists()


def fail_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """The disk fills after `budget` bytes of output (ENOSPC from the file layer)."""
    real = os.pwrite
    left = [budget]

    def pwrite(fd: int, data, offset: int) -> int:
        n = memoryview(data).nbytes
        if n > left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= n
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_full_disk_mid_build_resumes_byte_identically(big, tmp_path, monkeypatch):
    recipe = write(tmp_path / "moe.yml", noisy_random(big))
    clean = build(recipe, tmp_path / "clean" / "out")  # the card names the directory
    out = tmp_path / "out"
    fail_after(monkeypatch, 6_000_000)
    result = run_cli("moe", recipe, out, "--quiet", "--out-shard-size", SHARD, "--random-seed", "5")
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert not out.exists()
    monkeypatch.undo()
    done = sorted(journal(out))
    assert len(done) >= 3
    before = stamps(staging(out), done)
    assert build(recipe, out, "--resume") == clean
    assert stamps(out, done) == before
    # --resume on the finished output: nothing to do, and said so
    result = run_cli("moe", recipe, out, "--out-shard-size", SHARD, "--random-seed", "5", "--resume")
    assert result.exit_code == 0 and "already complete" in result.output


def test_resume_with_other_gates_writes_everything_again(big, tmp_path, monkeypatch):
    """The gate rows are the only difference (other prompts: the plan and the input files are the
    same), so only their digest in the fingerprint stops stale router rows being reused."""
    first = write(tmp_path / "a.yml", embed_gates(big, ("hello world", "red green blue")))
    second = write(tmp_path / "b.yml", embed_gates(big, ("one two three", "the cat and the dog")))
    clean = build(second, tmp_path / "clean" / "out")
    out = tmp_path / "out"
    fail_after(monkeypatch, 6_000_000)
    assert run_cli("moe", first, out, "--quiet", "--out-shard-size", SHARD, "--random-seed", "5").exit_code == 2
    monkeypatch.undo()
    assert len(journal(out)) >= 3
    assert build(second, out, "--resume") == clean


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_small")
    base = make_base(root / "base", layers=2, hidden=32, vocab=96, seed=0)
    found = {"base": base, "ft": make_finetune(base, root / "ft", seed=1)}
    found["granite"] = make_base(root / "granite", family="granite", layers=2, seed=16)
    nan = root / "nan"
    shutil.copytree(found["ft"], nan)
    state = load_state_dict(nan)
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    state["model.layers.1.mlp.up_proj.weight"][5, 6] = float("inf")
    (nan / "model.safetensors").unlink()
    save_state_dict(nan, state)
    found["nan"] = nan
    return found


def test_nan_in_an_expert_fails_as_run_does(small, tmp_path):
    experts = [{"source_model": str(small["ft"])}, {"source_model": str(small["nan"])}]
    recipe = write(tmp_path / "moe.yml", {"base_model": str(small["base"]), "gate_mode": "random", "experts": experts})
    result = run_cli("moe", recipe, tmp_path / "out", "--quiet")
    numel = load_state_dict(small["nan"])["model.layers.1.mlp.up_proj.weight"].numel()
    assert result.exit_code == 2
    name = "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    assert f"tensor {name}: 2 of {numel} values are NaN or Inf" in result.output
    assert "--allow-nonfinite" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    result = run_cli("moe", recipe, tmp_path / "kept", "--quiet", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kept" / "merge_report.json").read_text())
    assert report["audit"]["nonfinite"] == {name: 2}


# --- the noise: the engine's one RNG --------------------------------------------------------------

GAMMA, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK = (1 << 64) - 1


def splitmix_words(key: int, count: int) -> np.ndarray:
    """The 32-bit words 0 .. count of the stream of `key`: output k (SplitMix64 of key + (k + 1) * gamma)
    gives word 2k (its low half) and 2k + 1 (its high half)."""
    z = (np.arange(1, (count + 1) // 2 + 1, dtype=np.uint64) * np.uint64(GAMMA)) + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    z = z ^ (z >> np.uint64(31))
    words = np.empty(2 * z.size, dtype=np.uint64)
    words[0::2], words[1::2] = z & np.uint64(0xFFFFFFFF), z >> np.uint64(32)
    return words[:count]


def expected_noise(seed: int, tensor: str, model: str, n: int, start: int = 0) -> np.ndarray:
    """Standard normal draws start .. start + n of (seed, output tensor, model): value p from the
    uniforms u = word(2p), v = word(2p + 1) as sqrt(-2 ln(1 - u)) cos(2 pi v), u = (word >> 8) / 2**24."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest(), "little")
    u = (splitmix_words(key, 2 * (start + n))[2 * start :] >> np.uint64(8)).astype(np.float64) / 2**24
    return np.sqrt(-2 * np.log1p(-u[0::2])) * np.cos(2 * math.pi * u[1::2])


def test_noise_is_the_engines_seeded_draw(small, tmp_path):
    ft = str(small["ft"])
    experts = [{"source_model": ft, "noise_scale": 0.02, "residual_scale": 0.5}, {"source_model": str(small["base"])}]
    recipe = write(tmp_path / "moe.yml", {"base_model": str(small["base"]), "gate_mode": "random", "experts": experts})
    for out in ("a", "b"):
        assert run_cli("moe", recipe, tmp_path / out, "--quiet", "--random-seed", "9").exit_code == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible across runs
    src = load_state_dict(small["ft"])
    for proj, w, scale in (("up_proj", "w3", 1.0), ("down_proj", "w2", 0.5)):  # residual_scale: down_proj only
        name = f"model.layers.1.block_sparse_moe.experts.0.{w}.weight"
        x = src[f"model.layers.1.mlp.{proj}.weight"].double()
        z = torch.from_numpy(expected_noise(9, name, ft, x.numel())).view(x.shape)
        assert torch.allclose(a[name].double(), (x + 0.02 * z) * scale, rtol=0, atol=1e-6)
    other = tensors(tmp_path / "a")["model.layers.1.block_sparse_moe.experts.1.w3.weight"]
    assert torch.equal(other, load_state_dict(small["base"])["model.layers.1.mlp.up_proj.weight"])


def test_stacked_copies_of_one_model_get_distinct_noise(small, tmp_path):
    """GraniteMoE stacks every expert's [gate; up] in one tensor: each part is drawn at its own offset,
    so copies of one model (upcycling) do not get the same noise."""
    g = str(small["granite"])
    experts = [{"source_model": g, "noise_scale": 0.01}] * 2
    recipe = write(tmp_path / "moe.yml", {"base_model": g, "gate_mode": "random", "experts": experts})
    assert run_cli("moe", recipe, tmp_path / "out", "--quiet", FLAG).exit_code == 0
    name = "model.layers.0.block_sparse_moe.input_linear.weight"
    got = tensors(tmp_path / "out")[name].double()
    src = load_state_dict(small["granite"])
    gate, up = (src[f"model.layers.0.mlp.{p}.weight"].double() for p in ("gate_proj", "up_proj"))
    n = gate.numel()
    for i in range(2):
        for j, x in enumerate((gate, up)):
            start = (2 * i + j) * n
            z = torch.from_numpy(expected_noise(0, name, g, n, start)).view(x.shape)
            rows = slice(j * x.shape[0], (j + 1) * x.shape[0])
            assert torch.allclose(got[i, rows], x + 0.01 * z, rtol=0, atol=1e-6)
    assert not torch.equal(got[0], got[1])


def test_recipes_cannot_name_the_internal_method(small, tmp_path):
    recipe = {"merge_method": "moe_experts", "models": [{"model": str(small["ft"])}]}
    result = run_cli("run", write(tmp_path / "r.yml", recipe), tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "'moe_experts' is internal to mergesmith" in result.output
    listing = run_cli("methods")
    assert listing.exit_code == 0 and "moe_experts" not in listing.output


def test_the_prepared_plan_names_each_output_tensors_inputs(small):
    """prepare_merge of an MoE config: a PreparedMerge like a recipe's, its gate rows one more model."""
    from mergesmith.moe import MoEConfig
    from mergesmith.moe.prepare import GATES
    from mergesmith.preparation import MergeOptions, prepare_merge

    g, base, ft = str(small["granite"]), str(small["base"]), str(small["ft"])
    config = MoEConfig.model_validate(
        {
            "base_model": base,
            "gate_mode": "random",
            "experts": [{"source_model": ft, "noise_scale": 0.1}, {"source_model": base}],
        }
    )
    plan, models = prepare_merge(config, MergeOptions())
    assert set(models) == {base, ft, GATES} and models[GATES].digest is not None
    by = {t.name: t for t in plan.tensors}
    noisy = by["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert noisy.method == "moe_experts" and noisy.per_model["noise_scale"] == (0.1,)
    assert [(x.model, x.name) for x in noisy.inputs] == [(ft, "model.layers.0.mlp.gate_proj.weight")]
    plain = by["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    assert plain.method == "passthrough" and plain.inputs[0].model == base
    router = by["model.layers.1.block_sparse_moe.gate.weight"]
    assert router.method == "passthrough" and router.inputs[0].model == GATES and router.shape == (2, 32)
    config = MoEConfig.model_validate({"base_model": g, "gate_mode": "random", "experts": [{"source_model": g}] * 2})
    plan, _ = prepare_merge(config, MergeOptions(allow_identical_experts=True))
    fused = next(t for t in plan.tensors if t.name == "model.layers.1.block_sparse_moe.input_linear.weight")
    names = [x.name.split(".")[-2] for x in fused.inputs]
    assert fused.method == "moe_experts" and fused.params == {"dim": 0} and names == ["gate_proj", "up_proj"] * 2
