"""Writers: a table of records out in any layout and file format, atomically, plus LLaMA-Factory's dataset_info.json.

Every write goes to a temporary file (or folder) beside the target and is moved into place with os.replace, so a
reader sees the old file or the new one, never half of one. Extra columns are kept as top-level keys.

What a format cannot say: Arrow stores one type per column, so a JSON column mixing 1 and 2.5 reads back as
floats, and objects in one column come back with every key any of them had (null where absent). CSV stores
text: nested fields are JSON in the cell, a bare empty cell is null and a quoted one is "", and an extra column
whose every value reads as one JSON kind (numbers, booleans, lists, objects) comes back typed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from thresher.data.layouts import LLAMA_FACTORY_LAYOUTS, layout_columns, normalize_layout
from thresher.data.readers import atomic_write_bytes, records_to_table
from thresher.data.record import CANONICAL_COLUMNS
from thresher.data.sources import EXTENSIONS, FILE_FORMATS, normalize_format
from thresher.errors import ConfigError


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # binary columns (rare): base64 text, the usual JSON spelling
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    try:
        import decimal

        if isinstance(value, decimal.Decimal):
            return str(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"a {type(value).__name__} value cannot be written as JSON")


def layout_table(table: pa.Table, layout: str, *, extra_columns: bool = True) -> pa.Table:
    """A canonical table rearranged into `layout`'s columns, extra columns after them (unless extra_columns=False)."""
    cols = layout_columns(table, layout)
    names = list(cols)
    arrays = list(cols.values())
    if extra_columns:
        for name in table.column_names:
            if name in CANONICAL_COLUMNS or (name == "extra_instances" and normalize_layout(layout) == "self_instruct"):
                continue
            if name in cols:
                raise ConfigError(
                    f"extra column {name!r} has the name of a {layout} layout field; rename it before writing"
                )
            names.append(name)
            arrays.append(table.column(name))
    return pa.table(arrays, names=names)


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(
    table: pa.Table, path: Path, *, lines: bool, omit_empty_input: bool = False, omit_null_system: bool = False
) -> None:
    tmp = _tmp_path(path)
    dumps, default = orjson.dumps, _json_default
    try:
        with open(tmp, "wb") as fh:
            n = 0
            for batch in table.to_batches(max_chunksize=8192):
                rows = batch.to_pylist()
                if omit_empty_input:
                    # a conversation's `input` key only matters when it is not empty (see layouts)
                    for row in rows:
                        if row.get("input") == "":
                            del row["input"]
                if omit_null_system:
                    # beside a messages list, `system` only keeps an empty system that has no turn (see layouts)
                    for row in rows:
                        if "system" in row and row["system"] is None:
                            del row["system"]
                if lines:
                    fh.write(b"".join(dumps(row, default=default) + b"\n" for row in rows))
                else:
                    # strings never hold a raw newline in JSON, so indenting every line of a row is safe
                    parts = [dumps(row, default=default, option=orjson.OPT_INDENT_2) for row in rows]
                    sep = b",\n  "
                    fh.write((b"[\n  " if n == 0 else sep) + sep.join(p.replace(b"\n", b"\n  ") for p in parts))
                n += len(rows)
            if not lines:
                fh.write(b"\n]\n" if n else b"[]\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def _write_parquet(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def _as_csv_text(col: pa.ChunkedArray) -> pa.Array:
    """A column as CSV text: strings as they are, everything else (numbers, lists, objects) as JSON."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.combine_chunks().cast(pa.string())
    if pa.types.is_null(col.type):
        return pa.array([None] * len(col), type=pa.string())
    return pa.array(
        [None if v is None else orjson.dumps(v, default=_json_default).decode() for v in col.to_pylist()],
        type=pa.string(),
    )


def _write_csv(table: pa.Table, path: Path) -> None:
    import pyarrow.csv as pcsv

    text = pa.table([_as_csv_text(c) for c in table.columns], names=table.column_names)
    tmp = _tmp_path(path)
    try:
        # every value quoted, nulls left as bare empty cells: the reader tells null from "" that way
        pcsv.write_csv(text, tmp, pcsv.WriteOptions(quoting_style="all_valid"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def _write_hf(table: pa.Table, path: Path) -> None:
    import datasets

    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        if was_enabled:
            datasets.disable_progress_bars()  # a progress bar per save is noise in logs and tests
        try:
            datasets.Dataset(table).save_to_disk(str(tmp))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        if path.exists():
            # a directory cannot be replaced in one step: move the old one aside first, drop it after
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_records(
    table: Any,
    path: str | os.PathLike[str],
    *,
    layout: str = "alpaca",
    file_format: str | None = None,
    extra_columns: bool = True,
) -> int:
    """Write records (a pyarrow Table, datasets.Dataset, DataFrame or list of dicts) to `path`; returns rows written.

    layout: alpaca, sharegpt, messages (alias openai), prompt_completion (TRL's conversational view) or
    self_instruct. file_format: json, jsonl, parquet, csv or hf (a save_to_disk folder); None goes by the
    extension. extra_columns=False writes only the layout's own fields (a clean file for a trainer).
    """
    layout = normalize_layout(layout)
    return write_canonical(
        records_to_table(table), path, layout=layout, file_format=file_format, extra_columns=extra_columns
    )


def write_canonical(
    table: pa.Table,
    path: str | os.PathLike[str],
    *,
    layout: str = "alpaca",
    file_format: str | None = None,
    extra_columns: bool = True,
) -> int:
    """`write_records` for a table already in canonical form (as `read_records` returns it): skips re-validation."""
    layout = normalize_layout(layout)
    p = Path(path)
    fmt = normalize_format(file_format) if file_format is not None else _format_for_write(p)
    out = layout_table(table, layout, extra_columns=extra_columns)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("json", "jsonl"):
        _write_json(
            out,
            p,
            lines=fmt == "jsonl",
            omit_empty_input=layout in ("sharegpt", "messages", "prompt_completion"),
            omit_null_system=layout in ("messages", "prompt_completion"),
        )
    elif fmt == "parquet":
        _write_parquet(out, p)
    elif fmt == "csv":
        _write_csv(out, p)
    else:
        _write_hf(out, p)
    return out.num_rows


def _format_for_write(p: Path) -> str:
    ext = p.suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        return "hf"
    raise ConfigError(
        f"{p}: cannot tell the file format from the extension {ext or '(none)'!r}; pass file_format, one of "
        f"{', '.join(FILE_FORMATS)}"
    )


# ---- LLaMA-Factory ------------------------------------------------------------------------------------


def dataset_info_entry(file_name: str, layout: str, columns: list[str] | None = None) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entry for a file we wrote in `layout`.

    `columns`: the file's top-level columns when known; optional mappings (system, history) are then given only
    for columns the file has, since LLaMA-Factory looks up every mapped column.
    """
    layout = normalize_layout(layout)
    if layout not in LLAMA_FACTORY_LAYOUTS:
        raise ConfigError(
            f"LLaMA-Factory reads the layouts {', '.join(LLAMA_FACTORY_LAYOUTS)}; {layout!r} is not one of them"
        )

    def has(c: str) -> bool:
        return columns is None or c in columns

    if layout == "alpaca":
        cols = {"prompt": "instruction", "query": "input", "response": "output"}
        cols.update({k: k for k in ("system", "history") if has(k)})
        return {"file_name": file_name, "formatting": "alpaca", "columns": cols}
    if layout == "sharegpt":
        cols = {"messages": "conversations"}
        if has("system"):
            cols["system"] = "system"
        tags = {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
        }
        return {"file_name": file_name, "formatting": "sharegpt", "columns": cols, "tags": tags}
    tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}


def _columns_of(path: Path) -> list[str] | None:
    """Top-level columns of a data file we can peek at cheaply, or None."""
    from thresher.data.convert import peek_columns

    try:
        return peek_columns(path)
    except Exception:
        return None


def write_dataset_info(dir: str | os.PathLike[str], name: str, file_name: str, layout: str) -> Path:
    """Add (or replace) dataset `name` in `dir`/dataset_info.json, keeping every other entry; returns the file path.

    `file_name` is relative to `dir`, as LLaMA-Factory expects. When that file exists, optional columns it lacks
    are left out of the mapping.
    """
    d = Path(dir)
    info_path = d / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{info_path}: not valid JSON ({e}); fix or remove it before adding datasets") from e
        if not isinstance(info, dict):
            raise ConfigError(f"{info_path}: expected a JSON object of datasets, found {type(info).__name__}")
    data_file = d / file_name
    info[name] = dataset_info_entry(file_name, layout, _columns_of(data_file) if data_file.exists() else None)
    atomic_write_bytes(info_path, json.dumps(info, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    return info_path
