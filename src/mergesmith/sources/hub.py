"""Hub ids (`org/name`, `org/name@revision`): fetch from the Hugging Face hub only what is needed.

`download` (what `run` uses) lists the repository at the revision once, then fetches the small files
(config, tokenizer, generation config, chat template, card) and exactly the weight files the model
uses: the shards named by `model.safetensors.index.json`, or `model.safetensors`; `.bin` checkpoints
only when the repository has no safetensors. A `consolidated.safetensors` beside the shards, training
state or `*.bin` duplicates are never downloaded.

`read_remote_header` reads a safetensors header through two HTTP range reads (the 8-byte length, then
the header), so `sources.model.load_model_metadata` (what `validate` and `run --dry-run` use) reads a
hub model without a byte of weights. This module knows nothing of models: `sources.model` builds
them from what it fetches (and imports it; the other way round would be a cycle).

Everything goes through huggingface_hub (its cache, token, HF_ENDPOINT, HF_HUB_OFFLINE); when the hub
cannot be reached, a model already in the cache is used as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.safetensors_header import Entry, header_length, parse_entries
from mergesmith.sources.jsonfile import read_json
from mergesmith.sources.refs import ModelRef

HUB_PATTERNS = ["*.json", "tokenizer.model", "*.safetensors", "*.jinja", "README.md"]
SMALL_FILES = [p for p in HUB_PATTERNS if not p.endswith(".safetensors")]
ST_INDEX, ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def looks_local(path: str) -> bool:
    """A path, not a hub id: absolute, relative with ./ or ~, or more than one '/'."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def is_hub_ref(ref: ModelRef) -> bool:
    return not Path(ref.path).expanduser().exists() and not looks_local(ref.path)


@dataclass(frozen=True)
class Listing:
    """One repository at one commit: the files it has."""

    repo: str
    revision: str | None
    sha: str
    files: frozenset[str]


def hub_error(err: Exception, ref: ModelRef) -> MergeError:
    """One clear message for a failed hub call (missing repo or revision, offline, network)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = str(ref)
    rev = ref.revision or "main"
    if isinstance(err, MergeError):
        return err
    if isinstance(err, RevisionNotFoundError):
        return MergeError(f"revision '{rev}' not found in Hugging Face hub repository '{ref.path}'", where)
    if isinstance(err, GatedRepoError):
        return MergeError(
            f"Hugging Face hub repository '{ref.path}' is gated: accept its terms on the hub and log in", where
        )
    if isinstance(err, RepositoryNotFoundError):
        return MergeError(
            f"not a local directory, and no Hugging Face hub repository '{ref.path}' (or it is private and you"
            " are not logged in)",
            where,
        )
    if isinstance(err, RemoteEntryNotFoundError):
        return MergeError(f"a file is missing from Hugging Face hub repository '{ref.path}' at '{rev}'", where)
    if isinstance(err, OfflineModeIsEnabled) or "offline" in str(err).lower():
        return MergeError(f"HF_HUB_OFFLINE is set and '{ref}' is not (completely) in the Hugging Face hub cache", where)
    first = str(err).splitlines()[0] if str(err) else ""
    return MergeError(
        f"not a local directory, and fetching it from the Hugging Face hub at {constants.ENDPOINT} failed"
        f" ({type(err).__name__}: {first})",
        where,
    )


def unreachable(err: Exception) -> bool:
    """The hub cannot be asked (offline mode, no network): the cache may still hold the model."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(err, (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException))


def list_repo(ref: ModelRef) -> Listing:
    from huggingface_hub import HfApi

    info = HfApi().model_info(ref.path, revision=ref.revision)
    files = frozenset(s.rfilename for s in info.siblings or [])
    return Listing(ref.path, ref.revision, str(info.sha), files)


def fetch(listing: Listing, filename: str, cache_dir: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(listing.repo, filename, revision=listing.sha, cache_dir=cache_dir))


def weight_files(listing: Listing, cache_dir: str | None) -> tuple[str, list[str]]:
    """(format, the weight files the model uses); an index is fetched (small) to learn its shards."""
    for fmt, index, single in (("safetensors", ST_INDEX, ST_SINGLE), ("bin", BIN_INDEX, BIN_SINGLE)):
        if index in listing.files:
            path = fetch(listing, index, cache_dir)
            data = read_json(path)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise MergeError("index has no 'weight_map'", str(path))
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if s not in listing.files]
            if missing:
                raise MergeError(
                    f"shard '{missing[0]}' named in the index is missing from the hub repository", str(path)
                )
            return fmt, [index, *shards]
        if single in listing.files:
            return fmt, [single]
    for fmt, suffix in (("safetensors", ".safetensors"), ("bin", ".bin")):  # an unusual layout: take them all
        found = sorted(f for f in listing.files if f.endswith(suffix) and "/" not in f)
        if found:
            return fmt, found
    return "none", []


def download(ref: ModelRef, cache_dir: str | None = None) -> Path:
    """The snapshot directory of `ref` in the hub cache, holding the small files and the needed weights."""
    from huggingface_hub import snapshot_download

    try:
        listing = list_repo(ref)
    except Exception as err:
        if not unreachable(err):
            raise hub_error(err, ref) from None
        return small_files_snapshot(ref, cache_dir)
    try:
        _, weights = weight_files(listing, cache_dir)
        # by name, not sha: huggingface_hub records the branch -> commit, so the id also works offline later
        return Path(
            snapshot_download(
                ref.path, revision=ref.revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES + weights
            )
        )
    except Exception as err:
        raise hub_error(err, ref) from None


def small_files_snapshot(ref: ModelRef, cache_dir: str | None) -> Path:
    """A snapshot of only the config and tokenizer files: a tokenizer source that is not merged, or,
    offline, the cached snapshot (the loader then checks the weights it names are there)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.path, revision=ref.revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES))
    except Exception as err:
        raise hub_error(err, ref) from None


def snapshot_dir(listing: Listing, cache_dir: str | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    return root / repo_folder_name(repo_id=listing.repo, repo_type="model") / "snapshots" / listing.sha


def _get_range(listing: Listing, file: str, start: int, end: int) -> tuple[bytes, int | None]:
    """Bytes [start, end] of a hub file, and the file's total size when the server says it."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(listing.repo, file, revision=listing.sha)
    response = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={start}-{end}"})
    hf_raise_for_status(response)
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    body = response.content
    if response.status_code == 200:  # the server ignored the range
        size = len(body)
        return body[start : end + 1], size
    return body, int(total) if total.isdigit() else None


def read_remote_header(listing: Listing, file: str) -> dict[str, Entry]:
    """The tensors of one safetensors file on the hub, checked (`safetensors_header`): its 8-byte
    length, then its JSON header, by two range reads."""
    where = f"{listing.repo}@{listing.revision or 'main'}/{file}"
    head, size = _get_range(listing, file, 0, 7)
    n = header_length(head, size, where)
    raw, _ = _get_range(listing, file, 8, 8 + n - 1)
    return parse_entries(raw, n, size, where)
