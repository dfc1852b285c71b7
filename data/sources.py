"""File formats: load JSON, JSONL, Parquet, CSV and HF datasets into a Frame, and say where each record came from.

Clean files take the fast road: orjson for JSON and JSONL, pyarrow for Parquet and CSV. Only when that fails (a
malformed or truncated JSON file, bytes that are not UTF-8, a CSV row with the wrong number of cells, values nested
deeper than a record may hold) do we go record by record to find the line or row, so a bad record costs time only
in the file that has one. The stdlib parser of that road recurses; a record too deep for it is measured without
recursion and becomes a bad record like any other (MAX_NESTING_DEPTH).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from thresher.data.layouts import (
    MAX_NESTING_DEPTH,
    MISSING,
    Frame,
    Problem,
    describe,
    nesting_depth,
    too_deep,
    type_depth,
)
from thresher.errors import ConfigError, RecordError

FILE_FORMATS: tuple[str, ...] = ("json", "jsonl", "parquet", "csv", "hf")
EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
_BOM = b"\xef\xbb\xbf"
# pyarrow JSON block: a line longer than this sends the file down the record-by-record road
_JSON_BLOCK = 16 << 20
_WS = re.compile(r"[ \t\n\r]*")
_KEY = re.compile(r'"((?:[^"\\\n]|\\.){1,200})"\s*:')
_NEXT_RECORD = re.compile(r"\}\s*,\s*(?=\{)")
# what _extent counts: whole strings (brackets in them do not count; group 1: a key) and brackets
_JSON_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"(?=\s*:)|"(?:[^"\\]|\\.)*"|[\[\]{}]')
# keys under which a JSON object commonly holds its list of records, in order of preference
_LIST_KEYS = ("data", "train", "examples", "records", "rows", "instances", "items")
# top-level keys that make a JSON object one record rather than a holder of records
_RECORD_KEYS = frozenset({"instruction", "conversations", "messages", "prompt"})


def normalize_format(file_format: str) -> str:
    f = file_format.lower().lstrip(".")
    if f in ("ndjson", "json_lines"):
        f = "jsonl"
    if f in ("arrow", "datasets", "huggingface"):
        f = "hf"
    if f not in FILE_FORMATS:
        raise ConfigError(f"unknown file format {file_format!r}; valid formats: {', '.join(FILE_FORMATS)}")
    return f


def detect_format(path: Path, file_format: str | None = None) -> str:
    """The file format of `path`: the explicit one, else from a directory's contents or the file extension."""
    if file_format is not None:
        return normalize_format(file_format)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise ConfigError(
            f"{path}: a directory that is neither a Hugging Face dataset saved with save_to_disk (state.json or "
            "dataset_dict.json) nor a folder of .parquet shards; pass file_format"
        )
    ext = path.suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise ConfigError(
        f"{path}: cannot tell the file format from the extension {ext or '(none)'!r}; pass file_format, one of "
        f"{', '.join(FILE_FORMATS)} (extensions: {', '.join(sorted(EXTENSIONS))})"
    )


@dataclass
class Source:
    """A loaded file: its records as a Frame, and how to point at record i (line or row) and show it raw."""

    path: Path
    file_format: str
    frame: Frame
    row_based: bool  # True: Parquet/CSV/HF, positions are 1-based rows; False: JSON(L), 1-based lines
    #: the file ends in the middle of its records (the partial record, if any text of it exists, is in frame.bad)
    truncated: bool = False
    line_of: Callable[[int], int | None] = field(default=lambda i: None)
    raw_of: Callable[[int], Any] | None = None

    def where(self, i: int) -> dict[str, int | None]:
        if self.row_based:
            return {"line": None, "row": i + 1}
        return {"line": self.line_of(i), "row": None}

    def raw(self, i: int) -> Any:
        if self.raw_of is not None:
            return self.raw_of(i)
        return self.frame.row(i)


