"""Conversions between the containers users hold (HF Dataset, pandas, lists of dicts) and pyarrow Tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa


def as_table(data: Any) -> pa.Table:
    """A pyarrow Table view of `data` (no copy where the container already holds Arrow memory)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    mod = type(data).__module__
    if mod.startswith("datasets"):  # HF datasets.Dataset: backed by an Arrow table already
        table = data.data.table if hasattr(data.data, "table") else data.data
        if getattr(data, "_indices", None) is not None:
            data = data.flatten_indices()
            table = data.data.table
        return table
    if mod.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    if isinstance(data, list):
        if not data:
            return pa.table({})
        # not Table.from_pylist: it takes the columns from the first row only and silently drops keys that
        # appear later (a score only some rows have)
        keys: dict[str, None] = {}
        for row in data:
            keys.update(dict.fromkeys(row))
        return pa.table({k: [row.get(k) for row in data] for k in keys})
    raise TypeError(
        f"cannot use a {type(data).__name__} as a dataset; pass a pyarrow Table, a datasets.Dataset, "
        "a pandas DataFrame, a dict of columns or a list of dicts"
    )


def like(table: pa.Table, template: Any) -> Any:
    """`table` in the same kind of container as `template`."""
    if template is None or isinstance(template, (pa.Table, pa.RecordBatch)):
        return table
    mod = type(template).__module__
    if mod.startswith("datasets"):
        import datasets

        return datasets.Dataset(table)
    if mod.startswith("pandas"):
        return table.to_pandas()
    if isinstance(template, Mapping):
        return table.to_pydict()
    if isinstance(template, list):
        return table.to_pylist()
    return table
