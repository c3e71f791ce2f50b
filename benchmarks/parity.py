"""Tensor parity with mergekit: run the same recipes through `mergekit-yaml` and mergesmith, compare outputs.

Builds a tiny float32 Llama-style base and three fine-tunes (float32 so both tools compute in float32 and
differences are pure arithmetic order), then for each recipe runs both tools and prints one table row:
tensors compared, max abs / max relative difference, tensors with an element off by more than `REL_TOL`
relative, names missing on either side, config.json differences.

    python benchmarks/parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml [--keep DIR] [--only ties,slerp]

mergekit is run as a black box (its CLI); it must be installed separately (e.g. in a venv).
Random methods (DARE, DELLA) are compared by structure only: names, shapes, dtypes, and the fraction of
elements left equal to the base, which must agree within 5 standard deviations of binomial noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from mergesmith.toymodels import load_state_dict, make_base, make_finetune  # noqa: E402

REL_TOL = 1e-5
CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "tie_word_embeddings", "torch_dtype", "dtype")


def build_models(root: Path) -> dict[str, str]:
    base = make_base(root / "base", layers=4, hidden=64, vocab=128, seed=0, dtype=torch.float32)
    models = {"base": base}
    for i in (1, 2, 3):
        models[f"ft{i}"] = make_finetune(base, root / f"ft{i}", seed=i, scale=0.02)
    for d in models.values():  # toymodels saves a bare config; mergekit needs `architectures`
        cfg = json.loads((d / "config.json").read_text())
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return {k: str(v) for k, v in models.items()}


def recipes(m: dict[str, str]) -> dict[str, tuple[dict, str]]:
    """name -> (recipe, kind); kind is "exact" (values compared) or "random" (structure only)."""
    b, f1, f2, f3 = m["base"], m["ft1"], m["ft2"], m["ft3"]
    fts = [f1, f2, f3]

    def models(params=None, with_base=False):
        out = [{"model": b}] if with_base else []
        for i, f in enumerate(fts):
            p = params(i) if params else None
            out.append({"model": f, "parameters": p} if p else {"model": f})
        return out

    weights = (1.0, 0.5, 0.25)
    r: dict[str, tuple[dict, str]] = {}
    r["linear"] = (
        {"merge_method": "linear", "models": models(lambda i: {"weight": weights[i]}), "dtype": "float32"},
        "exact",
    )
    r["linear_nonorm"] = (
        {
            "merge_method": "linear",
            "models": models(lambda i: {"weight": weights[i]}),
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "exact",
    )
    r["slerp_gradient"] = (
        {
            "merge_method": "slerp",
            "base_model": b,
            "slices": [
                {
                    "sources": [
                        {"model": b, "layer_range": [0, 4]},
                        {"model": f1, "layer_range": [0, 4]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "exact",
    )
    tv = {"weight": 0.5}
    r["task_arithmetic"] = (
        {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": models(lambda i: {"weight": [0.7, 0.5, 0.3][i]}),
            "dtype": "float32",
        },
        "exact",
    )
    # density on a method whose mergekit definition has no sparsification step
    r["task_arithmetic_density_0.5"] = (
        {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": models(lambda i: {"weight": [0.7, 0.5, 0.3][i], "density": 0.5}),
            "dtype": "float32",
        },
        "exact",
    )
    r["ties"] = (
        {
            "merge_method": "ties",
            "base_model": b,
            "models": models(lambda i: {"density": 0.5, "weight": [1.0, 0.5] if i == 0 else 0.6}),
            "dtype": "float32",
        },
        "exact",
    )
    for name in ("dare_ties", "dare_linear"):
        r[name] = (
            {
                "merge_method": name,
                "base_model": b,
                "models": models(lambda i: {"density": 0.5, **tv}),
                "dtype": "float32",
            },
            "random",
        )
    r["breadcrumbs_ties"] = (
        {
            "merge_method": "breadcrumbs_ties",
            "base_model": b,
            "models": models(lambda i: {"density": 0.7, "gamma": 0.05, **tv}),
            "dtype": "float32",
        },
        "exact",
    )
    # SPEC §9.3 probe: default gamma 0.01 on the 64-element norms gives floor(gamma*N) = 0.
    r["breadcrumbs_ties_gamma_default"] = (
        {
            "merge_method": "breadcrumbs_ties",
            "base_model": b,
            "models": models(lambda i: {"density": 0.7, **tv}),
            "dtype": "float32",
        },
        "exact",
    )
    # SPEC §9.3 probe: density 0.01 on the 64-element norms gives floor(density*N) = 0 kept elements.
    r["ties_density_0.01"] = (
        {
            "merge_method": "ties",
            "base_model": b,
            "models": models(lambda i: {"density": 0.01, **tv}),
            "dtype": "float32",
        },
        "exact",
    )
    r["della"] = (
        {
            "merge_method": "della",
            "base_model": b,
            "models": models(lambda i: {"density": 0.5, "epsilon": 0.1, **tv}),
            "dtype": "float32",
        },
        "random",
    )
    r["model_stock"] = (
        {"merge_method": "model_stock", "base_model": b, "models": models(), "dtype": "float32"},
        "exact",
    )
    r["nearswap"] = (
        {
            "merge_method": "nearswap",
            "base_model": b,
            "models": [{"model": f1}],
            "parameters": {"t": 0.01},
            "dtype": "float32",
        },
        "exact",
    )
    r["sce"] = (
        {
            "merge_method": "sce",
            "base_model": b,
            "models": models(),
            "parameters": {"select_topk": 0.5},
            "dtype": "float32",
        },
        "exact",
    )
    r["ram"] = ({"merge_method": "ram", "base_model": b, "models": models(), "dtype": "float32"}, "exact")
    r["multislerp"] = (
        {
            "merge_method": "multislerp",
            "base_model": b,
            "models": models(lambda i: {"weight": weights[i]}),
            "dtype": "float32",
        },
        "exact",
    )
    r["karcher"] = ({"merge_method": "karcher", "models": models(), "dtype": "float32"}, "exact")
    for rw in (False, True):
        r[f"nuslerp_rowwise_{str(rw).lower()}"] = (
            {
                "merge_method": "nuslerp",
                "base_model": b,
                "models": [{"model": f1, "parameters": {"weight": 0.7}}, {"model": f2, "parameters": {"weight": 0.3}}],
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": rw},
                "dtype": "float32",
            },
            "exact",
        )
    r["arcee_fusion"] = (
        {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": f1}], "dtype": "float32"},
        "exact",
    )
    r["passthrough_slices"] = (
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": f1, "layer_range": [0, 3]}]},
                {
                    "sources": [
                        {
                            "model": f2,
                            "layer_range": [1, 4],
                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                        }
                    ]
                },
            ],
            "dtype": "float32",
        },
        "exact",
    )
    r["karcher_unlisted_base"] = (
        {"merge_method": "karcher", "base_model": b, "models": models(), "dtype": "float32"},
        "exact",
    )
    r["ties_unlisted_base"] = (
        {
            "merge_method": "ties",
            "base_model": b,
            "models": models(lambda i: {"density": 0.5, "weight": 0.5}),
            "dtype": "float32",
        },
        "exact",
    )
    return r


def run_mergekit(exe: str, recipe_path: Path, out: Path) -> tuple[bool, str]:
    cmd = [exe, str(recipe_path), str(out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, (p.stderr or p.stdout).strip().splitlines()[-1:] and (p.stderr or p.stdout).strip()


def run_mergesmith(recipe_path: Path, out: Path) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mergesmith.cli", "run", str(recipe_path), str(out)]
    cmd += ["--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return p.returncode == 0, (p.stderr or p.stdout).strip()


def diff_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, bool]:
    """(max abs diff, max abs diff / max |b|, any element off by > REL_TOL relative)."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf"), float("inf"), True
    d = (a - b).abs()
    scale = b.abs().max().item()
    rel = d.max().item() / max(scale, 1e-30)
    off = bool((d > REL_TOL * torch.maximum(a.abs(), b.abs()) + 1e-7 * scale).any())
    return d.max().item(), rel, off


