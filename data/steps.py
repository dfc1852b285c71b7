"""Pipeline steps for data in and between branches: Load reads a file as records, Concat joins several inputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thresher.data.convert import peek_record_columns
from thresher.data.layouts import normalize_layout
from thresher.data.readers import (
    DEFAULT_MAX_FIELD_CHARS,
    ON_BAD_RECORD,
    ReadResult,
    default_quarantine_path,
    read_records_report,
)
from thresher.data.record import CANONICAL_COLUMNS
from thresher.data.repair import DEFAULT_REPAIR, REPAIRS, normalize_repair
from thresher.data.sources import detect_format, normalize_format
from thresher.errors import ConfigError, StepError
from thresher.pipelines.fingerprint import file_digest
from thresher.pipelines.step import Generator, GlobalStep, OpenColumns

log = logging.getLogger("thresher.data")


class Load(Generator):
    """Read a data file (any supported layout and format) as records.

    on_bad_record: fail, skip or quarantine. quarantine_path: where quarantined records go; by default the step's
    folder in the run directory (`quarantine.jsonl`), or `<file>.quarantine.jsonl` beside the input when the step
    runs on its own. repair: fixes for conversations that break the turn rules ("none", "safe", "all" or a list of
    repair names; see thresher.data.repair).
    """

    n_inputs = 0
    outputs = CANONICAL_COLUMNS
    VERSION = "1"

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        layout: str | None = None,
        file_format: str | None = None,
        on_bad_record: str = "fail",
        limit: int | None = None,
        quarantine_path: str | os.PathLike[str] | None = None,
        max_field_chars: int | None = DEFAULT_MAX_FIELD_CHARS,
        repair: str | Iterable[str] | None = DEFAULT_REPAIR,
    ) -> None:
        self.path = path
        self.layout = layout
        self.file_format = file_format
        self.on_bad_record = on_bad_record
        self.limit = limit
        self.quarantine_path = quarantine_path
        self.max_field_chars = max_field_chars
        self.repair = repair

    def check(self) -> None:
        if self.layout is not None:
            normalize_layout(self.layout)
        if self.file_format is not None:
            normalize_format(self.file_format)
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(
                f"Load: unknown on_bad_record {self.on_bad_record!r}; valid choices: {', '.join(ON_BAD_RECORD)}"
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ConfigError(f"Load: limit must be a non-negative integer or None, got {self.limit!r}")
        try:
            normalize_repair(self.repair)
        except ConfigError as e:
            raise ConfigError(f"Load: {e}") from None
        if not Path(self.path).exists():
            raise ConfigError(f"Load: path {os.fspath(self.path)!r} does not exist")

    def semantic_params(self) -> dict[str, Any]:
        # the file counts by its name and content (fingerprint_extra), not by the folder it lies in: recipes make
        # paths absolute, and a moved project or a run directory copied to another machine must not re-run every step
        params = super().semantic_params()
        params.pop("path", None)
        # repair by what it does, not how it was spelled ("safe" = its three names, in any order); off, it is left
        # out, so the fingerprints of loads made before the option existed, and of everything after them, hold
        repairs = normalize_repair(params.pop("repair", None))
        if repairs:
            params["repair"] = [r for r in REPAIRS if r in repairs]
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        # the file's content, not just its name: an edited file re-runs the load and everything downstream
        p = Path(self.path)
        if not p.exists():
            raise ConfigError(f"Load: path {os.fspath(self.path)!r} does not exist")
        return {"file": file_digest(p)}

    def output_columns(self, input_columns: Sequence[Sequence[str]]) -> list[str]:
        self.check()
        cols = peek_record_columns(self.path, layout=self.layout, file_format=self.file_format, repair=self.repair)
        fmt = detect_format(Path(self.path), self.file_format)
        # Parquet and saved HF datasets carry a schema: exact. Text formats were only peeked at: open.
        return cols if fmt in ("parquet", "hf") else OpenColumns(cols)

    def _quarantine_target(self) -> str | os.PathLike[str] | None:
        if self.on_bad_record != "quarantine":
            return None
        if self.quarantine_path is not None:
            return self.quarantine_path
        # in a run, by-products belong to the run, not beside an input that may be read-only or shared
        if self.workdir_ is not None:
            return Path(self.workdir_) / "quarantine.jsonl"
        return default_quarantine_path(self.path)

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        self.report_: ReadResult = read_records_report(
            self.path,
            layout=self.layout,
            file_format=self.file_format,
            on_bad_record=self.on_bad_record,
            quarantine_path=self._quarantine_target(),
            max_field_chars=self.max_field_chars,
            limit=self.limit,
            repair=self.repair,
        )
        table = self.report_.table
        # Ids given in the data are kept as given; repeated ones would make lineage (parent_id, duplicate_of)
        # ambiguous, so say so rather than let it pass unseen.
        self.duplicate_ids_ = table.num_rows - pc.count_distinct(table.column("id")).as_py() if table.num_rows else 0
        if self.duplicate_ids_:
            log.warning("%s: %d rows repeat an id used by an earlier row", self.path, self.duplicate_ids_)
        return table

    def metrics(self) -> dict[str, Any]:
        report = getattr(self, "report_", None)
        if report is None:
            return {}
        out = report.counts()
        out["duplicate_ids"] = getattr(self, "duplicate_ids_", 0)
        out["layout"] = report.layout
        out["file_format"] = report.file_format
        if report.quarantine_path is not None:
            out["quarantine_path"] = report.quarantine_path
        return out


class Concat(GlobalStep):
    """Join the rows of several inputs, in input order; columns are the union (missing ones are null)."""

    n_inputs = None
    inputs = ("id",)
    VERSION = "1"

    def __init__(self) -> None:
        pass

    def process(self, tables: list[pa.Table]) -> pa.Table:
        tables = [t for t in tables if t is not None]
        if not tables:
            return pa.table({})
        try:
            return pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            clashes = []
            for name in {n for t in tables for n in t.column_names}:
                types = {str(t.schema.field(name).type) for t in tables if name in t.column_names}
                if len(types) > 1:
                    clashes.append(f"{name!r} ({' vs '.join(sorted(types))})")
            raise StepError(
                f"Concat: the inputs disagree on column types: {', '.join(sorted(clashes)) or e}; "
                "cast them to one type before joining"
            ) from e
