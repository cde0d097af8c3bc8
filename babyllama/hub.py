"""Files from the Hugging Face Hub (the ChatGLM2 tokenizer, hf: datasets), with one-line errors when offline."""
from __future__ import annotations

import os
from typing import Optional

from babyllama.errors import first_line


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
