"""Records and file helpers shared by the data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: File name suffix per format ("" for a save_to_disk folder).
SUFFIX = {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet", "csv": ".csv", "hf": ""}


def sample_rows() -> list[dict[str, Any]]:
    """Single- and multi-turn rows, a system prompt, an input, a missing answer, and extra columns of each kind."""
    return [
        {
            "instruction": "Say hi.",
            "input": "",
            "output": "Hi!",
            "source": "seed",
            "score": 4.5,
            "tags": ["greeting"],
            "meta": {"lang": "en", "turns": 1},
        },
        {
            "instruction": "Translate to English.",
            "input": "Bonjour tout le monde",
            "output": "Hello everyone",
            "system": "You are a terse translator.",
            "history": [["What is 2+2?", "4"], ["And 3+3?", "6"]],
            "source": "evol",
            "score": 3.25,
            "tags": [],
            "meta": {"lang": "fr", "turns": 3},
        },
        {
            "instruction": "Continue the story:\nOnce upon a time",
            "input": "line one\nline two",
            "output": None,
            "source": "self_instruct",
            "score": None,
            "tags": ["story", "creative"],
            "meta": {"lang": "en", "turns": 1},
        },
        {
            "instruction": "Résumé en une phrase — « ünïcödé » 漢字 🙂",
            "input": "",
            "output": "",
            "system": "",
            "history": [["", ""]],
            "source": "seed",
            "score": 0.0,
            "tags": ["unicode"],
            "meta": {"lang": "fr", "turns": 2},
        },
    ]


def data_path(folder: Path, stem: str, file_format: str) -> Path:
    return folder / f"{stem}{SUFFIX[file_format]}" if SUFFIX[file_format] else folder / f"{stem}_hf"


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    """A JSONL file from raw lines (bytes are written as they are, so tests can plant bad bytes)."""
    raw = b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
    path.write_bytes(raw)
    return path