def load(path: Path, file_format: str, *, limit: int | None = None) -> Source:
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    loader = {"json": _load_json, "jsonl": _load_jsonl, "parquet": _load_parquet, "csv": _load_csv, "hf": _load_hf}
    return loader[file_format](path, limit)


# ---- JSON Lines ---------------------------------------------------------------------------------------


def _key_before(text: str, pos: int) -> str | None:
    """The last object key before `pos`: names the field a JSON syntax error sits in."""
    keys = _KEY.findall(text, max(0, pos - 100_000), pos)
    return keys[-1] if keys else None


def _extent(text: str, pos: int) -> tuple[int, int, str | None]:
    """(end, depth, field) of the JSON array or object at text[pos], found without parsing or recursion: the
    position after it (-1 when the text ends first), how many levels it nests, and for an object, the key of its
    deepest field."""
    depth = deepest = 0
    key = field = None
    for m in _JSON_TOKEN.finditer(text, pos):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest, field = depth, key
        elif c == "]" or c == "}":
            depth -= 1
            if depth == 0:
                return m.end(), deepest, field
        elif depth == 1 and m.group(1) is not None:
            key = m.group(1)
    return -1, deepest, field


def _too_deep_text(text: str, pos: int, may_be_truncated: bool) -> tuple[int, Problem]:
    """The end and the Problem of a record at text[pos] the stdlib parser could not follow (RecursionError)."""
    end, depth, field = _extent(text, pos)
    if end < 0 and may_be_truncated:
        return len(text), Problem(field, "the file ends in the middle of this record", True)
    # an object's own braces are a level: its fields nest one less
    return (len(text) if end < 0 else end), Problem(field, too_deep(depth - 1 if field is not None else depth))


def _deep_field(value: dict[str, Any]) -> Problem | None:
    """A record's first field nested deeper than MAX_NESTING_DEPTH (checked before any recursive walk of it)."""
    for k, v in value.items():
        if isinstance(v, (list, dict)):
            depth = nesting_depth(v)
            if depth > MAX_NESTING_DEPTH:
                return Problem(str(k), too_deep(depth))
    return None


def _surrogate_path(value: Any, where: str = "") -> str | None:
    """Dotted path of the first string holding an unpaired surrogate (text that was not valid UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return None
        except UnicodeEncodeError:
            return where or "(value)"
    if isinstance(value, dict):
        for k, v in value.items():
            p = _surrogate_path(k, where) or _surrogate_path(v, f"{where}.{k}" if where else str(k))
            if p:
                return p
    if isinstance(value, list):
        for j, v in enumerate(value):
            p = _surrogate_path(v, f"{where}[{j}]")
            if p:
                return p
    return None


def _diagnose_line(raw: bytes, *, may_be_truncated: bool) -> tuple[Any, Problem | None]:
    """Why orjson refused a line: bad UTF-8 (and in which field), a syntax error, or a truncated last line."""
    try:
        text = raw.decode("utf-8")
        bad_utf8 = False
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
        bad_utf8 = True
    try:
        value = json.loads(text)  # the stdlib accepts what orjson refuses (lone surrogates)
    except json.JSONDecodeError as e:
        stripped = len(text.rstrip())
        if may_be_truncated and (e.pos >= stripped or e.msg.startswith("Unterminated string")):
            return None, Problem(_key_before(text, e.pos), "the file ends in the middle of this record", True)
        return None, Problem(_key_before(text, e.pos), f"not valid JSON: {e.msg} (column {e.colno})")
    except RecursionError:  # nested deeper than orjson's 1,024 levels and the stdlib's stack
        return None, _too_deep_text(text, len(text) - len(text.lstrip()), may_be_truncated)[1]
    if not isinstance(value, dict):
        return None, Problem(None, f"expected a JSON object, found {describe(value)}")
    deep = _deep_field(value)
    if deep is not None:
        return None, deep
    where = _surrogate_path(value)
    if where is not None:
        what = "bytes that are not valid UTF-8" if bad_utf8 else "an unpaired surrogate escape (not valid Unicode)"
        return None, Problem(where, f"holds {what}")
    return value, None


def _inferred_ok(t: pa.DataType) -> bool:
    """Types pyarrow's JSON reader may infer that still read back as the same JSON (no timestamps from text), and
    no deeper than a record may hold (deeper ones take the record-by-record road, which names the record)."""
    return type_depth(t) <= MAX_NESTING_DEPTH and _inferred_ok_types(t)


def _inferred_ok_types(t: pa.DataType) -> bool:
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _inferred_ok_types(t.value_type)
    if pa.types.is_struct(t):
        return all(_inferred_ok_types(t.field(i).type) for i in range(t.num_fields))
    return True


def _arrow_jsonl(data: bytes) -> pa.Table | None:
    """The fast road for a clean JSONL file: pyarrow's multithreaded reader. None when anything is off."""
    import pyarrow.json as pj

    table = None
    for block in (1 << 20, _JSON_BLOCK):  # small blocks parse in parallel; a long line needs a big one
        try:
            table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=block))
            break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            if "straddl" not in str(e):
                return None
    if table is None:
        return None
    if not table.num_columns or not all(_inferred_ok(f.type) for f in table.schema):
        return None
    try:
        table.validate(full=True)  # the JSON reader lets bytes that are not UTF-8 through; this catches them
    except pa.ArrowInvalid:
        return None
    return table


