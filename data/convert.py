"""Whole-file helpers the CLI calls: convert a dataset between layouts and formats, summarize one, peek at columns."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from thresher.data.layouts import CONVERSATION_LAYOUTS, detect_layout, extra_columns, normalize_layout
from thresher.data.readers import ReadResult, read_records_report
from thresher.data.record import CANONICAL_COLUMNS
from thresher.data.repair import DEFAULT_REPAIR, REPAIRS_COLUMN, normalize_repair
from thresher.data.sources import detect_format, read_parquet_table
from thresher.data.writers import write_canonical

#: Columns whose values `summarize` counts (the labels filters and failed rows carry).
LABEL_COLUMNS: tuple[str, ...] = ("rejected_by", "reason", "failed_by")
_TOP_VALUES = 20
_PEEK_BYTES = 1 << 20
_PEEK_RECORDS = 200


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to_layout: str,
    file_format: str | None = None,
    on_bad_record: str = "fail",
    from_layout: str | None = None,
    quarantine_path: str | os.PathLike[str] | None = None,
    extra_columns: bool = True,
    repair: str | Iterable[str] | None = DEFAULT_REPAIR,
) -> int:
    """Read `src` (any layout and format, detected unless `from_layout` is given) and write it to `dst` in
    `to_layout` and `file_format` (None: from dst's extension). Returns the number of rows written.

    repair: fixes for conversations that break the turn rules (see `read_records_report`); the rows it changed
    carry them in the `repairs` column."""
    return convert_report(
        src,
        dst,
        to_layout=to_layout,
        file_format=file_format,
        on_bad_record=on_bad_record,
        from_layout=from_layout,
        quarantine_path=quarantine_path,
        extra_columns=extra_columns,
        repair=repair,
    )[0]


def convert_report(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to_layout: str,
    file_format: str | None = None,
    on_bad_record: str = "fail",
    from_layout: str | None = None,
    quarantine_path: str | os.PathLike[str] | None = None,
    extra_columns: bool = True,
    repair: str | Iterable[str] | None = DEFAULT_REPAIR,
) -> tuple[int, ReadResult]:
    """`convert`, also returning the read report (counts of skipped, quarantined and repaired records)."""
    to_layout = normalize_layout(to_layout)  # a bad choice fails before the read
    res = read_records_report(
        src, layout=from_layout, on_bad_record=on_bad_record, quarantine_path=quarantine_path, repair=repair
    )
    n = write_canonical(res.table, dst, layout=to_layout, file_format=file_format, extra_columns=extra_columns)
    return n, res


# ---- peeking --------------------------------------------------------------------------------------------


def _keys_in_order(records: list[Any]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        if isinstance(r, dict):
            keys.update(dict.fromkeys(r))
    return list(keys)


def _peek_json_lines(data: bytes) -> list[Any]:
    out = []
    for line in data.split(b"\n")[:_PEEK_RECORDS]:
        if line.strip():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue  # the last line of the chunk is usually cut off; bad lines are the reader's business
    return out


def _peek_json_array(path: Path) -> list[Any]:
    size = path.stat().st_size
    n = _PEEK_BYTES
    decoder = json.JSONDecoder()
    while True:
        with open(path, "rb") as fh:
            text = fh.read(n).decode("utf-8", "ignore")
        body = text.lstrip().lstrip("\ufeff").lstrip()
        if not body.startswith("["):
            return []
        recs: list[Any] = []
        pos = 1
        while len(recs) < _PEEK_RECORDS:
            while pos < len(body) and body[pos] in " \t\r\n,":
                pos += 1
            try:
                value, pos = decoder.raw_decode(body, pos)
            except (json.JSONDecodeError, RecursionError):  # nested too deep: the reader names the record
                break
            recs.append(value)
        if recs or n >= size:
            return recs
        n *= 4  # the first record is longer than the chunk


def peek_columns(path: str | os.PathLike[str], file_format: str | None = None) -> list[str]:
    """The top-level keys (columns) of a data file, from its first records or its schema: cheap, no validation."""
    p = Path(path)
    fmt = detect_format(p, file_format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        cols: dict[str, None] = {}
        for f in files:
            cols.update(dict.fromkeys(pq.read_schema(f).names))
        return list(cols)
    if fmt == "csv":
        from thresher.data.sources import _csv_header

        with open(p, "rb") as fh:
            return _csv_header(fh.read(1 << 16).removeprefix(b"\xef\xbb\xbf"))
    if fmt == "hf":
        for info in (p / "dataset_info.json", p / "train" / "dataset_info.json"):
            if info.is_file():
                features = json.loads(info.read_text(encoding="utf-8")).get("features")
                if isinstance(features, dict):
                    return list(features)
        from thresher.data.sources import load

        return list(load(p, "hf", limit=0).frame.columns)
    with open(p, "rb") as fh:
        head = fh.read(_PEEK_BYTES)
    first = head.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if fmt == "jsonl" or first == b"{":
        records = _peek_json_lines(head)
        if fmt == "json" and len(records) <= 1 and detect_layout(_keys_in_order(records)) is None:
            # one object holding the records list: needs the whole document
            from thresher.data.sources import load

            return list(load(p, "json", limit=_PEEK_RECORDS).frame.columns)
        return _keys_in_order(records)
    return _keys_in_order(_peek_json_array(p))


def peek_record_columns(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    file_format: str | None = None,
    repair: str | Iterable[str] | None = DEFAULT_REPAIR,
) -> list[str]:
    """The columns `read_records` will return for this file: canonical ones, then the extras seen in its first
    records (later records may add more)."""
    keys = peek_columns(path, file_format)
    lay = normalize_layout(layout) if layout is not None else detect_layout(keys) or "alpaca"
    cols = [*CANONICAL_COLUMNS, *extra_columns(keys, lay)]
    if normalize_repair(repair) and lay in CONVERSATION_LAYOUTS and REPAIRS_COLUMN not in cols:
        cols.append(REPAIRS_COLUMN)
    return cols


# ---- summaries ------------------------------------------------------------------------------------------


def _numeric_stats(col: pa.ChunkedArray) -> dict[str, Any] | None:
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)) or pa.types.is_boolean(t):
        return None
    arr = pc.drop_null(col)
    if pa.types.is_floating(t):
        arr = pc.filter(arr, pc.invert(pc.is_nan(arr)))
    if not len(arr):
        return {"count": 0}
    return {
        "count": len(arr),
        "min": pc.min(arr).as_py(),
        "mean": pc.mean(arr).as_py(),
        "median": pc.quantile(arr, q=0.5).to_pylist()[0],
        "max": pc.max(arr).as_py(),
    }


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).to_pylist()
    pairs = sorted(((str(d["values"]), d["counts"]) for d in vc if d["values"] is not None), key=lambda x: -x[1])
    out = dict(pairs[:_TOP_VALUES])
    if len(pairs) > _TOP_VALUES:
        out["(other values)"] = sum(c for _, c in pairs[_TOP_VALUES:])
    return out


def summarize(path: str | os.PathLike[str], *, layout: str | None = None, file_format: str | None = None) -> dict:
    """Counts, columns and value summaries of a data file or a folder of Parquet shards.

    Returns {path, file_format, layout, rows, columns, numeric: {column: {count, min, mean, median, max}},
    value_counts: {rejected_by|reason|failed_by: {value: count}}} (plus skipped/truncated when the reader left
    records out). Parquet is summarized as stored, without record checks, so a run's rejected rows can be looked at.
    """
    p = Path(path)
    fmt = detect_format(p, file_format)
    info: dict[str, Any] = {"path": str(p), "file_format": fmt}
    if fmt == "parquet":
        table = read_parquet_table(p)
        info["layout"] = normalize_layout(layout) if layout else detect_layout(table.column_names)
    else:
        res = read_records_report(p, layout=layout, file_format=fmt, on_bad_record="skip")
        table = res.table
        info["layout"] = res.layout
        if res.skipped:
            info["skipped"] = res.skipped
        if res.truncated:
            info["truncated"] = True
    info["rows"] = table.num_rows
    info["columns"] = table.column_names
    numeric = {}
    for name in table.column_names:
        stats = _numeric_stats(table.column(name))
        if stats is not None:
            numeric[name] = stats
    info["numeric"] = numeric
    info["value_counts"] = {c: _value_counts(table.column(c)) for c in LABEL_COLUMNS if c in table.column_names}
    return info