def frac_equal(t: torch.Tensor, ref: torch.Tensor | None) -> float:
    if ref is None or ref.shape != t.shape:
        return float("nan")
    return (t == ref).double().mean().item()


def compare(mk: Path, ms: Path, kind: str, base: dict[str, torch.Tensor]) -> dict:
    A, B = load_state_dict(ms), load_state_dict(mk)
    common = sorted(set(A) & set(B))
    row = {
        "tensors": len(common),
        "only_mergesmith": sorted(set(A) - set(B)),
        "only_mergekit": sorted(set(B) - set(A)),
        "max_abs": 0.0,
        "max_rel": 0.0,
        "n_off": 0,
        "off": [],
    }
    for n in common:
        if kind == "random":  # structure only: shape, dtype, and the share of elements kept at the base value
            fa, fb = frac_equal(A[n], base.get(n)), frac_equal(B[n], base.get(n))
            p, k = (fa + fb) / 2, A[n].numel()
            tol = 5 * (2 * p * (1 - p) / k) ** 0.5 + 1e-3  # 5 sigma of the difference of two samples
            bad = A[n].shape != B[n].shape or A[n].dtype != B[n].dtype or abs(fa - fb) > tol
            row["max_abs"] = max(row["max_abs"], abs(fa - fb))
            if bad:
                row["n_off"] += 1
                row["off"].append((n, abs(fa - fb), float("nan")))
            continue
        mabs, rel, off = diff_tensors(A[n], B[n])
        if A[n].dtype != B[n].dtype:
            off = True
        row["max_abs"] = max(row["max_abs"], mabs)
        row["max_rel"] = max(row["max_rel"], rel)
        if off:
            row["n_off"] += 1
            row["off"].append((n, mabs, rel))
    ca = json.loads((ms / "config.json").read_text())
    cb = json.loads((mk / "config.json").read_text())
    row["config"] = {k: (ca.get(k), cb.get(k)) for k in CONFIG_KEYS if ca.get(k) != cb.get(k)}
    return row