def _jsonl_source(path: Path, data: bytes, table: pa.Table) -> Source:
    spans: list[tuple[int, int, int]] = []  # (line number, start, end) of each non-blank line

    def span(i: int) -> tuple[int, int, int]:
        if not spans:  # only a bad record needs its line: find the non-blank lines once
            start = 0
            for n, raw in enumerate(data.split(b"\n")):
                if raw and not raw.isspace():
                    spans.append((n + 1, start, start + len(raw)))
                start += len(raw) + 1
        return spans[i]

    def raw_of(i: int) -> str:
        _, a, b = span(i)
        return data[a:b].decode("utf-8", "backslashreplace").rstrip("\r")

    return Source(path, "jsonl", _arrow_frame(table), False, line_of=lambda i: span(i)[0], raw_of=raw_of)


def _load_jsonl(path: Path, limit: int | None, data: bytes | None = None) -> Source:
    if data is None:
        data = path.read_bytes()
        if limit is None and not data.startswith(_BOM):
            table = _arrow_jsonl(data)
            if table is not None:
                return _jsonl_source(path, data, table)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    lines = data.split(b"\n")
    last = len(lines) - 1
    while last >= 0 and (not lines[last] or lines[last].isspace()):
        last -= 1
    ends_cleanly = data.rstrip(b" \t\r").endswith(b"\n")
    recs: list[dict[str, Any]] = []
    line_nos: list[int] = []
    bad: dict[int, Problem] = {}
    loads = orjson.loads
    for ln, raw in enumerate(lines):
        if not raw or raw.isspace():
            continue
        if limit is not None and len(recs) >= limit:
            break
        try:
            rec = loads(raw)
        except orjson.JSONDecodeError:
            rec, problem = _diagnose_line(raw, may_be_truncated=(ln == last and not ends_cleanly))
            if problem is not None:
                bad[len(recs)] = problem
                rec = {}
        else:
            if type(rec) is not dict:
                bad[len(recs)] = Problem(None, f"expected a JSON object, found {describe(rec)}")
                rec = {}
        recs.append(rec)
        line_nos.append(ln + 1)
    frame = _frame_from_dicts(recs, bad)

    def raw_of(i: int) -> str:
        return lines[line_nos[i] - 1].decode("utf-8", "backslashreplace").rstrip("\r")

    truncated = any(p.truncated for p in bad.values())
    return Source(path, "jsonl", frame, False, truncated, line_of=lambda i: line_nos[i], raw_of=raw_of)


