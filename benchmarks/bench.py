"""mergesmith benchmark: synthetic bf16 Llama-shaped models, merged at (close to) the speed of memory.

    python benchmarks/bench.py                       # small + medium, every method, 1 repeat
    python benchmarks/bench.py --sizes medium --methods linear,ties --repeats 3
    python benchmarks/bench.py --compare "mergekit-yaml {recipe} {out}"

Models are built once under --root (default /tmp/mergesmith-bench): a base and three fine-tunes,
written straight as safetensors from a deterministic bit pattern (no transformers, no model init):
a fixed pool of bf16 Gaussian values is tiled into every tensor at a name-dependent offset, and a
fine-tune flips low mantissa bits of the base (relative deltas below 6%, signs kept).

For every merge the script prints wall time and the child's peak RSS (from wait4), input GB/s, the
"limit": start-up (Python, mergesmith, and torch for the merges that need it), plus the inputs read and the float32 passes the arithmetic needs at
this machine's measured copy bandwidth, plus the output written at its measured rate for new file data
(direct writes of aligned blocks, as the engine writes: ~2-2.6 GB/s on this project's VMs); then
wall / limit and the target of issue #4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WRAP = """
import atexit, os, sys
from mergesmith.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].strip(), flush=True)
atexit._run_exitfuncs()  # then leave as the `mergesmith` console script does (`cli.entry`)
os._exit(0)
"""
SRC = Path(__file__).resolve().parents[1] / "src"

# name: (hidden, layers, intermediate, vocab, heads, kv_heads)
SIZES = {
    "small": (512, 8, 1408, 32000, 8, 2),
    "medium": (2048, 22, 5632, 32000, 32, 4),  # 1.1B params, TinyLlama's shape
    "large": (4096, 22, 11264, 32000, 32, 8),  # ~4x medium
}
POOL = 1 << 24


@dataclass(frozen=True)
class Method:
    recipe: str  # YAML with {base} {ft1} {ft2} {ft3}
    passes: float  # float32 passes over the output elements per input model the arithmetic needs
    target_s: float | None  # issue #4 target on medium
    torch: bool = True  # whether the merge imports torch (linear and passthrough run without it)


METHODS: dict[str, Method] = {
    "linear": Method(
        """merge_method: linear
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
""",
        0,
        4.0,
        torch=False,
    ),
    "ties": Method(
        """merge_method: ties
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
""",
        3,
        10.0,
    ),
    "dare_ties": Method(
        """merge_method: dare_ties
base_model: {base}
dtype: bfloat16
parameters: {{int8_mask: true}}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.53}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.53}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.53}}
""",
        2,
        10.0,
    ),
    "passthrough": Method(
        """merge_method: passthrough
dtype: bfloat16
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, {layers}]
  - sources:
      - model: {ft2}
        layer_range: [{tail}, {layers}]
""",
        0,
        3.0,
        torch=False,
    ),
    "slerp": Method(
        """merge_method: slerp
base_model: {base}
dtype: bfloat16
parameters: {{t: 0.4}}
models:
  - model: {base}
  - model: {ft1}
