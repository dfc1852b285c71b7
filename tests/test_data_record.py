"""The record: its pydantic model, canonical columns and Arrow schema, and the content id."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from thresher.data import CANONICAL_COLUMNS, RECORD_SCHEMA, Record, record_id, records_to_table
from thresher.errors import RecordError

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import sample_rows


def test_canonical_columns_and_schema() -> None:
    assert CANONICAL_COLUMNS == ("id", "instruction", "input", "output", "system", "history")
    assert RECORD_SCHEMA.names == list(CANONICAL_COLUMNS)
    assert RECORD_SCHEMA.field("history").type == pa.list_(pa.list_(pa.string()))
    assert all(RECORD_SCHEMA.field(c).type == pa.string() for c in CANONICAL_COLUMNS[:-1])


def test_record_id_is_deterministic_and_content_sensitive() -> None:
    a = record_id("Say hi.", "", "Hi!")
    assert a == record_id("Say hi.", "", "Hi!", None, [])
    assert a == record_id("Say hi.", "", "Hi!", None, None)
    assert len(a) == 24 and int(a, 16) >= 0
    assert a != record_id("Say hi.", "", None)  # a missing answer is not an empty one
    assert record_id("Say hi.", "", "") != record_id("Say hi.", "", None)
    assert a != record_id("Say hi.", "", "Hi!", "")
    assert a != record_id("Say hi.", "", "Hi!", None, [["q", "a"]])
    assert a != record_id("Say hi.", "x", "Hi!")
    # pinned: ids must not change between versions, or users' lineage (parent_id) breaks
    assert record_id("x") == "d027a7104620a4764c5010df"
    assert a == "a785ced18c0e3a84ab91b99c"


def test_record_model_fills_id_keeps_extras_and_validates() -> None:
    r = Record(instruction="Say hi.", output="Hi!", source="seed", score=4.5)
    assert r.id == record_id("Say hi.", "", "Hi!")
    row = r.to_row()
    assert list(row)[:6] == list(CANONICAL_COLUMNS)
    assert row["source"] == "seed" and row["score"] == 4.5
    assert Record(id="given", instruction="x").id == "given"
    assert Record(instruction="q", history=[["a", "b"]]).to_row()["history"] == [["a", "b"]]
    for bad in ({"instruction": ""}, {"instruction": 5}, {}, {"instruction": "x", "history": [["only one"]]}):
        with pytest.raises(ValidationError):
            Record(**bad)


def test_reader_ids_match_record_id() -> None:
    table = records_to_table(sample_rows())
    for row in table.to_pylist():
        assert row["id"] == record_id(row["instruction"], row["input"], row["output"], row["system"], row["history"])
    assert table.column_names[:6] == list(CANONICAL_COLUMNS)
    assert table.schema.field("history").type == RECORD_SCHEMA.field("history").type


def test_records_to_table_accepts_records_tables_and_dataframes() -> None:
    rows = sample_rows()
    from_dicts = records_to_table(rows)
    from_models = records_to_table([Record(**r) for r in rows])
    assert from_models.select(list(CANONICAL_COLUMNS)).equals(from_dicts.select(list(CANONICAL_COLUMNS)))
    assert records_to_table(from_dicts).equals(from_dicts)
    pd = pytest.importorskip("pandas")
    assert records_to_table(pd.DataFrame({"instruction": ["a", "b"]})).column("input").to_pylist() == ["", ""]
    with pytest.raises(RecordError, match=r"row 2, field 'instruction'"):
        records_to_table([{"instruction": "ok"}, {"instruction": ""}])
