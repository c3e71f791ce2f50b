"""Uploading a merge to the Hugging Face hub, only after checking the directory is a complete merge."""

from __future__ import annotations

from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.output.audit import audit_merge

LOGIN_HELP = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"


def upload_plan(directory: str | Path) -> list[str]:
    """The exact files an upload sends (raises when the directory is not a complete merge)."""
    return audit_merge(directory)


def check_login() -> str:
    """The hub user name for the saved token; a clear MergeError when there is none or the hub refuses it."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if token is None:
        raise MergeError(f"not logged in to the Hugging Face hub: {LOGIN_HELP}", "upload")
    try:
        info = HfApi(token=token).whoami()
    except Exception as err:  # offline, bad token, hub down: one message
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(
            f"cannot confirm the hub login ({type(err).__name__}: {first}); {LOGIN_HELP}", "upload"
        ) from None
    return str(info.get("name", "?"))


def upload(directory: str | Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` if needed and upload exactly the audited files; returns the commit URL."""
    from huggingface_hub import HfApi

    files = upload_plan(directory)
    check_login()
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            allow_patterns=files,
            commit_message="Upload merged model (mergesmith)",
        )
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"upload failed ({type(err).__name__}: {first})", repo_id) from None
    return str(getattr(info, "commit_url", repo_id))
