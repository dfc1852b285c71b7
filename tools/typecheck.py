"""Run mypy on thresher's core under its real package name.

The repository root is the package `thresher` (package-dir mapping), which mypy cannot see through an editable
install; a symlink named `thresher` in a temporary folder gives it the right module names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["errors", "pipelines", "data", "filters", "scorers", "llms", "generators", "rewriters", "report", "trainer", "evaluation", "cli", "paths"]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="thresher-mypy-") as tmp:
        (Path(tmp) / "thresher").symlink_to(REPO, target_is_directory=True)
        args = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")]
        for p in PACKAGES:
            args += ["-p", f"thresher.{p}"]
        return subprocess.call(args, cwd=REPO, env={**os.environ, "MYPYPATH": tmp})


if __name__ == "__main__":
    sys.exit(main())
