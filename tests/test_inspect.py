"""`mergesmith inspect`: every figure of the JSON against float64 NumPy written here, the findings,
the recipe mode, chunked streaming, errors, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergesmith.toymodels import load_state_dict, make_base, make_finetune, make_vocab_variant, save_state_dict
from tests.conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent))
from browser import load_page  # noqa: E402

LAYERS = 3
DENSITY = 0.2


def _derived(base: Path, directory: Path, state: dict[str, torch.Tensor]) -> Path:
    """A model with `base`'s config and tokenizer and the given weights."""
    directory.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            shutil.copyfile(f, directory / f.name)
    save_state_dict(directory, state)
    return directory


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base; two fine-tunes (one .bin); one that undoes ft1 in layer 1; one from another random base;
    one with a bigger vocabulary; and a linear merge of the two fine-tunes."""
    root = tmp_path_factory.mktemp("inspect")
    base = make_base(root / "base", layers=LAYERS, hidden=32, vocab=96, seed=0)
    ft1 = make_finetune(base, root / "ft1", seed=1, scale=0.002)
    ft2 = make_finetune(base, root / "ft2", seed=2, scale=0.002, fmt="bin")
    b, s1 = load_state_dict(base), load_state_dict(ft1)
    gen = torch.Generator().manual_seed(3)
    fight = {}
    for name, t in b.items():
        noise = torch.randn(t.shape, generator=gen) * 0.002
        fight[name] = t - (s1[name] - t) + 0.3 * noise if ".layers.1." in name else t + noise
    out = {
        "base": base,
        "ft1": ft1,
        "ft2": ft2,
        "fight": _derived(base, root / "fight", fight),
        "other": make_base(root / "other", layers=LAYERS, hidden=32, vocab=96, seed=7),
        "vocab": make_vocab_variant(base, root / "vocab", seed=4, added=("<|im_start|>", "<|im_end|>"), scale=0.002),
    }
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.7}},
            {"model": str(ft2), "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
    }
    (root / "linear.yml").write_text(yaml.safe_dump(recipe))
    assert run_cli("run", root / "linear.yml", root / "merged", "--quiet").exit_code == 0
    out["merged"] = root / "merged"
    return out


def mergesmith(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script, as users run it (PYTHONPATH inherited)."""
    exe = shutil.which("mergesmith")
    cmd = [exe] if exe else [sys.executable, "-m", "mergesmith.cli"]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ the independent computation


def module_of(name: str) -> str:
    if "norm" in name:
        return "norms"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings"
    return "attention" if "self_attn" in name else "mlp"


def expected(models: dict[str, Path], names: list[str], density: float | dict[str, float], merged: Path | None) -> dict:
    """Per group (overall, layer i, and each with its modules): every figure, in float64."""
    base = {k: v.double().numpy() for k, v in load_state_dict(models["base"]).items()}
    states = [{k: v.double().numpy() for k, v in load_state_dict(models[n]).items()} for n in names]
    merge = {k: v.double().numpy() for k, v in load_state_dict(merged).items()} if merged else None
    groups: dict[tuple, dict[str, list]] = {}
    spectra = {}
    for name, b in base.items():
        rows = min(b.shape[0], *(s[name].shape[0] for s in states))
        b = b[:rows]
        deltas = [s[name][:rows] - b for s in states]
        layer = re.search(r"\.layers\.(\d+)\.", name)
        keys = [("all",), ("all", module_of(name))]
        if layer:
            keys += [(int(layer[1]),), (int(layer[1]), module_of(name))]
        dens = density if isinstance(density, float) else density[name]
        kept = []
        for d in deltas:
            mags = np.sort(np.abs(d).ravel())[::-1]
            kept.append(mags[: math.floor(dens * mags.size)].sum())
        for key in keys:
            g = groups.setdefault(key, {"b": [], "d": [[] for _ in names], "kept": [[] for _ in names], "m": []})
            g["b"].append(b.ravel())
            for i, d in enumerate(deltas):
                g["d"][i].append(d.ravel())
                g["kept"][i].append(kept[i])
            if merge is not None:
                g["m"].append(merge[name][:rows].ravel() - b.ravel())
        if b.ndim == 2:
            spectra[name] = (
                [np.linalg.svd(d, full_matrices=False) for d in deltas],
                np.linalg.svd(sum(deltas), compute_uv=False),
            )
    out = {}
    np.seterr(invalid="ignore", divide="ignore")  # a zero task vector (the foreign base's norms) has no cosine
    for key, g in groups.items():
        b = np.concatenate(g["b"])
        d = np.stack([np.concatenate(x) for x in g["d"]])
        s = d.sum(0)
        against = np.where(s < 0, d > 0, d < 0)
        fig = {
            "norm": np.linalg.norm(d, axis=1) / np.linalg.norm(b),
            "cosine": (d @ d.T) / np.outer(np.linalg.norm(d, axis=1), np.linalg.norm(d, axis=1)),
            "base_cosine": [(b @ (b + x)) / (np.linalg.norm(b) * np.linalg.norm(b + x)) for x in d],
            "conflict": (np.abs(d) * against).sum() / np.abs(d).sum(),
            "conflict_per_model": (np.abs(d) * against).sum(1) / np.abs(d).sum(1),
            "kept": np.array([sum(k) for k in g["kept"]]) / np.abs(d).sum(1),
        }
        if g["m"]:
            m = np.concatenate(g["m"])
            fig["toward"] = (d @ m) / (d * d).sum(1)
            fig["merged_cosine"] = (d @ m) / (np.linalg.norm(d, axis=1) * np.linalg.norm(m))
        out[key] = fig
    return {"groups": out, "spectra": spectra}


