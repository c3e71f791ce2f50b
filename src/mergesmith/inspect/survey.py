"""Streaming every input once: per tensor, its task vectors' figures, summed per layer and module type.

Tensors are visited in the base model's order; each model supplies the tensor of the same name (a
tied model its embedding for `lm_head`). Embedding-like tensors whose vocabularies differ in size
are compared on their common rows (and the difference is a finding); any other shape mismatch is an
error naming the tensor. Integer buffers are skipped.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mergesmith.engine.mapped import MappedFiles
from mergesmith.errors import MergeError
from mergesmith.inspect.inputs import Subject
from mergesmith.inspect.stats import Figures, TensorSpectra, TensorStats
from mergesmith.inspect.stream import CHUNK, RowReader
from mergesmith.lazy_torch import torch
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo, TensorMeta

log = logging.getLogger("mergesmith")
FLOATS = {"bfloat16", "float16", "float32", "float64"}

MODULES = ("attention", "mlp", "embeddings", "norms", "other")


def module_type(name: str) -> str:
    """attention, mlp, embeddings (with the output head), norms or other, from a tensor name."""
    low = name.lower()
    if "norm" in low or ".ln_" in low or low.startswith("ln_") or "layernorm" in low:
        return "norms"
    if arch.is_embedding(name) or "wpe" in low or "position_embed" in low:
        return "embeddings"
    if any(m in low for m in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")):
        return "attention"
    if any(m in low for m in ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "experts")):
        return "mlp"
    return "other"


@dataclass
class Group:
    """Figures of a set of tensors, and per module type."""

    figures: Figures
    modules: dict[str, Figures] = field(default_factory=dict)

    def add(self, module: str, f: Figures) -> None:
        self.figures.add(f)
        self.modules.setdefault(module, Figures(f.count)).add(f)


@dataclass
class SpectrumEntry:
    tensor: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    spectra: TensorSpectra


@dataclass
class Survey:
    subject: Subject
    overall: Group
    layers: dict[int, Group]
    spectra: list[SpectrumEntry]
    vocab_rows: dict[str, tuple[int, int]]  # tensor -> (compared rows, the base's rows) where some model's differ
    tensors: int
    elements: int


def _model_tensor(info: ModelInfo, name: str) -> str | None:
    if name in info.tensors:
        return name
    if arch.is_lm_head(name):
        return arch.embedding_for_lm_head(info.tensors)
    return None


def survey(subject: Subject, *, rank: int = 32, progress: Callable[[str, int], None] | None = None) -> Survey:
    """Read every input tensor once and return the summed figures."""
    k = len(subject.models)
    result = Survey(subject, Group(Figures(k)), {}, [], {}, 0, 0)
    walker = _Walker(subject, rank)
    # One thread: the work per chunk is a few passes over cache-sized data, which torch's thread pool
    # slows down (2 threads on this project's 2-core VMs: 5x slower per element for 1M-element chunks,
    # 50x for the tiny tensors of the tests, measured on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, meta in subject.base.tensors.items():
            if meta.dtype not in FLOATS or not meta.shape:
                continue
            walker.tensor(name, meta, result)
            if progress is not None:
                progress(name, meta.numel)
    finally:
        torch.set_num_threads(threads)
    if result.tensors == 0:
        raise MergeError("the base model has no floating-point tensors to compare", subject.base.name)
    result.layers = dict(sorted(result.layers.items()))
    return result


class _Walker:
    """Reads one tensor of every input in row chunks and adds its figures to the survey."""

    def __init__(self, subject: Subject, rank: int) -> None:
        files = MappedFiles()
        self.subject, self.rank = subject, rank
        self.base = RowReader(subject.base, files)
        self.readers = [RowReader(m, files) for m in subject.models]
        self.merged = RowReader(subject.merged, files) if subject.merged is not None else None
        self._buf = torch.empty(0)

    def _buffer(self, n: int) -> torch.Tensor:
        """A float32 scratch of `n` elements, reused across chunks and tensors."""
        if self._buf.numel() < n:
            self._buf = torch.empty(0)
            self._buf = torch.empty(n)
        return self._buf[:n]

    def tensor(self, name: str, meta: TensorMeta, out: Survey) -> None:
        subject, k = self.subject, len(self.readers)
        names: list[str] = []
        for m in subject.models:
            own = _model_tensor(m, name)
            if own is None:
                raise MergeError(f"{m.name} has no tensor '{name}' (the base has it)", f"tensor {name}")
            names.append(own)
        metas = [m.tensors[own] for m, own in zip(subject.models, names, strict=True)]
        merged_name = name
        if subject.merged is not None:
            found = _model_tensor(subject.merged, name)
            if found is None:
                raise MergeError(f"the merge {subject.merged.name} has no tensor '{name}'", f"tensor {name}")
            merged_name = found
            metas.append(subject.merged.tensors[merged_name])
        rows = _common_rows(name, meta.shape, [x.shape for x in metas], subject)
        if any(x.shape[0] != meta.shape[0] for x in metas):
            out.vocab_rows[name] = (rows, meta.shape[0])
        width = meta.numel // meta.shape[0]
        if len(meta.shape) == 1:
            rows, width = 1, meta.shape[0]
        matrix = len(meta.shape) == 2 and min(rows, width) >= 2
        seed = zlib.crc32(name.encode())
        stats = TensorStats(k, rows, width, merged=self.merged is not None, matrix=matrix, rank=self.rank, seed=seed)
        step = max(1, CHUNK // width)
        height = TensorStats.rows_needed(k, self.merged is not None)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            buf = self._buffer(height * (stop - start) * width).view(height, -1)
            self.base.rows(name, start, stop, width, buf[0])
            for i, reader in enumerate(self.readers):
                reader.rows(names[i], start, stop, width, buf[i + 1])
                buf[i + 1] -= buf[0]
            if self.merged is not None:
                self.merged.rows(merged_name, start, stop, width, buf[k + 2])
                buf[k + 2] -= buf[0]
            stats.add(start, buf, width)
        for reader, own in zip([self.base, *self.readers], [name, *names], strict=True):
            reader.done(own)
        if self.merged is not None:
            self.merged.done(merged_name)
        densities = [subject.density(m, own) for m, own in zip(subject.models, names, strict=True)]
        figures, spec = stats.finish(densities)
        module = module_type(name)
        parsed = arch.parse_layer_name(name)
        out.overall.add(module, figures)
        if parsed is not None:
            out.layers.setdefault(parsed.index, Group(Figures(k))).add(module, figures)
        if spec is not None:
            out.spectra.append(SpectrumEntry(name, parsed.index if parsed else None, module, (rows, width), spec))
        out.tensors += 1
        out.elements += rows * width


def _common_rows(name: str, base: tuple[int, ...], others: list[tuple[int, ...]], subject: Subject) -> int:
    """The rows compared: all of them, or for embeddings of different vocabulary sizes the common ones."""
    if all(s == base for s in others):
        return base[0]
    same_rest = all(len(s) == len(base) and s[1:] == base[1:] for s in others)
    if same_rest and arch.is_embedding(name):
        return min(s[0] for s in [base, *others])
    models = [*subject.models, *([subject.merged] if subject.merged is not None else [])]
    detail = ", ".join(f"{m.name} {list(s)}" for m, s in zip(models, others, strict=True) if s != base)
    raise MergeError(
        f"shape mismatch with the base ({list(base)}): {detail}; these models are not fine-tunes of one architecture",
        f"tensor {name}",
    )
