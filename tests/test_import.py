"""`import thresher` stays fast: no heavy library is imported by the package or its concept folders."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "faiss", "llama_cpp", "sentence_transformers", "ray", "peft", "openai", "datasets")


def test_import_pulls_in_no_heavy_library() -> None:
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import thresher, thresher.pipelines, thresher.data, thresher.filters, thresher.scorers, thresher.llms, "
        "thresher.generators, thresher.rewriters, thresher.report\n"
        "print(time.perf_counter() - t)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "", f"imported at package import time: {out[1]}"
    assert float(out[0]) < 2.0


def test_top_level_import_is_tiny() -> None:
    code = "import sys; import thresher; print(','.join(sorted(m for m in ('pyarrow', 'pydantic', 'yaml') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""  # the top-level namespace defers even pyarrow until a step or reader is used
