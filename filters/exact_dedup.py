"""Exact dedup: drop rows whose normalised text equals an earlier row's (the cheap pass before embedding dedup)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines import GlobalFilter

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: differences a reader would not call different content."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


class ExactDedup(GlobalFilter):
    """Keep the first row of every group with the same normalised `fields`; the others name the row they copy."""

    inputs = ("id", "instruction")
    outputs = ("dedup_key", "duplicate_of")
    VERSION = "2"

    def __init__(self, *, fields: tuple[str, ...] | list[str] = ("instruction", "input")):
        self.fields = fields

    def reads(self) -> tuple[str, ...]:
        return ("id", *self.fields)

    def check(self) -> None:
        if not self.fields:
            raise ConfigError("ExactDedup: `fields` must name at least one column")

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        cols = [table.column(f).to_pylist() for f in self.fields]
        ids = table.column("id").to_pylist()
        first: dict[str, Any] = {}
        keys, dup_of, mask = [], [], []
        for i in range(table.num_rows):
            text = "\x1f".join(normalise(c[i]) if isinstance(c[i], str) else "" for c in cols)
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()
            keys.append(key)
            if key in first:
                mask.append(False)
                dup_of.append(first[key])
            else:
                first[key] = ids[i]
                mask.append(True)
                dup_of.append(None)
        # one reason for every removed row (so reasons can be counted); `duplicate_of` names the kept row
        return mask, f"exact duplicate on {', '.join(self.fields)}", {"dedup_key": keys, "duplicate_of": pa.array(dup_of, type=pa.string())}
