"""Resumable shard output: a small journal in the staging directory records each finished shard's digest.

After an interruption (Ctrl-C, kill -9, a full disk) the staging directory keeps the shards that
were complete. `run --resume` reuses each one whose hash still matches its journal entry, provided
the merge is the same (recipe, plan, seed, shard layout and input files: the fingerprint), and
computes only the rest, so the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from mergesmith.output.report import REPORT, update_report
from mergesmith.output.shards import PARTIAL, file_digest, write_index
from mergesmith.plan import Plan
from mergesmith.shard_layout import Shard
from mergesmith.sources.model import ModelInfo

log = logging.getLogger("mergesmith")

JOURNAL = ".mergesmith-journal.json"
RECIPE_COPY = "mergesmith_config.yml"


def fingerprint(
    plan: Plan, shards: list[Shard], models: dict[str, ModelInfo], seed: int, extra: str = "", mtimes: bool = True
) -> str:
    """What makes two runs produce the same shards: the per-tensor plan, the layout, the seed, the inputs.

    Without `mtimes` the input files count by path and size only: the record a finished merge keeps in
    merge_report.json, which must not differ between two runs on copies of the same inputs."""
    h = hashlib.sha256()
    for line in plan.describe():
        h.update(line.encode() + b"\n")
    for shard in shards:
        h.update(shard.file.encode() + shard.header)
    h.update(f"seed={seed};{extra}".encode())
    for key in sorted(models):
        info = models[key]
        if info.digest is not None:  # tensors made in memory (MoE's gate rows): their bytes decide
            h.update(f"{key}|{info.digest}".encode())
            continue
        for file in sorted({m.file for m in info.tensors.values()}):
            st = (info.directory / file).stat()
            when = st.st_mtime_ns if mtimes else ""
            h.update(f"{key}|{info.directory.resolve()}/{file}|{st.st_size}|{when}".encode())
    return h.hexdigest()


class ShardJournal:
    """Which shards of this merge are finished in `directory`, and which are still to write."""

    def __init__(self, directory: Path, shards: list[Shard], fingerprint: str, resume: bool) -> None:
        self.directory = directory
        self.shards = shards
        self.fingerprint = fingerprint
        self.path = directory / JOURNAL
        self.done: dict[str, str] = {}  # file -> digest (CRC-32 of the file, as the writer computes it)
        self._lock = threading.Lock()
        if resume:
            self.done = self._reusable()
        self._clear_others()
        self._save()
        self.pending = [s for s in shards if s.file not in self.done]
        self.reused = [s for s in shards if s.file in self.done]

    def _reusable(self) -> dict[str, str]:
        if not self.path.exists():
            log.warning("--resume: no journal of an interrupted merge in %s; starting from scratch", self.directory)
            return {}
        try:
            data = json.loads(self.path.read_text())
            recorded = dict(data["shards"]) if data.get("fingerprint") == self.fingerprint else None
        except (ValueError, KeyError, TypeError, AttributeError):
            recorded = None
        if recorded is None:
            log.warning(
                "--resume: the interrupted merge differs from this one (recipe, options or inputs); starting over"
            )
            return {}
        files = {s.file for s in self.shards}
        reused = {}
        for file, digest in recorded.items():
            path = self.locate(file)
            if file in files and path is not None and file_digest(path) == digest:
                reused[file] = digest
            else:
                log.warning("--resume: shard %s is missing or changed; it will be written again", file)
        log.info("--resume: reusing %d of %d shards", len(reused), len(self.shards))
        return reused

    def locate(self, file: str) -> Path | None:
        for name in (file + PARTIAL, file):
            if (self.directory / name).is_file():
                return self.directory / name
        return None

    def _clear_others(self) -> None:
        """Everything in the staging directory but the reused shards goes: each run writes it afresh."""
        keep = {JOURNAL} | {p.name for f in self.done if (p := self.locate(f)) is not None}
        for entry in self.directory.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.done}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def pending_plan(self, plan: Plan) -> Plan:
        names = {slot.name for s in self.pending for slot in s.slots}
        return replace(plan, tensors=[t for t in plan.tensors if t.name in names])

    def shard_written(self, shard: Shard, digest: str | None = None) -> None:
        """Every tensor of `shard` is written: record its hash (`digest` when the writer hashed it as it
        wrote, else read back from the file).

        No fsync here: a resumed run re-hashes each shard, so one damaged by a power cut is rewritten."""
        if digest is None:
            path = self.locate(shard.file)
            if path is None:
                return
            digest = file_digest(path)
        with self._lock:
            self.done[shard.file] = digest
            self._save()

    def finish(self, written: Iterable[str]) -> list[str]:
        """After the writer closed its shards: name the reused ones too and write the index."""
        del written
        for shard in self.reused:
            partial = self.directory / (shard.file + PARTIAL)
            if partial.exists():
                os.replace(partial, self.directory / shard.file)
        write_index(self.directory, self.shards)
        return [s.file for s in self.shards]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".tmp").unlink(missing_ok=True)


def record_finished(directory: Path, fingerprint: str, journal: ShardJournal) -> None:
    """Keep the merge's fingerprint (without input mtimes) and every shard's digest in merge_report.json.

    The journal file itself goes with the finished merge; this record is what lets `run --resume`
    recognise an OUT that is already this merge (a script rerun, a kill just after the last write)."""
    update_report(directory, "resume", {"fingerprint": fingerprint, "shards": dict(sorted(journal.done.items()))})


def finished_problem(
    out: Path, shards: list[Shard], fingerprint: str, recipe_text: str, recipe_copy: str = RECIPE_COPY
) -> str | None:
    """None when `out` holds this merge, complete and unchanged (its copy of the recipe, named
    `recipe_copy`, included); else why it does not."""
    try:
        record = json.loads((out / REPORT).read_text())["resume"]
        recorded, shard_digests = record["fingerprint"], dict(record["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no record of a finished mergesmith merge"
    if recorded != fingerprint:
        return "it holds a different merge (the recipe's plan, the options or the input files changed)"
    try:
        if (out / recipe_copy).read_text() != recipe_text:
            return f"its {recipe_copy} differs from this recipe"
    except OSError:
        return f"its {recipe_copy} is missing"
    if not (out / "config.json").is_file():
        return "its config.json is missing"
    for shard in shards:
        path = out / shard.file
        if not path.is_file() or file_digest(path) != shard_digests.get(shard.file):
            return f"its shard {shard.file} is missing or changed"
    return None
