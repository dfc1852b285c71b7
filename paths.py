"""Where thresher keeps what it makes once per machine: `$XDG_CACHE_HOME/thresher`, else `~/.cache/thresher`
(the request cache, re-encoded and converted models, the llama.cpp probe, retrieval indexes; each has its own
environment variable to put it elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "thresher"
