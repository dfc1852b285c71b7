"""Exact dedup: drop rows whose normalised content equals an earlier row's (the cheap pass before embedding dedup).

How: every row gets a key, blake2b over an unambiguous encoding of its fields' normalised values: each field's value
is written with a type tag and its length (so no value can run into the next field, None differs from "", and 1
from "1"); text is normalised (see `normalise`), lists and dicts are encoded as canonical JSON of their normalised
values. Text columns are normalised with Arrow compute (ASCII rows, most of them) and Python (the rest), in
batches; the first row of every key is kept.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import ConfigError
from thresher.pipelines import GlobalFilter

_SPACE = re.compile(r"\s+")
# ASCII characters Python calls whitespace (str.isspace, \s) and Arrow's ascii_split_whitespace does not
_SEPARATORS = r"[\x1c-\x1f]"
#: The user side of a conversation: what the model is given (the answer is left out, see ExactDedup).
USER_SIDE: tuple[str, ...] = ("system", "history", "instruction", "input")
_BATCH = 65_536
# encodings are large strings: a batch of long texts can pass the 2 GiB a plain string array holds
_TEXT = pa.large_string()


def _text(s: str) -> pa.Scalar:
    return pa.scalar(s, _TEXT)


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: differences a reader would not call different content."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


class ExactDedup(GlobalFilter):
    """Keep the first row of every group with the same normalised `fields`; the others name the row they copy.

    By default (`fields=None`) the key is the whole user side: `system`, `history`, `instruction` and `input`, so
    two conversations that end in the same turn after different earlier turns or system prompts are both kept. A
    column the table lacks counts as null, and a null `history` as [] (as in record ids), so the key does not depend
    on which columns a step happened to write. `output` is left out on purpose: one prompt with two answers is a
    duplicate for SFT (it teaches two targets for one input and weighs that prompt twice), and rows are often
    deduplicated before they have answers at all; add it to `fields` to keep differing answers. Given `fields`,
    each named column must exist. Values of any type are keyed canonically: text normalised (`normalise`), lists
    and dicts by their normalised contents, numbers by value, and None apart from "".
    """

    inputs = ("id", "instruction")
    outputs = ("dedup_key", "duplicate_of")
    VERSION = "3"

    def __init__(self, *, fields: tuple[str, ...] | list[str] | None = None):
        self.fields = fields

    def reads(self) -> tuple[str, ...]:
        return ("id", *self.fields) if self.fields is not None else tuple(self.inputs)

    def check(self) -> None:
        if self.fields is not None and (isinstance(self.fields, str) or not self.fields):
            raise ConfigError(
                f"ExactDedup: `fields` must be a list of column names (or None for the user side {list(USER_SIDE)}); "
                f"got {self.fields!r}"
            )

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        fields = list(self.fields) if self.fields is not None else list(USER_SIDE)
        present = [f for f in fields if f in table.column_names]
        named = present if self.fields is None else fields
        b2 = hashlib.blake2b
        keys: list[str] = []
        for start in range(0, table.num_rows, _BATCH):
            part = table.slice(start, _BATCH)
            n = part.num_rows
            encoded = [
                _encode_column(part.column(f), f == "history")
                if f in part.column_names
                else pa.array([_encode_value(None, f == "history")] * n, _TEXT)
                for f in fields
            ]
            joined = pc.binary_join_element_wise(*encoded, _text("")) if len(encoded) > 1 else encoded[0]
            keys += [b2(blob, digest_size=12).hexdigest() for blob in pc.cast(joined, pa.large_binary()).to_pylist()]
        # the first row of each key: Arrow numbers distinct keys, numpy finds where each first occurs
        key_array = pa.array(keys, pa.string())
        codes = key_array.dictionary_encode().indices.to_numpy()
        _, first_of_code = np.unique(codes, return_index=True)
        first = first_of_code[codes]
        mask = first == np.arange(len(codes))
        ids = pc.cast(table.column("id"), pa.string())
        dup_of = pc.if_else(pa.array(mask), pa.nulls(len(codes), pa.string()), ids.take(pa.array(first)))
        # one reason for every removed row (so reasons can be counted); `duplicate_of` names the kept row
        reason = f"exact duplicate on {', '.join(named)}"
        return pa.array(mask), reason, {"dedup_key": key_array, "duplicate_of": dup_of}


def _encode_column(col: pa.ChunkedArray, null_is_empty_list: bool) -> pa.Array:
    """One non-null string per row: a type tag, the length, ":" and the normalised value ("n" for null)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        text = _normalise_array(arr)
        length = pc.cast(pc.utf8_length(text), _TEXT)
        return pc.fill_null(pc.binary_join_element_wise(_text("s"), length, _text(":"), text, _text("")), _text("n"))
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        # most histories are empty: encode those at once, and only the others one by one
        rest = pc.invert(pc.fill_null(pc.equal(pc.list_value_length(arr), 0), null_is_empty_list))
        empty = pa.array([_encode_value([], False)] * len(arr), _TEXT)
        if not pc.any(rest).as_py():
            return empty
        values = [_encode_value(v, null_is_empty_list) for v in pc.filter(arr, rest).to_pylist()]
        return pc.replace_with_mask(empty, rest, pa.array(values, _TEXT))
    return pa.array([_encode_value(v, null_is_empty_list) for v in arr.to_pylist()], _TEXT)


def _encode_value(v: Any, null_is_empty_list: bool) -> str:
    """The Python side of `_encode_column`: a string is "s<len>:<text>", anything else "j<len>:<canonical JSON>"."""
    if v is None and null_is_empty_list:
        v = []
    if v is None:
        return "n"
    if isinstance(v, str):
        text = normalise(v)
        return f"s{len(text)}:{text}"
    blob = orjson.dumps(_canonical(v), option=orjson.OPT_SORT_KEYS).decode()
    return f"j{len(blob)}:{blob}"


def _normalise_array(arr: pa.Array) -> pa.Array:
    """`normalise` over a string array, nulls kept: Arrow for ASCII rows (NFKC is the identity there and casefold
    is lower), Python for the others and for the rare ASCII separators 0x1c-0x1f (Python's whitespace, not Arrow's).
    """
    arr = arr.cast(_TEXT)
    # split on runs of whitespace and join with one space: three times faster than an RE2 replace
    fast = pc.ascii_trim(pc.binary_join(pc.ascii_split_whitespace(pc.ascii_lower(arr)), _text(" ")), " ")
    other = pc.or_(pc.invert(pc.string_is_ascii(arr)), pc.match_substring_regex(arr, _SEPARATORS))
    other = pc.fill_null(other, False)
    if not pc.any(other).as_py():
        return fast
    slow = [normalise(v) for v in pc.filter(arr, other).to_pylist()]
    return pc.replace_with_mask(fast, other, pa.array(slow, fast.type))


def _canonical(v: Any) -> Any:
    """A value as JSON data whose dump is the same for equal content: text normalised, numbers by value."""
    if isinstance(v, str):
        return normalise(v)
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return {"__float__": repr(v)}  # orjson would write null
        return int(v) if v.is_integer() else v
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, bytes):
        return {"__bytes__": v.hex()}
    return {"__" + type(v).__name__ + "__": str(v)}  # dates, times, decimals: their text is their value
