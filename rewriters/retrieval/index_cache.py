"""Retrieval indexes built once and kept on disk, found again by the content key of their corpus and parameters.

How: an index lives in `<root>/<kind>-<key>/` (root: the retriever's `index_dir`, else `$THRESHER_INDEX_DIR`, else
`$XDG_CACHE_HOME/thresher/retrieval`, else `~/.cache/thresher/retrieval`). It is built in a temporary folder beside
it and renamed into place when complete, so a crash mid-build leaves no half index behind, and two processes that
build the same index at once both end with one good copy. The folder holds the passages (`passages.jsonl`) and
whatever the retriever writes (a BM25 matrix, a FAISS index).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def index_root(index_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where indexes are kept (see the module docstring)."""
    if index_dir is not None:
        return Path(index_dir).expanduser()
    if os.environ.get("THRESHER_INDEX_DIR"):
        return Path(os.environ["THRESHER_INDEX_DIR"]).expanduser()
    from thresher.paths import user_cache_dir

    return user_cache_dir() / "retrieval"


def cached_index(root: Path, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The folder `root/name`, built by `build(folder)` if it is not there yet; returns (folder, built now)."""
    target = root / name
    if (target / "passages.jsonl").is_file():
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "passages.jsonl").is_file():  # not another builder's finished copy: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def write_passages(folder: Path, passages: list[tuple[str, str]]) -> None:
    with open(folder / "passages.jsonl", "w", encoding="utf-8") as fh:
        for text, source in passages:
            fh.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")


def read_passages(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "passages.jsonl", encoding="utf-8") as fh:
        return [(d["text"], d["source"]) for d in map(json.loads, fh)]
