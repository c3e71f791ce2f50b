"""The published-recipe corpus (tests/corpus/) through mergekit 0.1.5 and mergesmith: are the outputs equal?

Each recipe's models are replaced by the same generated stand-ins for both tools (tests/corpus_harness.py),
then `mergekit-yaml` / `mergekit-moe` / `mergekit-multi` and the `mergesmith` console script run it, and
one table row per recipe says whether both ran and how far apart the tensors are.

    python -m venv --system-site-packages /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit==0.1.5
    python benchmarks/corpus.py --mergekit /tmp/mkvenv/bin [--only 001,027] [--keep DIR] [--markdown FILE]

"equal" means every tensor of both outputs has the same name, shape and dtype and agrees to within
four roundings of the output dtype (of the tensor's largest value); "elements differ" gives the share
of elements beyond that (a magnitude cut that kept different elements, equal magnitudes ordered
differently; mergekit computes in the recipe's dtype, mergesmith in float32: docs/methods.md). Random methods (DARE, DELLA) are compared by the share of elements left at the
base's value, as benchmarks/parity.py does. MoE routers drawn at random are compared by shape only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from corpus_harness import Outcome, Recipe, StandIns, corpus, run_recipe, stand_in  # noqa: E402

from mergesmith.toymodels import load_state_dict  # noqa: E402

RANDOM = ("dare", "della")
TOL_ULP = 4  # mergekit rounds every step to the recipe's dtype: a few roundings apart is "equal"
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-23}


def run_mergekit(bin_dir: Path, recipe: Recipe, text: str, work: Path) -> tuple[int, str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{recipe.name}.yml"
    path.write_text(text, encoding="utf-8")
    out = work / "out"
    if recipe.kind == "multi":
        cmd = [str(bin_dir / "mergekit-multi"), str(path), "--intermediate-dir", str(work / "stages")]
        cmd += ["--out-path", str(out)]
    elif recipe.kind == "moe":
        cmd = [str(bin_dir / "mergekit-moe"), str(path), str(out), "--random-seed", "0"]
    else:
        cmd = [str(bin_dir / "mergekit-yaml"), str(path), str(out), "--lora-merge-cache", str(work / "lora-cache")]
        cmd += ["--random-seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    return (
        p.returncode,
        (p.stderr or p.stdout).strip().splitlines()[-1:][0] if (p.stderr or p.stdout).strip() else "",
        out,
    )


def final_stage(text: str) -> str | None:
    """The last stage's name when every document of a multi-stage file is named (no unnamed final)."""
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    return str(docs[-1]["name"]) if docs and all(d.get("name") for d in docs) else None


def compare(a: Path, b: Path, random: bool) -> tuple[str, str]:
    """(verdict, detail) for mergesmith's output `a` against mergekit's `b`."""
    A, B = load_state_dict(a), load_state_dict(b)
    if set(A) != set(B):
        only_a, only_b = sorted(set(A) - set(B)), sorted(set(B) - set(A))
        return "differs", f"names: only mergesmith {only_a[:3]}, only mergekit {only_b[:3]}"
    worst, worst_name, dtype_diff, off, total = 0.0, "", [], 0, 0
    for n in A:
        x, y = A[n], B[n]
        if x.shape != y.shape:
            return "differs", f"{n}: shape {list(x.shape)} vs {list(y.shape)}"
        if x.dtype != y.dtype:
            dtype_diff.append(n)
        if random or "gate.weight" in n and "experts" not in n:
            continue
        scale = max(x.abs().max().item(), y.abs().max().item(), 1e-30) * ULP.get(x.dtype, 2**-23)
        d = (x.double() - y.double()).abs() / scale
        off += int((d > TOL_ULP).sum())
        total += d.numel()
        if d.max().item() > worst:
            worst, worst_name = d.max().item(), n
    if random:
        return "same structure", "random masks (DARE, DELLA, random gates) are drawn differently by design"
    if dtype_diff:
        e = dtype_diff[0]
        return "differs", f"dtype of {len(dtype_diff)} tensors, e.g. {e}: {A[e].dtype} vs {B[e].dtype}"
    if worst == 0:
        return "identical", ""
    if off == 0:
        return "equal", f"max {worst:.1f} ulp of the tensor's scale"
    return (
        "elements differ",
        f"{100 * off / total:.3f}% of elements beyond {TOL_ULP} ulp (max {worst:.0f}, {worst_name})",
    )


def earlier(root: Path, recipe: Recipe) -> tuple[int, str, Path, Outcome]:
    """The outputs of an earlier run kept in `root` (a missing config.json counts as a refusal)."""
    mk_out, ms_out = root / "mergekit" / recipe.name / "out", root / "mergesmith" / recipe.name / "out"
    final = ms_out.parent / "stages"
    ms_done = (ms_out / "config.json").exists() or (recipe.kind == "multi" and final.exists())
    return 0, "", mk_out, Outcome(0 if ms_done else 2, "(kept output)", ms_out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", type=Path, required=True, help="directory holding mergekit-yaml, -moe, -multi")
    ap.add_argument("--only", default="", help="comma-separated recipe number prefixes")
    ap.add_argument("--keep", type=Path, help="keep models and outputs here")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--recompare", action="store_true", help="compare the outputs already in --keep; run nothing")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="corpus-"))
    models = StandIns(root / "models")
    wanted = [p for p in args.only.split(",") if p]
    rows = ["| recipe | kind | mergekit | mergesmith | outputs | detail |", "|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for recipe in corpus():
        if wanted and not any(recipe.name.startswith(p) for p in wanted):
            continue
        text = stand_in(recipe, models)
        if text is None:
            row = ("refuses (YAML)", "refuses (YAML)", "both refuse", "")
        else:
            if args.recompare:
                mk_code, mk_msg, mk_out, ms = earlier(root, recipe)
            else:
                mk_code, mk_msg, mk_out = run_mergekit(args.mergekit, recipe, text, root / "mergekit" / recipe.name)
                ms = run_recipe(recipe, text, root / "mergesmith" / recipe.name)
            ms_out = ms.out
            final = final_stage(text) if recipe.kind == "multi" else None
            if final:  # every document named: compare the last stage, in the intermediate directories
                mk_out, ms_out = mk_out.parent / "stages" / final, ms.out.parent / "stages" / final
            mk_ok, ms_ok = mk_code == 0 and (mk_out / "config.json").exists(), ms.code == 0
            if mk_ok and ms_ok:
                random = any(m in recipe.text for m in RANDOM) or "gate_mode: random" in recipe.text
                verdict, detail = compare(ms_out, mk_out, random)
            elif not mk_ok and not ms_ok:
                verdict, detail = "both refuse", f"mergekit: {mk_msg[:90]}"
            else:
                verdict = "only mergesmith runs" if ms_ok else "only mergekit runs"
                detail = (mk_msg if not mk_ok else ms.output.strip().splitlines()[-1])[:120]
            row = ("runs" if mk_ok else "refuses", "runs" if ms_ok else "refuses", verdict, detail)
        counts[row[2]] = counts.get(row[2], 0) + 1
        rows.append(f"| {recipe.name} | {recipe.kind} | " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        print(rows[-1], flush=True)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"\n{summary}")
    if args.markdown:
        args.markdown.write_text("\n".join(rows) + f"\n\n{summary}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