def _frame_from_dicts(recs: list[dict[str, Any]], bad: dict[int, Problem]) -> Frame:
    keys: dict[str, None] = dict.fromkeys(recs[0]) if recs else {}
    if set().union(*recs) != keys.keys():  # rows with other keys: keep first-seen order
        for r in recs:
            keys.update(dict.fromkeys(r))
    columns: dict[str, list[Any] | pa.ChunkedArray | pa.Array] = {k: [r.get(k, MISSING) for r in recs] for k in keys}
    return Frame(len(recs), columns, bad)


# ---- JSON ---------------------------------------------------------------------------------------------


class _Scan:
    """Walks a JSON document value by value with the stdlib decoder, keeping every record's position."""

    def __init__(self, path: Path, text: str, bad_utf8: bool, want_key: str | None = None) -> None:
        self.path, self.text, self.bad_utf8, self.want_key = path, text, bad_utf8, want_key
        self.truncated = False
        self.decoder = json.JSONDecoder()
        self.recs: list[dict[str, Any]] = []
        self.spans: list[tuple[int, int]] = []
        self.bad: dict[int, Problem] = {}
        self._line_at = (0, 1)

    def ws(self, pos: int) -> int:
        m = _WS.match(self.text, pos)
        return m.end() if m else pos

    def line(self, pos: int) -> int:
        # positions are asked in increasing order: count newlines incrementally
        p0, l0 = self._line_at
        if pos < p0:
            p0, l0 = 0, 1
        n = l0 + self.text.count("\n", p0, pos)
        self._line_at = (pos, n)
        return n

    def fail(self, pos: int, msg: str) -> RecordError:
        return RecordError(msg, path=str(self.path), line=self.line(pos), field=_key_before(self.text, pos))

    def array(self, pos: int, limit: int | None) -> int:
        """Scan the records array starting at text[pos] == '['; returns the position after it."""
        text, end = self.text, len(self.text)
        pos = self.ws(pos + 1)
        if pos < end and text[pos] == "]":
            return pos + 1
        while True:
            pos = self.ws(pos)
            if pos >= end:
                self._truncated(pos, pos)
                return pos
            if limit is not None and len(self.recs) >= limit:
                return end
            start = pos
            try:
                value, pos = self.decoder.raw_decode(text, pos)
            except RecursionError:  # deeper than the stdlib parser's stack: measured without parsing
                pos, problem = _too_deep_text(text, start, True)
                self._add({}, start, pos, problem)
                if problem.truncated:
                    self.truncated = True
                    return end
            except json.JSONDecodeError as e:
                if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
                    self._truncated(start, e.pos)
                    return end
                nxt = self._resync(e.pos)
                self._add({}, start, nxt[0], Problem(_key_before(text, e.pos), f"not valid JSON: {e.msg}"))
                if nxt[1] is None:
                    return end
                pos = nxt[1]
                continue
            else:
                self._add_value(value, start, pos)
            pos = self.ws(pos)
            if pos >= end:
                self._truncated(pos, pos)
                return pos
            if text[pos] == ",":
                pos += 1
            elif text[pos] == "]":
                return pos + 1
            else:
                nxt = self._resync(pos)
                why = f"expected ',' or ']' after this record, found {text[pos]!r}"
                self.bad.setdefault(len(self.recs) - 1, Problem(None, why))
                if nxt[1] is None:
                    return end
                pos = nxt[1]

    def _resync(self, pos: int) -> tuple[int, int | None]:
        """After a broken record: (end of its text, start of the next record) — the next '},' + '{' boundary."""
        m = _NEXT_RECORD.search(self.text, pos)
        if m is None:
            close = self.text.rfind("]")
            return (close if close > pos else len(self.text)), None
        return m.start() + 1, m.end()

    def _add_value(self, value: Any, start: int, stop: int) -> None:
        problem = None
        if not isinstance(value, dict):
            problem, value = Problem(None, f"expected a JSON object, found {describe(value)}"), {}
        elif (deep := _deep_field(value)) is not None:
            problem, value = deep, {}
        elif self.bad_utf8 or "\\ud" in self.text[start:stop].lower():
            where = _surrogate_path(value)
            if where is not None:
                what = "bytes that are not valid UTF-8" if self.bad_utf8 else "an unpaired surrogate escape"
                problem, value = Problem(where, f"holds {what}"), {}
        self._add(value, start, stop, problem)

    def _add(self, value: dict[str, Any], start: int, stop: int, problem: Problem | None) -> None:
        if problem is not None:
            self.bad[len(self.recs)] = problem
        self.recs.append(value)
        self.spans.append((start, stop))

    def _truncated(self, start: int, err_pos: int) -> None:
        self.truncated = True
        if self.text[start:].strip():
            key = _key_before(self.text, err_pos)
            self._add({}, start, len(self.text), Problem(key, "the file ends in the middle of this record", True))

    def document(self, limit: int | None) -> None:
        text = self.text
        pos = self.ws(0)
        if pos >= len(text):
            raise RecordError("the file is empty: expected a JSON array of records", path=str(self.path))
        if text[pos] == "[":
            pos = self.array(pos, limit)
        elif text[pos] == "{":
            pos = self._object(pos, limit)
        else:
            raise self.fail(pos, f"expected a JSON array of records or an object holding one, found {text[pos]!r}")
        pos = self.ws(pos)
        if pos < len(text) and not self.bad and not (limit is not None and len(self.recs) >= limit):
            raise self.fail(pos, "unexpected data after the end of the JSON document")

    def _object(self, pos: int, limit: int | None) -> int:
        """A top-level object: its first key whose value is an array of objects holds the records."""
        text, end = self.text, len(self.text)
        pos = self.ws(pos + 1)
        found = False
        while pos < end and text[pos] != "}":
            try:
                key, pos = self.decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise self._object_error(e) from None
            if key in _RECORD_KEYS and not found:
                # a file holding one record object, not a list of them: no record positions to recover
                raise self.fail(pos, "not valid JSON (the file holds a single record object)")
            pos = self.ws(pos)
            if pos >= end or text[pos] != ":":
                raise self._object_error(None, pos, f"expected ':' after key {key!r}")
            pos = self.ws(pos + 1)
            after_bracket = self.ws(pos + 1) if pos < end and text[pos] == "[" else -1
            wanted = key == self.want_key if self.want_key else after_bracket >= end or text[after_bracket] == "{"
            if not found and after_bracket >= 0 and wanted:
                found = True
                pos = self.array(pos, limit)
                if self.truncated:
                    return end
            else:
                try:
                    _, pos = self.decoder.raw_decode(text, pos)
                except json.JSONDecodeError as e:
                    raise self._object_error(e) from None
                except RecursionError:  # a deep value beside the records: step over it, it is not read
                    stop = _extent(text, pos)[0]
                    if stop < 0:
                        raise self._object_error(None, end, "the file ends before the JSON object closes") from None
                    pos = stop
            pos = self.ws(pos)
            if pos < end and text[pos] == ",":
                pos = self.ws(pos + 1)
        if pos >= end:
            if found:
                self._truncated(end, end)
                return end
            raise self._object_error(None, pos, "the file ends before the JSON object closes")
        if not found:
            raise self.fail(pos, "the JSON object holds no list of records")
        return pos + 1

    def _object_error(self, e: json.JSONDecodeError | None, pos: int = 0, msg: str = "") -> RecordError:
        if e is not None:
            pos, msg = e.pos, f"not valid JSON: {e.msg}"
        if pos >= len(self.text.rstrip()):
            return _truncated_error(self.path, len(self.recs), self.line(pos))
        return self.fail(pos, msg)