""",
        2,
        None,
    ),
    "model_stock": Method(
        """merge_method: model_stock
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
    "della": Method(
        """merge_method: della
base_model: {base}
dtype: bfloat16
parameters: {{epsilon: 0.1, lambda: 1.0}}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.53}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.53}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.53}}
""",
        4,
        None,
    ),
    # the rest of the task-vector family (issue #21: the comparison covers every method)
    "task_arithmetic": Method(
        """merge_method: task_arithmetic
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
""",
        1,
        None,
    ),
    "dare_linear": Method(
        """merge_method: dare_linear
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.53}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.53}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.53}}
""",
        2,
        None,
    ),
    "breadcrumbs": Method(
        """merge_method: breadcrumbs
base_model: {base}
dtype: bfloat16
parameters: {{gamma: 0.01}}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.9}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.9}}
""",
        3,
        None,
    ),
    "breadcrumbs_ties": Method(
        """merge_method: breadcrumbs_ties
base_model: {base}
dtype: bfloat16
parameters: {{gamma: 0.01}}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.9}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.9}}
""",
        3,
        None,
    ),
    "della_linear": Method(
        """merge_method: della_linear
base_model: {base}
dtype: bfloat16
parameters: {{epsilon: 0.1, lambda: 1.0}}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.53}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.53}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.53}}
""",
        4,
        None,
    ),
    # issue #21: the methods that used to take whole tensors, now streamed
    "karcher": Method(
        """merge_method: karcher
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
    "nuslerp": Method(
        """merge_method: nuslerp
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
""",
        2,
        None,
    ),
    "multislerp": Method(
        """merge_method: multislerp
dtype: bfloat16
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
""",
        2,
        None,
    ),
    "sce": Method(
        """merge_method: sce
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        3,
        None,
    ),
    "arcee_fusion": Method(
        """merge_method: arcee_fusion
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
""",
        3,
        None,
    ),
    "ram": Method(
        """merge_method: ram
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        1,
        None,
    ),
    "ramplus_tl": Method(
        """merge_method: ramplus_tl
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
    "nearswap": Method(
        """merge_method: nearswap
base_model: {base}
dtype: bfloat16
parameters: {{t: 0.001}}
models:
  - model: {ft1}
""",
        1,
        None,
    ),
    "tsv": Method(  # whole-tensor: an SVD per matrix, far from the memory-speed limit by nature
        """merge_method: tsv
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
    "iso_c": Method(  # whole-tensor: an SVD per matrix, far from the memory-speed limit by nature
        """merge_method: iso_c
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
    "iso_cts": Method(  # whole-tensor: an SVD per matrix, far from the memory-speed limit by nature
        """merge_method: iso_cts
base_model: {base}
dtype: bfloat16
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
        2,
        None,
    ),
}


# ---------------------------------------------------------------------------------------- models


def llama_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, layers, inter, vocab, heads, kv = SIZES[size]
    kv_dim = hidden // heads * kv
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def llama_config(size: str) -> dict:
    hidden, layers, inter, vocab, heads, kv = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _offset(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "little") % POOL


def _pools() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.Philox(1234))
    values = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).view(np.uint32)
    base = ((values + 0x8000) >> 16).astype(np.uint16)  # round to bf16 bits
    noise = rng.integers(0, 8, POOL, dtype=np.uint16)  # low 3 mantissa bits
    return np.concatenate([base, base]), np.concatenate([noise, noise])  # doubled: windows never wrap


def write_model(directory: Path, size: str, variant: int, pools: tuple[np.ndarray, np.ndarray]) -> None:
    """Variant 0 is the base; variant k flips low mantissa bits of the base with pattern k."""
    base_pool, noise_pool = pools
    shapes = llama_shapes(size)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    chunk = POOL
    buf = np.empty(chunk, dtype=np.uint16)
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes:
            n = int(np.prod(shape))
            a, b = _offset("base", name), _offset(f"ft{variant}", name)
            done = 0
            while done < n:
                m = min(chunk, n - done)
                start = (a + done) % POOL
                if variant == 0:
                    f.write(base_pool[start : start + m].data)
                else:
                    nstart = (b + done) % POOL
                    np.bitwise_xor(base_pool[start : start + m], noise_pool[nstart : nstart + m], out=buf[:m])
                    f.write(buf[:m].data)
                done += m
    os.replace(tmp, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(llama_config(size), indent=2))


def build_models(root: Path, size: str) -> dict[str, Path]:
    where = root / size
    dirs = {name: where / name for name in ("base", "ft1", "ft2", "ft3")}
    missing = [k for k, d in dirs.items() if not (d / "model.safetensors").exists()]
    if missing:
        t0 = time.perf_counter()
        pools = _pools()
        for k in missing:
            write_model(dirs[k], size, 0 if k == "base" else int(k[2:]), pools)
        print(f"built {size} models ({', '.join(missing)}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dirs


def warm_page_cache(dirs: dict[str, Path]) -> None:
    """Read the models into the page cache, unless they cannot fit there (the large size on a
    24 GB machine): then every run reads its inputs from the disk and only peak RSS is comparable."""
    total = sum((d / "model.safetensors").stat().st_size for d in dirs.values())
    if total > 0.8 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        return
    for d in dirs.values():
        with open(d / "model.safetensors", "rb") as f:
            while f.readinto(_WARM):
                pass


_WARM = bytearray(64 << 20)


# ---------------------------------------------------------------------------------- measuring


def file_write_bandwidth(root: Path) -> float:
    """Bytes per second of writing new data into a file as the engine does (16 MiB aligned blocks with
    O_DIRECT where the file system allows, into an fallocated file), best of 2.

    Through the page cache, new data runs at 0.4-4.6 GB/s on the VMs this project runs on (first-touch
    pages are slow, from run to run), against ~2-2.6 GB/s for direct writes."""
    import mmap

    root.mkdir(parents=True, exist_ok=True)
    block = mmap.mmap(-1, 1 << 24)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(1 << 24))
    best = 0.0
    for _ in range(2):
        path = root / f"write-probe-{os.getpid()}.bin"  # two benches at once must not share it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(fd, 0, 128 * len(block))
        try:
            direct = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            direct = os.dup(fd)
        t0 = time.perf_counter()
        for i in range(128):  # 2 GiB
            os.pwrite(direct, block, i * len(block))
        os.fsync(fd)
        best = max(best, 128 * len(block) / (time.perf_counter() - t0))
        os.close(direct)
        os.close(fd)
        path.unlink()
    return best


def startup_seconds(torch: bool) -> float:
    """Wall time of starting Python and importing mergesmith's CLI (and torch): every run pays it."""
    t0 = time.perf_counter()
    code = "import torch, mergesmith.cli" if torch else "import mergesmith.cli, mergesmith.merge"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    return time.perf_counter() - t0


def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write counted), best of a few, all cores."""
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        src = torch.ones(1 << 28, dtype=torch.uint8)  # 256 MiB, well past the caches
        dst = torch.empty_like(src)
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = max(best, 2 * src.numel() / (time.perf_counter() - t0))
        return best
    except ImportError:  # pragma: no cover
        src = np.ones(1 << 28, dtype=np.uint8)
        dst = np.empty_like(src)
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
        return best


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    err = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    # wait4's ru_maxrss also counts the pages the forked child inherited from this (big) process
    # before exec; mergesmith's own summary line reports its peak RSS after exec, so prefer that.
    # wrapped mergesmith runs print VmHWM (the high-water mark of their own memory map, after exec)
    found = re.search(rb"VmHWM:\s*([0-9]+) kB", err)
    rss = int(found.group(1)) * 1024 if found else usage.ru_maxrss * 1024
    return wall, rss, proc.returncode


def registry_methods() -> set[str]:
    sys.path.insert(0, str(SRC))
    from mergesmith.methods.registry import METHODS, get_method

    get_method("linear")
    return set(METHODS)


def plan_bytes(recipe: Path) -> tuple[int, int, int]:
    """(bytes read, bytes written, output elements) from mergesmith's own plan."""
    sys.path.insert(0, str(SRC))
    import yaml

    from mergesmith.preparation import MergeOptions, prepare_merge
    from mergesmith.recipe.schema import MergeConfig

    config = MergeConfig.model_validate(yaml.safe_load(recipe.read_text()))
    plan, _ = prepare_merge(config, MergeOptions())
    return plan.bytes_read, plan.bytes_written, sum(t.nbytes for t in plan.tensors) // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium", help="comma list of small, medium, large")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (methods the registry lacks are skipped)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--root", default="/tmp/mergesmith-bench", help="where models and outputs go")
    ap.add_argument("--compare", default=None, help="another merger: a command with {recipe} and {out}")
    ap.add_argument("--cuda", action="store_true", help="pass --cuda to mergesmith")
    ap.add_argument("--extra", default="", help="more mergesmith run flags")
    args = ap.parse_args()

    root = Path(args.root)
    known = registry_methods()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m}")
    skipped = [m for m in methods if m not in known]
    methods = [m for m in methods if m in known]
    bw = memory_bandwidth()
    write_bw = file_write_bandwidth(root)
    startup = {True: startup_seconds(True), False: startup_seconds(False)}
    print(
        f"machine: {os.cpu_count()} cores, copy bandwidth {bw / 1e9:.1f} GB/s (read + write), writing new file"
        f" data {write_bw / 1e9:.2f} GB/s (direct), start-up {startup[False]:.1f} s (python + mergesmith),"
        f" {startup[True]:.1f} s with torch"
    )
    if skipped:
        print(f"skipped (not in this mergesmith): {', '.join(skipped)}")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for size in args.sizes.split(","):
        dirs = build_models(root, size)
        layers = SIZES[size][1]
        for m in methods:
            spec = METHODS[m]
            recipe = root / size / f"{m}.yml"
            recipe.write_text(
                spec.recipe.format(**{k: str(v) for k, v in dirs.items()}, layers=layers, tail=layers - 8)
            )
            read, written, elements = plan_bytes(recipe)
            models = 1 + recipe.read_text().count("- model:")
            # The floor: start-up, inputs read (page cache) and the arithmetic's float32 passes at the copy
            # bandwidth, and the output written into new file pages at the measured file-write rate.
            limit = startup[spec.torch] + (read + spec.passes * models * elements * 4) / bw + written / write_bw
            out = root / size / f"out-{m}"
            ours = [sys.executable, "-c", WRAP, "run", str(recipe), str(out), "--quiet", "--overwrite"]
            ours += (["--cuda"] if args.cuda else []) + shlex.split(args.extra)
            theirs = None
            if args.compare:
                fmt = args.compare.format(recipe=recipe, out=str(out) + "-other")
                theirs = shlex.split(fmt)
            results, other = [], []
            for _ in range(args.repeats):
                warm_page_cache(dirs)
                results.append(run_child(ours, env))
                shutil.rmtree(out, ignore_errors=True)
                if theirs:
                    warm_page_cache(dirs)
                    other.append(run_child(theirs, env))
                    shutil.rmtree(str(out) + "-other", ignore_errors=True)
            wall = sorted(r[0] for r in results)[len(results) // 2]
            rss = max(r[1] for r in results)
            ok = all(r[2] == 0 for r in results)
            target = spec.target_s if size == "medium" else None
            met = "FAILED" if not ok else ("-" if target is None else ("met" if wall <= target else "NOT met"))
            if size in ("medium", "large") and rss > 2**30:
                met += " (RSS > 1 GiB)"
            row = [size, m, f"{wall:.2f}", f"{rss / 2**30:.2f}", f"{read / wall / 1e9:.2f}", f"{limit:.2f}"]
            row += [f"{wall / limit:.1f}x", f"{target:g}" if target else "-", met]
            if other:
                pairs = [a[0] / b[0] for a, b in zip(results, other, strict=True)]
                row += [f"{sorted(o[0] for o in other)[len(other) // 2]:.2f}", " ".join(f"{p:.2f}" for p in pairs)]
            rows.append(row)
            print("  ".join(row), file=sys.stderr)
    head = ["size", "method", "wall s", "peak RSS GiB", "input GB/s", "limit s", "wall/limit", "target s", "status"]
    if args.compare:
        head += ["other s", "ours/other per pair"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
