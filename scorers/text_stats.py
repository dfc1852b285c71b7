"""Cheap text statistics (characters, words) that later filters and reports use."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thresher.pipelines import RowStep, runtime


def _words(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.fill_null(pc.count_substring_regex(col, r"\S+"), 0)


class TextStats(RowStep):
    """Adds character and word counts of the instruction (with its input) and of the output."""

    inputs = ("instruction", "input", "output")
    outputs = ("instruction_words", "output_words", "output_chars")
    VERSION = "1"

    def __init__(self, *, batch_size: int = runtime(8192)):
        self.batch_size = batch_size

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        out = batch.column("output")
        return {
            "instruction_words": pc.add(_words(batch.column("instruction")), _words(batch.column("input"))),
            "output_words": _words(out),
            "output_chars": pc.fill_null(pc.utf8_length(out), 0),
        }


class SetValue(RowStep):
    """Sets `column` to one constant `value` on every row (e.g. `source: alpaca` before a concat)."""

    outputs = ("source",)
    VERSION = "1"

    def __init__(self, *, column: str = "source", value: Any = None, batch_size: int = runtime(8192)):
        self.column, self.value, self.batch_size = column, value, batch_size

    def writes(self) -> tuple[str, ...]:
        return (self.column,)

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        return {self.column: pa.array([self.value] * batch.num_rows)}
