"""The storage path: history.jsonl (the source of truth), search.json, best_config.yaml, progress.png.

Every file is replaced atomically (write a temporary file, fsync, `os.replace`), so a search killed
at any instant leaves a consistent directory that `--resume` continues from.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mergesmith.errors import MergeError


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recipe_key(recipe: dict[str, Any]) -> str:
    """Canonical text of a recipe: two candidates with the same key are the same merge."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


class Storage:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.history_path = self.dir / "history.jsonl"
        self.settings_path = self.dir / "search.json"
        self._lines: dict[int, str] = {}  # index -> JSON line, so a rewrite encodes only new entries

    def open(self, settings: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
        """Prepare the directory; returns the history to continue from (empty unless resuming)."""
        if self.dir.exists() and not self.dir.is_dir():
            raise MergeError("the storage path is a file", str(self.dir))
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if self.history_path.exists():
                raise MergeError(
                    "this storage path already holds a search; pass --resume to continue it, or choose another path",
                    str(self.dir),
                )
            atomic_write(self.settings_path, json.dumps(settings, indent=2, sort_keys=True))
            return []
        if not self.settings_path.exists():
            atomic_write(self.settings_path, json.dumps(settings, indent=2, sort_keys=True))
            return []
        saved = json.loads(self.settings_path.read_text(encoding="utf-8"))
        changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if changed:
            raise MergeError(
                f"--resume with different settings than the stored search ({', '.join(changed)} changed)",
                str(self.settings_path),
            )
        return self.read_history()

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history_path.exists():
            return []
        entries = []
        for line in self.history_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return sorted(entries, key=lambda e: e["index"])

    def write_history(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            if e["index"] not in self._lines:
                self._lines[e["index"]] = json.dumps(e, sort_keys=True) + "\n"
        text = "".join(self._lines[i] for i in sorted(self._lines))
        atomic_write(self.history_path, text)

    def write_best(self, recipe: dict[str, Any]) -> None:
        atomic_write(self.dir / "best_config.yaml", yaml.safe_dump(recipe, sort_keys=False))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.dir / name, json.dumps(data, indent=2, sort_keys=True))

    def plot(self, entries: list[dict[str, Any]]) -> None:
        """progress.png: the best fitness so far against evaluations (skipped without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        xs, best, raw = [], [], []
        top = float("-inf")
        for e in sorted(entries, key=lambda e: e["index"]):
            top = max(top, e["fitness"])
            xs.append(e["index"] + 1)
            best.append(top)
            raw.append(e["fitness"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, raw, ".", alpha=0.3, label="candidate")
        ax.plot(xs, best, "-", label="best so far")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("fitness (the genome's aggregation of the task scores)")
        ax.legend()
        fig.tight_layout()
        tmp = self.dir / ".progress.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.dir / "progress.png")
