"""Build tiny models fine-tuned on different synthetic patterns, then search a merge of them.

    PYTHONPATH=src:benchmarks/search_example python benchmarks/search_example/run.py /tmp/search_example

Prints the README's result table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from mergesmith.toymodels import make_base, save_state_dict

HERE = Path(__file__).parent


def finetune(base: Path, out: Path, pattern: str, steps: int = 300, seed: int = 0) -> Path:
    """A few hundred steps of next-token training on one pattern."""
    import shutil

    from objectives import sequences
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    data = sequences(tok, pattern, 256, 16, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    shutil.copytree(base, out, dirs_exist_ok=True)
    save_state_dict(out, {k: v.detach() for k, v in model.state_dict().items()})
    return out


def main(root: Path) -> None:
    sys.path.insert(0, str(HERE))
    from objectives import NextTokenLoss
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not base.exists():
        make_base(base, layers=4, hidden=32, vocab=96, seed=0)
    fts = {p: root / f"ft_{p}" for p in ("count", "colors")}
    for p, d in fts.items():
        if not d.exists():
            finetune(base, d, p)
    task = lambda p: {"python": "objectives:next_token_loss", "args": {"pattern": p, "tokenizer_dir": str(base)}}  # noqa: E731
    genome = {
        "genome": {
            "models": [str(fts["count"]), str(fts["colors"])],
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "layer_granularity": 2,
            "dtype": "float32",
        },
        "tasks": [{**task("count"), "metric": "neg_loss"}, {**task("colors"), "metric": "neg_loss"}],
    }
    (root / "genome.yml").write_text(yaml.safe_dump(genome, sort_keys=False))
    rows = {}
    scorers = [NextTokenLoss(p, str(base)) for p in ("count", "colors", "animals")]

    def score(model_dir: Path) -> list[float]:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return [-s.evaluate(m, None)["neg_loss"] for s in scorers]

    rows["base"] = score(base)
    rows["fine-tune: count"] = score(fts["count"])
    rows["fine-tune: colors"] = score(fts["colors"])
    hand = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": 0.5}} for d in fts.values()],
        "dtype": "float32",
    }
    (root / "hand.yml").write_text(yaml.safe_dump(hand, sort_keys=False))
    env_cmd = [sys.executable, "-m", "mergesmith.cli"]
    subprocess.run([*env_cmd, "run", str(root / "hand.yml"), str(root / "hand"), "--overwrite", "--quiet"], check=True)
    rows["hand-tuned task_arithmetic (0.5, 0.5)"] = score(root / "hand")
    for opt in ("random", "cmaes"):
        out = root / f"search_{opt}"
        subprocess.run(
            [
                *env_cmd,
                "search",
                str(root / "genome.yml"),
                "--storage-path",
                str(out),
                "--optimizer",
                opt,
                "--max-evals",
                "150",
                "--cpus-per-worker",
                "1",
                "--quiet",
                "--save-final-model",
            ]
            + (["--resume"] if out.exists() else []),
            check=True,
        )
        rows[f"search: {opt}, 150 evals"] = score(out / "final_model")
    print("| model | loss: count | loss: colors | loss: animals (held out) |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/search_example"))
