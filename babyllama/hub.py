"""The Hugging Face Hub: files from it (the ChatGLM2 tokenizer, hf: datasets) and export.py's upload, with one-line
errors when offline."""
from __future__ import annotations

import os
from typing import Optional

from babyllama.errors import DataError, first_line


def hub_download(repo_id: str, filename: str, repo_type: Optional[str] = None, local_dir: Optional[str] = None) -> str:
    """Local path of `filename` of a Hugging Face Hub repo (the tokenizer's, or a dataset's for data_process.py),
    downloaded if needed. Any failure (offline, no such file, huggingface_hub missing) -> OSError whose message is
    the first line of the cause, for one-line errors."""
    offline = False
    offline = False
    try:
        from huggingface_hub import hf_hub_download

        offline = not hub_reachable()  # the Hub's client retries for about 25 s before it gives up
        cache_only = {"local_files_only": True} if offline else {}
        return hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=local_dir, **cache_only)
    except Exception as e:
        if offline and "local" in str(e).lower():
            e = OSError(f"cannot reach {hub_host()} (offline?) and no copy in the Hugging Face cache")
        reason = first_line(e)
        if len(reason) > 160:  # the Hub's messages run long: keep whole sentences
            end = reason.rfind(". ", 0, 160)
            reason = reason[:end + 1] if end > 0 else reason[:160] + "..."
        raise OSError(reason) from None


def hub_host() -> str:
    from urllib.parse import urlparse
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the Hub within `timeout` s. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the client's own
    requests decide: assumed reachable."""
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# names of an earlier upload that belong to an export (weights, GGUF files): removed from the Hub repo when this
# upload does not replace them, so the repo never mixes two models (other files there, e.g. edits, stay)
EXPORT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "model-*.gguf", "Modelfile")


def hub_token() -> str:
    """The Hugging Face token huggingface_hub would use; one-line DataError when there is none or it is offline."""
    try:
        from huggingface_hub import get_token
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:
        raise DataError("--push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if HF_HUB_OFFLINE:
        raise DataError("--push_to_hub: HF_HUB_OFFLINE is set; unset it to upload")
    token = get_token()
    if not token:
        raise DataError("--push_to_hub: no Hugging Face token; run `huggingface-cli login` or set HF_TOKEN")
    return token


def upload_files(folder: str, names: list, repo_id: str, private: bool, token: str) -> str:
    """Uploads exactly `names` (plain files of `folder`) to the Hub model repo in one commit, creating the repo if
    needed, and deletes the repo's EXPORT_PATTERNS files this upload does not replace -> the repo's URL. Any
    failure (offline, a bad token, no write access) -> one-line DataError."""
    from fnmatch import fnmatch

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    for n in names:  # a name with a folder in it, a hidden temp or a link is never part of an export
        p = os.path.join(folder, n)
        if os.sep in n or n.startswith(".") or os.path.islink(p) or not os.path.isfile(p):
            raise DataError(f"{folder}: {n!r} is not a plain file of the export; export again before uploading")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        stale = [f for f in api.list_repo_files(repo_id) if f not in names
                 and any(fnmatch(f, pat) for pat in EXPORT_PATTERNS)]
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(folder, n)) for n in names]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        api.create_commit(repo_id, operations=ops, commit_message="Upload baby-llama2-chinese export")
    except Exception as e:
        raise DataError(f"--push_to_hub={repo_id}: {first_line(e)[:200]}") from None
    return f"https://huggingface.co/{repo_id}"
