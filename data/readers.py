"""Readers: any supported layout and file format into one Arrow table of records, with bad records handled as asked.

A record that cannot be read becomes a RecordError naming the file, the line (JSON, JSONL) or row (Parquet, CSV,
HF; row 1 is the first record) and the field. `on_bad_record` decides what happens next: "fail" raises the first
one in file order; "skip" drops each with a logged warning; "quarantine" also writes it, raw, to a JSONL file with
where and why. Either way the counts balance: read = kept + skipped + quarantined.

`repair` (off by default; see thresher.data.repair) fixes conversations that break the turn rules instead of
leaving them out; the report counts each kind of repair, and the `repairs` column names those made to each row.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from thresher.data.layouts import (
    MISSING,
    Frame,
    Problem,
    TypeConflict,
    build_table,
    detect_layout,
    normalize_layout,
    to_canonical,
)
from thresher.data.record import Record
from thresher.data.repair import DEFAULT_REPAIR, REPAIRS, normalize_repair
from thresher.data.sources import Source, detect_format, load
from thresher.errors import ConfigError, RecordError, TruncatedFileError

log = logging.getLogger("thresher.data")

ON_BAD_RECORD: tuple[str, ...] = ("fail", "skip", "quarantine")

#: Longest string a field may hold by default (characters); larger ones are bad records. None turns it off.
DEFAULT_MAX_FIELD_CHARS = 1_000_000

_WARN_FIRST = 20  # log this many skipped records one by one, then only a total
_REPAIR_EXAMPLES = 5  # line/row numbers the report keeps per kind of repair


@dataclass
class ReadResult:
    """A read file: its records, what was detected, and the accounting (read = kept + skipped + quarantined)."""

    table: pa.Table
    path: str
    file_format: str
    layout: str
    read: int
    skipped: int = 0
    quarantined: int = 0
    truncated: bool = False
    #: when truncated: records complete before the point where the file breaks off
    complete_records: int | None = None
    quarantine_path: str | None = None
    #: one RecordError per record left out (skipped or quarantined), in file order
    errors: list[RecordError] = field(default_factory=list)
    #: the repairs asked for (REPAIRS order); empty when repair is off
    repairs: tuple[str, ...] = ()
    #: kept records each repair changed, per repair asked for (a record may count under several)
    repaired: dict[str, int] = field(default_factory=dict)
    #: where the first few records each repair changed are: lines (JSON, JSONL) or 1-based rows (other formats)
    repair_examples: dict[str, list[int]] = field(default_factory=dict)
    #: records left out that the repairs not asked for would have read: how many, and per repair they need
    repairable_records: int = 0
    repairable: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.table.num_rows

    def counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "quarantined": self.quarantined,
        }
        if self.truncated:
            out["truncated"] = True
            out["complete_records"] = self.complete_records
        if self.repairs:
            out["repaired"] = dict(self.repaired)
            out["repaired_lines" if self.file_format in ("json", "jsonl") else "repaired_rows"] = {
                k: list(v) for k, v in self.repair_examples.items()
            }
        if self.repairable_records:
            out["repairable_records"] = self.repairable_records
            out["repairable"] = dict(self.repairable)
        return out


def _check_options(on_bad_record: str, quarantine_path: str | os.PathLike[str] | None, path: Path) -> Path | None:
    if on_bad_record not in ON_BAD_RECORD:
        raise ConfigError(f"unknown on_bad_record {on_bad_record!r}; valid choices: {', '.join(ON_BAD_RECORD)}")
    if on_bad_record != "quarantine":
        return None
    if quarantine_path is not None:
        return Path(quarantine_path)
    return default_quarantine_path(path)


def default_quarantine_path(path: str | os.PathLike[str]) -> Path:
    """Where bad records go when no quarantine path is given: `<file>.quarantine.jsonl` beside the input."""
    p = Path(path)
    return p.with_name(p.name + ".quarantine.jsonl")


def read_records_report(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    file_format: str | None = None,
    on_bad_record: str = "fail",
    quarantine_path: str | os.PathLike[str] | None = None,
    max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS,
    limit: int | None = None,
    repair: str | Iterable[str] | None = DEFAULT_REPAIR,
) -> ReadResult:
    """Read a data file into canonical records and report what was read, skipped, quarantined and repaired.

    layout: alpaca, sharegpt, messages (alias openai), prompt_completion or self_instruct; None detects it from the
    keys present. file_format: json, jsonl, parquet, csv or hf; None goes by the extension (or, for a directory,
    its contents). limit: read only the first `limit` records of the file (bad ones among them count as usual).
    repair: fixes for conversations that break the turn rules, "none" (default), "safe", "all" or a list of
    drop_empty_turns, drop_leading_assistant, merge_same_role (joins the turns with a blank line, "\n\n"),
    drop_trailing_user; see thresher.data.repair. With any on, conversation layouts get a `repairs` column.
    """
    p = Path(path)
    q_path = _check_options(on_bad_record, quarantine_path, p)
    repairs = normalize_repair(repair)
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    if max_field_chars is not None and max_field_chars < 1:
        raise ConfigError(f"max_field_chars must be >= 1 or None, got {max_field_chars}")
    fmt = detect_format(p, file_format)
    src = load(p, fmt, limit=limit)
    lay = _layout_of(src, layout)
    return _finish(src, lay, on_bad_record, q_path, max_field_chars, repairs)


def read_records(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    file_format: str | None = None,
    on_bad_record: str = "fail",
    quarantine_path: str | os.PathLike[str] | None = None,
    max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS,
    limit: int | None = None,
    repair: str | Iterable[str] | None = DEFAULT_REPAIR,
) -> pa.Table:
    """Read a data file in any supported layout and format into a table: canonical columns first, extras after.

    See `read_records_report` for the options and for the counts of skipped, quarantined and repaired records.
    """
    return read_records_report(
        path,
        layout=layout,
        file_format=file_format,
        on_bad_record=on_bad_record,
        quarantine_path=quarantine_path,
        max_field_chars=max_field_chars,
        limit=limit,
        repair=repair,
    ).table


def _layout_of(src: Source, layout: str | None) -> str:
    if layout is not None:
        return normalize_layout(layout)
    keys = list(src.frame.columns)
    found = detect_layout(keys)
    if found is None:
        if not keys and src.frame.n == len(src.frame.bad) and src.frame.n:
            return "alpaca"  # every record is unreadable: let the policy report them one by one
        if not keys and src.frame.n == 0:
            return "alpaca"  # an empty file is an empty dataset
        raise RecordError(
            f"cannot tell the layout from the keys {keys[:12]}: alpaca needs 'instruction', sharegpt "
            "'conversations', messages 'messages', prompt_completion 'prompt', self_instruct 'instruction' and "
            "'instances'; pass layout",
            path=str(src.path),
        )
    return found


def _error(src: Source, i: int, problem: Problem) -> RecordError:
    where = src.where(i)
    if problem.truncated:
        # errors.TruncatedFileError types its pass-through keywords as ints; `field` is a str
        located: dict[str, Any] = {"field": problem.field, **where}
        return TruncatedFileError(
            f"the file is truncated: it ends in the middle of record {i + 1}; {i} complete record(s) before it",
            path=str(src.path),
            complete_records=i,
            **located,
        )
    return RecordError(problem.reason, path=str(src.path), field=problem.field, **where)


def _finish(
    src: Source,
    layout: str,
    on_bad_record: str,
    q_path: Path | None,
    max_field_chars: int | None,
    repairs: frozenset[str] = frozenset(),
) -> ReadResult:
    frame = src.frame
    canon = to_canonical(frame, layout, max_field_chars, repairs)
    bad = canon.bad
    table: pa.Table | None = None
    while table is None:
        if bad and on_bad_record == "fail":
            i = min(bad)
            raise _error(src, i, bad[i])
        keep = [i for i in range(frame.n) if i not in bad] if bad else list(range(frame.n))
        try:
            table = build_table(canon, keep)
        except TypeConflict as e:
            for row, reason in e.rows.items():
                bad[row] = Problem(e.column, reason)
    if canon.dropped_message_keys:
        log.warning(
            "%s: message keys %s are not part of the record and were not kept",
            src.path,
            sorted(canon.dropped_message_keys),
        )
    errors = [_error(src, i, bad[i]) for i in sorted(bad)]
    truncated = src.truncated or any(p.truncated for p in bad.values())
    complete = None
    if truncated:
        partial = [i for i, p in bad.items() if p.truncated]
        complete = min(partial) if partial else frame.n
        if on_bad_record == "fail":
            raise TruncatedFileError(
                f"the file is truncated: the JSON ends before its records do; {complete} complete record(s)",
                path=str(src.path),
                complete_records=complete,
            )
        log.warning("%s: the file is truncated; kept the %d complete record(s) before the break", src.path, complete)
    for k, err in enumerate(errors):
        if k < _WARN_FIRST:
            log.warning("%s record: %s", "quarantined" if q_path else "skipped", err)
    if len(errors) > _WARN_FIRST:
        log.warning("... and %d more bad record(s) in %s", len(errors) - _WARN_FIRST, src.path)
    if q_path is not None:
        _write_quarantine(q_path, src, sorted(bad), bad)
    asked = tuple(r for r in REPAIRS if r in repairs)
    repaired, examples = _repair_counts(src, asked, canon.repaired, bad)
    repairable = Counter(r for p in bad.values() for r in p.repair)
    n_repairable = sum(1 for p in bad.values() if p.repair)
    if n_repairable:
        log.warning(
            "%s: %d record(s) left out could be read with repair='safe' (needed: %s)",
            src.path,
            n_repairable,
            ", ".join(f"{k} {n}" for k, n in sorted(repairable.items())),
        )
    return ReadResult(
        table=table,
        path=str(src.path),
        file_format=src.file_format,
        layout=layout,
        read=frame.n,
        skipped=len(bad) if q_path is None else 0,
        quarantined=len(bad) if q_path is not None else 0,
        truncated=truncated,
        complete_records=complete,
        quarantine_path=str(q_path) if q_path is not None else None,
        errors=errors,
        repairs=asked,
        repaired=repaired,
        repair_examples=examples,
        repairable_records=n_repairable,
        repairable=dict(repairable),
    )


def _repair_counts(
    src: Source, asked: tuple[str, ...], made: Mapping[int, tuple[str, ...]], bad: Mapping[int, Problem]
) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Per repair asked for: how many kept records it changed, and the line or row numbers of the first few."""
    counts = dict.fromkeys(asked, 0)
    examples: dict[str, list[int]] = {r: [] for r in asked}
    for i in sorted(made):
        if i in bad:
            continue
        for r in made[i]:
            counts[r] += 1
            if len(examples[r]) < _REPAIR_EXAMPLES:
                where = src.where(i)
                examples[r].append(where["line"] or where["row"] or i + 1)
    if any(counts.values()):
        log.info(
            "%s: repaired %s",
            src.path,
            "; ".join(f"{r}: {n} record(s), first at {examples[r]}" for r, n in counts.items() if n),
        )
    return counts, {r: v for r, v in examples.items() if v}


