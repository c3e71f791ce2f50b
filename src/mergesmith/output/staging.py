"""Atomic output: a merge is written into a staging directory beside OUT and moved into place
only when complete, so OUT is either absent (or as it was) or a whole model, never half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergesmith.errors import MergeError


def staging_dir(out: Path) -> Path:
    """Where a merge into `out` is written before it moves into place (a hidden sibling of `out`)."""
    out = out.resolve()
    return out.parent / f".{out.name}.mergesmith-partial"


class StagedOutput:
    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out = out.resolve()
        self.staging = staging_dir(self.out)
        self.overwrite = overwrite

    def has_files(self) -> bool:
        return self.out.is_dir() and any(self.out.iterdir())

    def check(self) -> None:
        """Refuse a target that would lose the user's files (before any work is done)."""
        if self.out.exists():
            if not self.out.is_dir():
                raise MergeError("output path exists and is not a directory", str(self.out))
            if any(self.out.iterdir()) and not self.overwrite:
                raise MergeError(
                    "output directory exists and is not empty; pass --overwrite to replace it", str(self.out)
                )

    def begin(self, keep: bool = False) -> Path:
        """Create the staging directory; `keep` (for --resume) keeps one left by an interrupted run."""
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.staging.exists() and not keep:
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=keep)
        return self.staging

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.mergesmith-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