def arr(x: object) -> np.ndarray:
    """JSON figures as floats, null (undefined: a zero task vector) as NaN."""
    return np.array(x, dtype=float)


def check_group(got: dict, want: dict) -> None:
    with np.errstate(invalid="ignore", divide="ignore"):
        close = np.testing.assert_allclose
        close(arr(got["norm"]), want["norm"], rtol=1e-5)
        close(arr(got["cosine"]), want["cosine"], atol=2e-5)
        close(arr(got["base_cosine"]), want["base_cosine"], atol=1e-5)
        close(arr(got["sign_conflict"]["rate"]), want["conflict"], rtol=1e-4, atol=1e-6)
        close(arr(got["sign_conflict"]["per_model"]), want["conflict_per_model"], rtol=1e-4, atol=1e-6)
        # bins are 0.4% wide; a cut inside a bin counts its values at the bin's middle
        close(arr(got["kept_mass"]["kept"]), want["kept"], atol=2e-3)
        if "toward" in want:
            close(arr(got["merged"]["toward"]), want["toward"], rtol=1e-4, atol=1e-5)
            close(arr(got["merged"]["cosine"]), want["merged_cosine"], atol=1e-5)


NAMES = ["ft1", "ft2", "fight", "other"]


@pytest.fixture(scope="module")
def cli_report(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """Run where the models are, by relative names (short names on the page)."""
    out = tmp_path_factory.mktemp("inspect-out")
    args = ["inspect", "--base", "base", *NAMES, "--density", DENSITY, "--merged", "merged"]
    done = mergesmith(*args, "--json", out / "r.json", "--html", out / "r.html", "--quiet", cwd=zoo["base"].parent)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "r.json").read_text()), done.stdout, out


def test_every_figure_matches_an_independent_computation(
    zoo: dict[str, Path], cli_report: tuple[dict, str, Path]
) -> None:
    report, stdout, _ = cli_report
    assert report["models"] == NAMES and report["base"] == "base" and report["merged"] == "merged"
    assert [g["index"] for g in report["layers"]] == list(range(LAYERS))
    want = expected(zoo, NAMES, DENSITY, zoo["merged"])
    groups = want["groups"]
    check_group(report["overall"], groups[("all",)])
    for module, fig in report["overall"]["modules"].items():
        check_group(fig, groups[("all", module)])
    for layer in report["layers"]:
        check_group(layer, groups[(layer["index"],)])
        assert set(layer["modules"]) == {"attention", "mlp", "norms"}
        for module, fig in layer["modules"].items():
            check_group(fig, groups[(layer["index"], module)])
    assert report["overall"]["kept_mass"]["density"] == pytest.approx([DENSITY] * len(NAMES))
    # spectra: the sketch is exact when its rank reaches the matrix's smaller side (these do)
    assert {e["tensor"] for e in report["spectra"]} == set(want["spectra"])
    for e in report["spectra"]:
        svds, sum_sigma = want["spectra"][e["tensor"]]
        for i, (u, s, _) in enumerate(svds):
            np.testing.assert_allclose(e["sigma"][i], s[: len(e["sigma"][i])], rtol=1e-4, atol=1e-7)
            energy = np.cumsum(s**2) / (s**2).sum()
            assert e["rank90"][i] == int(np.searchsorted(energy, 0.9 * (1 - 1e-6)) + 1)
            for j, (u2, _, _) in enumerate(svds):
                overlap = (np.linalg.norm(u[:, :8].T @ u2[:, :8]) ** 2) / 8
                assert e["overlap"][i][j] == pytest.approx(overlap, abs=2e-3)
        np.testing.assert_allclose(e["sigma_sum"], sum_sigma[: len(e["sigma_sum"])], rtol=1e-4, atol=1e-7)
    assert report["overall"]["spectra"]["energy_top"] == pytest.approx([1.0] * len(NAMES), abs=1e-5)
    assert "layer" in stdout and "findings:" in stdout


