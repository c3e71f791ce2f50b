"""Real tiny models, built once per test session, and a helper to run the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from mergesmith.cli import main
from mergesmith.toymodels import load_state_dict, make_base, make_finetune


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama-style base with three fine-tunes (one sharded, one .bin), and a GPT-2-style pair."""
    root = tmp_path_factory.mktemp("models")
    base = make_base(root / "base", layers=4, hidden=32, vocab=96, seed=0)
    out = {
        "base": base,
        "ft1": make_finetune(base, root / "ft1", seed=1),
        "ft2": make_finetune(base, root / "ft2", seed=2, shards=3),
        "ft3": make_finetune(base, root / "ft3", seed=3, fmt="bin"),
        "gpt2": make_base(root / "gpt2", family="gpt2", layers=3, hidden=32, vocab=96, seed=5),
    }
    out["gpt2_ft"] = make_finetune(out["gpt2"], root / "gpt2_ft", seed=6)
    return out


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def merge(recipe: dict | str, out: Path, *flags: str) -> Result:
    """Write `recipe` next to `out` and run `mergesmith run` on it; asserts success."""
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path = out.parent / f"{out.name}.yml"
    path.write_text(text)
    result = run_cli("run", path, out, "--quiet", *flags)
    assert result.exit_code == 0, result.output
    return result


def tensors(directory: Path) -> dict:
    return load_state_dict(directory)
