"""The record: one instruction example, its canonical columns, their Arrow schema and its content id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Canonical columns, in the order every table thresher writes puts them first.
CANONICAL_COLUMNS: tuple[str, ...] = ("id", "instruction", "input", "output", "system", "history")

#: Arrow types of the canonical columns. Every field is nullable in the schema so tables from different steps
#: unify; the readers guarantee non-null `id`, `instruction`, `input` and `history`.
RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("input", pa.string()),
        pa.field("output", pa.string()),
        pa.field("system", pa.string()),
        pa.field("history", pa.list_(pa.list_(pa.string()))),
    ]
)

#: Hex length of a content id (12 bytes of blake2b: no collision in practice below billions of rows).
ID_BYTES = 12


def record_id(
    instruction: str,
    input: str = "",
    output: str | None = None,
    system: str | None = None,
    history: Sequence[Sequence[str]] | None = None,
) -> str:
    """Deterministic content id: blake2b over the canonical JSON of the five content fields.

    The same content always gets the same id, in every process and on every machine; `None` and "" differ
    for `output` and `system` (a missing answer is not an empty one), while `history` None equals [].
    """
    blob = orjson.dumps([instruction, input, output, system, [list(p) for p in history or ()]])
    return hashlib.blake2b(blob, digest_size=ID_BYTES).hexdigest()


class Record(BaseModel):
    """One example. Canonical fields are typed; any other field (source, scores, tags, ...) is kept as given."""

    model_config = ConfigDict(extra="allow")

    id: str = ""
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str | None = None
    system: str | None = None
    history: list[tuple[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fill_id(self) -> Record:
        if not self.id:
            self.id = record_id(self.instruction, self.input, self.output, self.system, self.history)
        return self

    def to_row(self) -> dict[str, Any]:
        """A plain dict: canonical columns first (history as lists of two strings), extra fields after."""
        row: dict[str, Any] = {
            "id": self.id,
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "system": self.system,
            "history": [list(p) for p in self.history],
        }
        row.update(self.model_extra or {})
        return row