def test_findings_name_the_foreign_base_the_fight_and_the_density(
    cli_report: tuple[dict, str, Path], zoo: dict
) -> None:
    report, stdout, _ = cli_report
    found = report["findings"]
    foreign = [s for s in found if s.startswith("other does not share the base base:")]
    assert len(foreign) == 1 and "near zero in every layer" in foreign[0]
    assert report["overall"]["modules"]["mlp"]["base_cosine"][3] == pytest.approx(0.0, abs=0.1)
    fight = [s for s in found if "pull against each other" in s]
    assert len(fight) == 1 and fight[0].startswith("layer 1: ft1 and fight pull against each other")
    assert report["layers"][1]["cosine"][0][2] < -0.9
    low = [s for s in found if s.startswith(f"density {DENSITY:g} keeps only")]
    assert len(low) == 3  # ft1, ft2 and fight; the foreign model is reported as such instead
    assert any(
        s.startswith("the merge merged moved 0.70 of the way towards ft1, 0.30 of the way towards ft2") for s in found
    )
    for sentence in found:
        assert sentence in stdout


def test_chunked_streaming_equals_whole_tensors(
    zoo: dict, cli_report: tuple[dict, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors read a few rows at a time (the sketch fed in pieces) give the same report."""
    from mergesmith.inspect import survey as survey_module
    from mergesmith.inspect.inputs import from_models
    from mergesmith.inspect.report import build_report

    monkeypatch.setattr(survey_module, "CHUNK", 200)  # 6 rows of 32 elements, 3 of 64
    subject = from_models(
        str(zoo["base"]), [str(zoo[n]) for n in NAMES], merged=str(zoo["merged"]), density=DENSITY, cache_dir=None
    )
    small = build_report(survey_module.survey(subject), 32)
    whole = cli_report[0]
    for got, want in [(small["overall"], whole["overall"]), *zip(small["layers"], whole["layers"], strict=True)]:
        np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-6)
        np.testing.assert_allclose(
            np.array(got["cosine"], dtype=float), np.array(want["cosine"], dtype=float), atol=1e-6
        )
        np.testing.assert_allclose(arr(got["kept_mass"]["kept"]), arr(want["kept_mass"]["kept"]), atol=1e-6)
        np.testing.assert_allclose(
            arr(got["sign_conflict"]["per_model"]), arr(want["sign_conflict"]["per_model"]), atol=1e-6
        )
        np.testing.assert_allclose(got["spectra"]["overlap"], want["spectra"]["overlap"], atol=1e-4)
    for a, b in zip(small["spectra"], whole["spectra"], strict=True):
        np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-4, atol=1e-7)


def test_recipe_mode_uses_the_recipes_densities_and_reports_a_tokenizer_mismatch(zoo: dict, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(zoo["base"]),
        "models": [
            {
                "model": str(zoo["ft1"]),
                "parameters": {"weight": 0.5, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]},
            },
            {"model": str(zoo["vocab"]), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
    }
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(recipe))
    done = mergesmith("inspect", "ties.yml", "--json", "r.json", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["models"] == [str(zoo["ft1"]), str(zoo["vocab"])] and report["method"] == "ties"
    names = load_state_dict(zoo["base"])
    dens = {n: 0.3 if "self_attn" in n else 0.8 for n in names}
    want = expected(zoo, ["ft1"], dens, None)["groups"]
    for layer in report["layers"]:
        np.testing.assert_allclose(
            layer["modules"]["attention"]["kept_mass"]["kept"][0],
            want[(layer["index"], "attention")]["kept"][0],
            atol=2e-3,
        )
        assert layer["modules"]["attention"]["kept_mass"]["density"] == pytest.approx([0.3, 0.6])
        assert layer["modules"]["mlp"]["kept_mass"]["density"] == pytest.approx([0.8, 0.6])
    np.testing.assert_allclose(report["overall"]["kept_mass"]["kept"][0], want[("all",)]["kept"][0], atol=2e-3)
    assert report["vocab_rows"]["model.embed_tokens.weight"] == {"compared": 96, "base": 96}  # the variant has 98 rows
    assert report["tokenizers"][str(zoo["ft1"])] is None
    mismatch = [s for s in report["findings"] if "tokenizer differs" in s]
    assert len(mismatch) == 1 and mismatch[0].startswith(
        f"{zoo['vocab']}'s tokenizer differs from the base's (2 token(s) the base lacks"
    )
    assert "tokenizer:" in mismatch[0] and mismatch[0] in done.stdout


def test_the_page_renders_in_headless_chromium(cli_report: tuple[dict, str, Path]) -> None:
    report, _, out = cli_report
    page = (out / "r.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page) and "url(" not in page  # nothing to fetch
    probe = """({
      rendered: document.body.getAttribute("data-rendered"),
      plots: document.querySelectorAll("svg.plot").length,
      cosineCells: document.querySelectorAll("#heat-cosine rect.cell").length,
      normCells: document.querySelectorAll("#heat-norm rect.cell").length,
      lines: ["line-norm", "line-cosine", "line-conflict", "line-kept", "line-energy", "line-toward", "curve-kept"].map(
        function (id) { var e = document.getElementById(id); return e ? e.querySelectorAll("path.series").length : -1; }),
      spectra: document.querySelectorAll("#spectra svg.plot").length,
      spectraLayer: document.getElementById("spectra-layer").value,
      findings: Array.prototype.map.call(document.querySelectorAll("#findings li"), function (li) { return li.textContent; }),
      firstHeading: document.querySelector("h2").textContent
    })"""
    result = load_page(out / "r.html", probe)
    (out / "inspect.png").write_bytes(result.screenshot)
    assert result.errors == []
    v = result.value
    k, layers = len(report["models"]), len(report["layers"])
    assert v["cosineCells"] == layers * k * (k - 1) // 2 and v["normCells"] == layers * k
    pairs = k * (k - 1) // 2
    assert v["lines"] == [k, pairs, k + 1, k, k + 1, k, k]
    per_layer = sum(1 for e in report["spectra"] if e["layer"] == 1)
    assert v["spectraLayer"] == "1" and v["spectra"] == per_layer == 7
    assert v["plots"] == int(v["rendered"]) == 2 + 7 + per_layer
    assert v["firstHeading"] == "Findings" and v["findings"] == report["findings"]
    assert result.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(result.screenshot) > 20_000
    if os.environ.get("MERGESMITH_SCREENSHOT"):  # how docs/inspect.png is made
        Path(os.environ["MERGESMITH_SCREENSHOT"]).write_bytes(result.screenshot)


def test_bad_inputs_are_clear_errors_and_leave_no_file(zoo: dict, tmp_path: Path) -> None:
    small = make_base(tmp_path / "small", layers=LAYERS, hidden=16, vocab=96, seed=0)
    cases = [
        (["--base", zoo["base"], small], "shape mismatch with the base"),
        (["--base", zoo["base"]], "give the task models"),
        (["--base", zoo["base"], tmp_path / "nowhere"], "model directory not found"),
        (["--base", zoo["base"], zoo["ft1"], "--density", "1.5"], "--density: density must be in (0, 1]"),
    ]
    (tmp_path / "nobase.yml").write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(zoo["ft1"])}]})
    )
    cases.append(([tmp_path / "nobase.yml"], "nobase.yml: base_model: inspect compares task vectors with a base model"))
    for args, message in cases:
        result = run_cli("inspect", *args, "--json", tmp_path / "r.json", "--quiet")
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "r.json").exists()
    result = run_cli("inspect", "--base", zoo["base"], zoo["ft1"], "--json", tmp_path / "no" / "r.json", "--quiet")
    assert result.exit_code == 2 and "cannot write" in result.output
    assert not list((tmp_path).glob("**/.r.json.partial"))
