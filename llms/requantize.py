"""Re-encoding a GGUF model's weights for llama.cpp's batched CPU kernels (`LlamaCpp(requantize=...)`).

Why: decoding 8 sequences together only pays when a batch of tokens costs much less than 8 single tokens. For the
bundled SmolLM2's Q4_1 weights llama.cpp's x86 CPU backend has no batched kernel (each token is a separate row of
dot products), so 8 tokens cost about 4 single ones; for Q8_0 weights it multiplies whole tiles (llamafile's
tinyBLAS), and 8 tokens cost about 2 (benchmarks/embedded.py measures both). Q8_0 keeps 8 bits a weight where Q4_1 has
4, so re-encoding the Q4_1 values in Q8_0 adds an error below a sixteenth of Q4_1's own step: the answers are the
same model's. The file is written once per source file (keyed by its digest) under
`$XDG_CACHE_HOME/thresher/models` (`~/.cache/thresher/models`), by a child process so that llama.cpp's log stays out
of this one, and moved into place whole, so concurrent first runs cannot read half a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from thresher.errors import BackendError, ConfigError
from thresher.llms.bundled import model_digest

# llama_ftype values of llama.h
FTYPES = {"q8_0": 7, "q4_0": 2, "f16": 1}

_CONVERT = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.allow_requantize = True; p.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def models_cache_dir() -> Path:
    from thresher.paths import user_cache_dir

    return user_cache_dir() / "models"


def requantized(src: Path, ftype: str) -> Path:
    """The path of `src` re-encoded as `ftype` ("q8_0", "q4_0", "f16"), made on first use."""
    if ftype not in FTYPES:
        raise ConfigError(f"requantize must be one of {sorted(FTYPES)} or None, got {ftype!r}")
    out = models_cache_dir() / f"{src.stem}.{ftype}.{model_digest(src)[:16]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        r = subprocess.run(
            [sys.executable, "-c", _CONVERT, str(src), str(tmp), str(FTYPES[ftype])],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if r.returncode != 0 or not tmp.is_file():
            raise BackendError(
                f"LlamaCpp: re-encoding {src} as {ftype} failed (exit {r.returncode}): {(r.stderr or '')[-1500:]}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