def _jsonable(value: Any) -> Any:
    if value is MISSING:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _write_quarantine(q_path: Path, src: Source, order: list[int], bad: Mapping[int, Problem]) -> None:
    """One JSON line per bad record: file, line/row, field, reason, and the raw text (or row) as read."""
    lines = []
    for i in order:
        p = bad[i]
        entry = {
            "file": str(src.path),
            **src.where(i),
            "field": p.field,
            "reason": p.reason,
            "truncated": p.truncated,
            "raw": _jsonable(src.raw(i)),
        }
        lines.append(orjson.dumps(entry, default=str))
    atomic_write_bytes(q_path, b"".join(line + b"\n" for line in lines))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def records_to_table(
    rows: Iterable[Mapping[str, Any] | Record] | pa.Table | Any,
    *,
    layout: str | None = None,
    max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS,
) -> pa.Table:
    """Rows in memory (dicts, Records, a pyarrow Table, a datasets.Dataset, a pandas DataFrame) as a canonical table.

    Canonical columns come first with RECORD_SCHEMA types; missing ids are filled with the content hash; a bad
    row raises RecordError naming its row (1-based) and field.
    """
    if isinstance(rows, pa.Table):
        frame = Frame(rows.num_rows, {c: rows.column(c) for c in rows.column_names})
    elif type(rows).__module__.startswith(("datasets", "pandas")):
        from thresher.pipelines.tables import as_table

        t = as_table(rows)
        frame = Frame(t.num_rows, {c: t.column(c) for c in t.column_names})
    else:
        dicts = [r.to_row() if isinstance(r, Record) else dict(r) for r in rows]
        keys: dict[str, None] = {}
        for d in dicts:
            keys.update(dict.fromkeys(d))
        frame = Frame(len(dicts), {k: [d.get(k, MISSING) for d in dicts] for k in keys})
    src = Source(Path("<table>"), "memory", frame, row_based=True)
    lay = layout or detect_layout(frame.columns) or "alpaca"
    return _finish(src, normalize_layout(lay), "fail", None, max_field_chars).table