def _truncated_error(path: Path, complete: int, line: int | None) -> RecordError:
    from thresher.errors import TruncatedFileError

    return TruncatedFileError(
        f"the file is truncated: it ends in the middle of a record; {complete} complete record(s) before it",
        path=str(path),
        complete_records=complete,
        line=line,
    )


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape"), True


def _pick_list(doc: dict[str, Any], path: Path) -> str | None:
    """The key of the records list inside a JSON object, or None when the object is one record itself."""
    if _RECORD_KEYS & doc.keys():
        return None
    lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v[:100])]
    if not lists:
        lists = [k for k, v in doc.items() if isinstance(v, list)]
    if len(lists) == 1:
        return lists[0]
    for k in _LIST_KEYS:
        if k in lists:
            return k
    if not lists:
        raise RecordError(
            f"the JSON object holds no list of records (keys: {sorted(doc)[:10]})", path=str(path), line=1
        )
    raise RecordError(
        f"the JSON object holds several lists {lists}; cannot tell which holds the records", path=str(path)
    )


def _load_json(path: Path, limit: int | None) -> Source:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    head = data.lstrip()[:1]
    if head == b"{" and _looks_like_jsonl(data):
        src = _load_jsonl(path, limit, data)
        src.file_format = "json"
        return src
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _scan_json(path, data, limit)
    list_key = None
    if isinstance(doc, dict):
        list_key = _pick_list(doc, path)
        recs_any: list[Any] = [doc] if list_key is None else doc[list_key]
    elif isinstance(doc, list):
        recs_any = doc
    else:
        raise RecordError(
            f"expected a JSON array of records or an object holding one, found {describe(doc)}", path=str(path), line=1
        )
    if limit is not None:
        recs_any = recs_any[:limit]
    bad: dict[int, Problem] = {}
    recs: list[dict[str, Any]] = []
    for i, r in enumerate(recs_any):
        if type(r) is dict:
            recs.append(r)
        else:
            bad[i] = Problem(None, f"expected a JSON object, found {describe(r)}")
            recs.append({})
    frame = _frame_from_dicts(recs, bad)
    scan: list[_Scan] = []

    def scanned() -> _Scan:
        # positions are only needed to report a bad record: scan the text once, on first use
        if not scan:
            s = _Scan(path, _decode(data)[0], False, list_key)
            s.document(limit)
            scan.append(s)
        return scan[0]

    def line_of(i: int) -> int | None:
        if isinstance(doc, dict) and list_key is None:
            return 1
        s = scanned()
        return s.line(s.spans[i][0]) if i < len(s.spans) else None

    def raw_of(i: int) -> Any:
        if isinstance(doc, dict) and list_key is None:
            return recs_any[i]
        s = scanned()
        a, b = s.spans[i]
        return s.text[a:b]

    return Source(path, "json", frame, False, line_of=line_of, raw_of=raw_of)