def fmt_row(name: str, kind: str, row: dict) -> str:
    if "error" in row:
        return f"| {name} | {kind} | – | – | – | – | – | {row['error']} |"
    missing = []
    if row["only_mergesmith"]:
        missing.append(f"only mergesmith: {', '.join(row['only_mergesmith'])}")
    if row["only_mergekit"]:
        missing.append(f"only mergekit: {', '.join(row['only_mergekit'])}")
    cfg = "; ".join(f"{k}: ms={a!r} mk={b!r}" for k, (a, b) in row["config"].items())
    if kind == "random":
        mabs, mrel = f"kept-frac Δ {row['max_abs']:.3f}", "n/a"
    else:
        mabs, mrel = f"{row['max_abs']:.2e}", f"{row['max_rel']:.2e}"
    return (
        f"| {name} | {kind} | {row['tensors']} | {mabs} | {mrel} | {row['n_off']} | "
        f"{'; '.join(missing) or '–'} | {cfg or '–'} |"
    )


HEADER = (
    "| recipe | kind | tensors | max abs diff | max rel diff | tensors off >1e-5 rel | missing names | config.json diffs |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", default=os.environ.get("MERGESMITH_MERGEKIT", "mergekit-yaml"))
    ap.add_argument("--keep", type=Path, help="keep models, recipes and outputs in this directory")
    ap.add_argument("--only", help="comma-separated recipe names")
    ap.add_argument("--details", action="store_true", help="list the differing tensors of every recipe")
    args = ap.parse_args()
    if shutil.which(args.mergekit) is None and not Path(args.mergekit).exists():
        print(f"mergekit-yaml not found: {args.mergekit}", file=sys.stderr)
        return 2
    root = args.keep or Path(tempfile.mkdtemp(prefix="parity-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        m = build_models(root / "models")
        base = load_state_dict(m["base"])
        todo = recipes(m)
        if args.only:
            todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
        lines, details = [HEADER], []
        for name, (recipe, kind) in todo.items():
            rp = root / f"{name}.yml"
            rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
            mk, ms = root / "out" / f"{name}.mergekit", root / "out" / f"{name}.mergesmith"
            t0 = time.perf_counter()
            ok_mk, err_mk = run_mergekit(args.mergekit, rp, mk)
            t1 = time.perf_counter()
            ok_ms, err_ms = run_mergesmith(rp, ms)
            t2 = time.perf_counter()
            if not (ok_mk and ok_ms):
                row = {
                    "error": f"mergekit: {'ok' if ok_mk else err_mk.splitlines()[-1][:150]} / "
                    f"mergesmith: {'ok' if ok_ms else err_ms.splitlines()[-1][:150]}"
                }
            else:
                row = compare(mk, ms, kind, base)
                for n, mabs, rel in row["off"]:
                    details.append(f"{name}: {n} abs {mabs:.3e} rel {rel:.3e}")
            lines.append(fmt_row(name, kind, row))
            print(lines[-1], f"  (mergekit {t1 - t0:.1f}s, mergesmith {t2 - t1:.1f}s)", file=sys.stderr)
        print("\n".join(lines))
        if args.details and details:
            print("\nTensors off by more than 1e-5 relative:")
            print("\n".join(details))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