def _looks_like_jsonl(data: bytes) -> bool:
    """A .json file holding one object per line (HF and LLaMA-Factory read those as JSON too)."""
    first, sep, rest = data.lstrip().partition(b"\n")
    if not sep or not rest.strip():
        return False
    try:
        return isinstance(orjson.loads(first), dict) and rest.lstrip()[:1] == b"{"
    except orjson.JSONDecodeError:
        return False


def _scan_json(path: Path, data: bytes, limit: int | None) -> Source:
    text, bad_utf8 = _decode(data)
    s = _Scan(path, text, bad_utf8)
    s.document(limit)
    frame = _frame_from_dicts(s.recs, s.bad)

    def raw_of(i: int) -> str:
        a, b = s.spans[i]
        return text[a:b].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

    return Source(path, "json", frame, False, s.truncated, line_of=lambda i: s.line(s.spans[i][0]), raw_of=raw_of)


# ---- Parquet, HF datasets ------------------------------------------------------------------------------


def _arrow_frame(table: pa.Table) -> Frame:
    return Frame(table.num_rows, {name: table.column(name) for name in table.column_names})


def read_parquet_table(path: Path, limit: int | None = None) -> pa.Table:
    """A Parquet file, or every .parquet shard of a folder in name order (schemas unified, missing columns null)."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    tables = []
    total = 0
    for f in files:
        if limit is None:
            tables.append(pq.read_table(f))
        else:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=min(max(limit - total, 1), 65536)):
                tables.append(pa.Table.from_batches([batch]))
                total += batch.num_rows
                if total >= limit:
                    break
        if limit is not None and total >= limit:
            break
    if not tables:
        return pa.table({})
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    return table.slice(0, limit) if limit is not None else table


def _load_parquet(path: Path, limit: int | None) -> Source:
    return Source(path, "parquet", _arrow_frame(read_parquet_table(path, limit)), row_based=True)


def _load_hf(path: Path, limit: int | None) -> Source:
    import datasets

    from thresher.pipelines.tables import as_table

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            if len(splits) > 1:
                logging.getLogger("thresher.data").warning(
                    "%s is a DatasetDict with splits %s: reading 'train' only; to read another split, give its "
                    "folder (e.g. %s)", path, splits, Path(path) / next(s for s in splits if s != "train"),
                )
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise ConfigError(f"{path}: a DatasetDict with splits {splits} and no 'train'; save one split")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return Source(path, "hf", _arrow_frame(as_table(ds)), row_based=True)


# ---- CSV ---------------------------------------------------------------------------------------------


def _csv_header(data: bytes) -> list[str]:
    head = data[: 1 << 16].decode("utf-8", "replace")
    try:
        return next(csv.reader(io.StringIO(head)))
    except StopIteration:
        return []


def _load_csv(path: Path, limit: int | None) -> Source:
    import pyarrow.csv as pcsv

    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    header = _csv_header(data)
    if not header:
        return Source(path, "csv", Frame(0, {}), row_based=True)
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: Any) -> str:
        invalid.append((row.number, f"expected {row.expected_columns} cells, found {row.actual_columns}: {row.text}"))
        return "skip"

    def read(kind: pa.DataType) -> pa.Table:
        invalid.clear()
        return pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(use_threads=False),
            parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            # empty unquoted cells are null, quoted "" is the empty string: the writer keeps that distinction
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(header, kind), strings_can_be_null=True, quoted_strings_can_be_null=False
            ),
        )

    bad: dict[int, Problem] = {}
    try:
        table = read(pa.string())
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
    except pa.ArrowInvalid as e:
        if "UTF8" not in str(e) and "utf8" not in str(e).lower():
            raise RecordError(f"cannot parse the CSV file: {e}", path=str(path)) from e
        table = read(pa.binary())
        columns = {}
        for name in table.column_names:
            vals: list[Any] = []
            for j, b in enumerate(table.column(name).to_pylist()):
                if b is None:
                    vals.append(None)
                    continue
                try:
                    vals.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    vals.append(b.decode("utf-8", "backslashreplace"))
                    bad.setdefault(j, Problem(name, "holds bytes that are not valid UTF-8"))
            columns[name] = vals
    # put skipped rows back in their place so every index is the data row number minus one
    n_valid = table.num_rows
    if invalid:
        bad_rows = {num - 2: why for num, why in invalid if num is not None}
        total = n_valid + len(invalid)
        keep_pos = [i for i in range(total) if i not in bad_rows]
        shifted_bad = {keep_pos[j]: p for j, p in bad.items()}
        full: dict[str, list[Any]] = {name: [MISSING] * total for name in columns}
        for name, vals in columns.items():
            col = full[name]
            for j, v in enumerate(vals):
                col[keep_pos[j]] = v
        columns = full
        bad = shifted_bad
        for i, why in bad_rows.items():
            bad[i] = Problem(None, f"malformed CSV row: {why[:200]}")
        n_valid = total
    if limit is not None and n_valid > limit:
        columns = {k: v[:limit] for k, v in columns.items()}
        bad = {i: p for i, p in bad.items() if i < limit}
        n_valid = limit
    frame = Frame(n_valid, dict(columns), bad, from_text=True)
    return Source(path, "csv", frame, row_based=True)
