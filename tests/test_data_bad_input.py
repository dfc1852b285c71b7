"""Bad input: every error names the file, the line or row and the field; fail, skip and quarantine all keep count."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.data import read_records, read_records_report
from thresher.errors import RecordError, TruncatedFileError

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import write_lines

GOOD = '{"instruction": "Say hi.", "input": "", "output": "Hi!"}'


def _good(i: int) -> str:
    return orjson.dumps({"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"}).decode()


def _quarantine(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


# one JSONL file per kind of bad record: (the bad line, the field the error must name, words from the reason)
BAD_LINES: dict[str, tuple[bytes, str, str]] = {
    "malformed": (b'{"instruction": "x", "output": "y" "z"}', "output", "not valid JSON"),
    "number": (b'{"instruction": 42, "output": "y"}', "instruction", "expected a string, found a number (42)"),
    "list": (b'{"instruction": ["a", "b"], "output": "y"}', "instruction", "expected a string, found a list"),
    "missing": (b'{"input": "x", "output": "y"}', "instruction", "missing or null"),
    "empty": (b'{"instruction": "   ", "output": "y"}', "instruction", "is empty"),
    "non_utf8": (b'{"instruction": "ok", "output": "caf\xe9 cr\xe8me"}', "output", "not valid UTF-8"),
    "bad_history": (b'{"instruction": "x", "history": [["only one"]]}', "history[0]", "[user, assistant] pair"),
    "not_object": (b'["instruction", "x"]', "", "expected a JSON object"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_jsonl_record_fails_with_file_line_and_field(kind: str, tmp_path: Path) -> None:
    line, field, words = BAD_LINES[kind]
    path = write_lines(tmp_path / f"{kind}.jsonl", [_good(1), _good(2), line, _good(4)])
    with pytest.raises(RecordError) as info:
        read_records(path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and words in msg, msg
    if field:
        assert f"field '{field}'" in msg, msg
    assert (info.value.path, info.value.line, info.value.field or "") == (str(path), 3, field)


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_jsonl_record_is_skipped_and_counted(kind: str, tmp_path: Path, caplog) -> None:
    path = write_lines(tmp_path / f"{kind}.jsonl", [_good(1), _good(2), BAD_LINES[kind][0], _good(4)])
    with caplog.at_level(logging.WARNING, logger="thresher.data"):
        report = read_records_report(path, on_bad_record="skip")
    assert report.table.column("instruction").to_pylist() == ["Task 1", "Task 2", "Task 4"]
    assert (report.read, report.kept, report.skipped, report.quarantined) == (4, 3, 1, 0)
    assert any("line 3" in r.getMessage() for r in caplog.records)
    assert [e.line for e in report.errors] == [3]


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_jsonl_record_is_quarantined_raw_with_where_and_why(kind: str, tmp_path: Path) -> None:
    line, field, words = BAD_LINES[kind]
    path = write_lines(tmp_path / f"{kind}.jsonl", [_good(1), line, _good(3)])
    q = tmp_path / "q" / "bad.jsonl"
    report = read_records_report(path, on_bad_record="quarantine", quarantine_path=q)
    assert (report.read, report.kept, report.skipped, report.quarantined) == (3, 2, 0, 1)
    [entry] = _quarantine(q)
    assert entry["file"] == str(path) and entry["line"] == 2 and entry["row"] is None
    assert (entry["field"] or "") == field and words in entry["reason"]
    assert entry["raw"] == line.decode("utf-8", "backslashreplace")  # the line as it was (bad bytes escaped)


def test_fail_reports_the_first_bad_record_in_file_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "two.jsonl", [_good(1), BAD_LINES["number"][0], BAD_LINES["malformed"][0]])
    with pytest.raises(RecordError, match=r"line 2, field 'instruction'"):
        read_records(path)
    report = read_records_report(path, on_bad_record="skip")
    assert [e.line for e in report.errors] == [2, 3] and report.kept == 1


def test_quarantine_defaults_to_a_file_beside_the_input(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [_good(1), BAD_LINES["empty"][0]])
    report = read_records_report(path, on_bad_record="quarantine")
    assert report.quarantine_path == str(tmp_path / "in.jsonl.quarantine.jsonl")
    assert len(_quarantine(Path(report.quarantine_path))) == 1


def test_oversized_string_is_a_bad_record(tmp_path: Path) -> None:
    big = "x" * (10 * 1024 * 1024)
    path = write_lines(tmp_path / "big.jsonl", [_good(1), orjson.dumps({"instruction": "q", "output": big}), _good(3)])
    with pytest.raises(RecordError) as info:
        read_records(path)
    msg = str(info.value)
    assert "line 2" in msg and "field 'output'" in msg and "over max_field_chars=1,000,000" in msg
    assert read_records_report(path, on_bad_record="skip").kept == 2
    assert read_records(path, max_field_chars=None).num_rows == 3  # the limit can be lifted
    with pytest.raises(RecordError, match=r"line 1, field 'instruction': 6 characters"):
        read_records(path, max_field_chars=5)


# ---- truncated files --------------------------------------------------------------------------------------


def _pretty_array(n: int) -> bytes:
    body = b",\n".join(orjson.dumps(orjson.loads(_good(i)), option=orjson.OPT_INDENT_2) for i in range(n))
    return b"[\n" + body + b"\n]\n"


def test_truncated_json_array_says_how_many_records_were_complete(tmp_path: Path) -> None:
    full = _pretty_array(5)
    cut = full[: full.index(b'"Answer 3"') + 5]  # stops inside record 4's output
    path = tmp_path / "cut.json"
    path.write_bytes(cut)
    with pytest.raises(TruncatedFileError) as info:
        read_records(path)
    err = info.value
    assert err.complete_records == 3 and err.path == str(path) and err.field == "output"
    assert "truncated" in str(err) and "3 complete record(s)" in str(err) and str(path) in str(err)
    assert err.line == cut[: cut.index(b'"Task 3"')].count(b"\n")  # the line where the partial record starts

    report = read_records_report(path, on_bad_record="quarantine", quarantine_path=tmp_path / "q.jsonl")
    assert report.truncated and report.complete_records == 3
    assert report.table.column("instruction").to_pylist() == ["Task 0", "Task 1", "Task 2"]
    assert (report.read, report.kept, report.quarantined) == (4, 3, 1)
    [entry] = _quarantine(tmp_path / "q.jsonl")
    assert entry["truncated"] is True and entry["raw"].startswith("{") and '"Task 3"' in entry["raw"]


def test_json_array_cut_between_records_is_still_truncated(tmp_path: Path) -> None:
    full = _pretty_array(3)
    path = tmp_path / "cut.json"
    path.write_bytes(full[: full.rindex(b"}") + 2])  # after the last record's comma-less end, no closing bracket
    with pytest.raises(TruncatedFileError, match=r"3 complete record"):
        read_records(path)
    report = read_records_report(path, on_bad_record="skip")
    assert report.truncated and report.kept == 3 and report.skipped == 0


def test_truncated_jsonl_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_bytes((_good(1) + "\n" + _good(2) + "\n" + _good(3)[:20]).encode())
    with pytest.raises(TruncatedFileError) as info:
        read_records(path)
    assert info.value.complete_records == 2 and info.value.line == 3
    report = read_records_report(path, on_bad_record="skip")
    assert report.truncated and report.kept == 2 and report.skipped == 1


def test_truncated_json_object_holding_records(tmp_path: Path) -> None:
    text = orjson.dumps({"data": [orjson.loads(_good(i)) for i in range(3)]})
    path = tmp_path / "obj.json"
    path.write_bytes(text[:-15])
    with pytest.raises(TruncatedFileError, match=r"2 complete record"):
        read_records(path)
    assert read_records_report(path, on_bad_record="skip").kept == 2


# ---- bad records inside JSON arrays ------------------------------------------------------------------------


def test_bad_records_in_a_json_array_name_their_line(tmp_path: Path) -> None:
    rows = [orjson.loads(_good(i)) for i in range(4)]
    rows[2]["instruction"] = 7
    path = tmp_path / "a.json"
    path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    with pytest.raises(RecordError) as info:
        read_records(path)
    text = path.read_text()
    assert info.value.line == text[: text.index('"instruction": 7')].count("\n")  # the line of the record's "{"
    assert "field 'instruction'" in str(info.value)
    assert read_records_report(path, on_bad_record="skip").kept == 3


def test_malformed_record_in_a_json_array_is_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    good = [_good(i) for i in range(4)]
    text = "[\n" + ",\n".join([good[0], good[1], '{"instruction": "broken" "output": "x"}', good[3]]) + "\n]\n"
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(RecordError, match=r"line 4, field 'instruction': not valid JSON"):
        read_records(path)
    report = read_records_report(path, on_bad_record="quarantine", quarantine_path=tmp_path / "q.jsonl")
    assert report.table.column("instruction").to_pylist() == ["Task 0", "Task 1", "Task 3"]
    assert _quarantine(tmp_path / "q.jsonl")[0]["raw"] == '{"instruction": "broken" "output": "x"}'


def test_non_utf8_bytes_in_a_json_array(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "c"}\n]\n')
    with pytest.raises(RecordError, match=r"line 3, field 'instruction': holds bytes that are not valid UTF-8"):
        read_records(path)
    assert read_records_report(path, on_bad_record="skip").kept == 1


# ---- other layouts and formats -----------------------------------------------------------------------------


def test_conversation_errors_name_the_message(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"conversations": [{"from": "human", "value": 5}]},
        {"conversations": []},
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with pytest.raises(RecordError, match=r"line 2, field 'conversations\[1\]\.from': unsupported role 'robot'"):
        read_records(path)
    report = read_records_report(path, on_bad_record="skip")
    assert report.kept == 1
    assert [(e.line, e.field) for e in report.errors] == [
        (2, "conversations[1].from"),
        (3, "conversations[1].from"),
        (4, "conversations[0].value"),
        (5, "conversations"),
    ]


def test_extra_column_with_clashing_types_names_the_row(tmp_path: Path) -> None:
    rows = [{"instruction": "a", "score": 1}, {"instruction": "b", "score": 2.5}, {"instruction": "c", "score": "high"}]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with pytest.raises(RecordError, match=r"line 3, field 'score': holds a string \('high'\)"):
        read_records(path)
    assert read_records(path, on_bad_record="skip").column("score").to_pylist() == [1.0, 2.5]


def test_parquet_bad_rows_name_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"instruction": ["a", None, "", "d"], "output": ["1", "2", "3", "4"]}), path)
    with pytest.raises(RecordError, match=r"p\.parquet, row 2, field 'instruction': missing or null"):
        read_records(path)
    report = read_records_report(path, on_bad_record="quarantine", quarantine_path=tmp_path / "q.jsonl")
    assert report.table.column("instruction").to_pylist() == ["a", "d"]
    entries = _quarantine(tmp_path / "q.jsonl")
    assert [(e["row"], e["line"], e["field"]) for e in entries] == [(2, None, "instruction"), (3, None, "instruction")]
    assert entries[1]["raw"] == {"instruction": "", "output": "3"}

    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"instruction": [1, 2]}), numbers)
    with pytest.raises(RecordError, match=r"row 1, field 'instruction': expected a string, found a number \(1\)"):
        read_records(numbers)


def test_csv_bad_rows_name_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(
        b'instruction,output,history\n"a","1",\n"b","2","[[\\"x\\"]"\n"c","3","[]","extra cell"\n'
        b'"caf\xe9","4",\n"e","5","[]"\n'
    )
    with pytest.raises(RecordError, match=r"c\.csv, row 2, field 'history'"):
        read_records(path)
    report = read_records_report(path, on_bad_record="skip")
    assert report.table.column("instruction").to_pylist() == ["a", "e"]
    assert [(e.row, e.field) for e in report.errors] == [(2, "history"), (3, None), (4, "instruction")]
    assert "malformed CSV row" in str(report.errors[1]) and "not valid UTF-8" in str(report.errors[2])


def test_nothing_is_lost_read_equals_kept_plus_skipped(tmp_path: Path) -> None:
    lines: list[bytes | str] = [_good(i) for i in range(20)]
    for k, (line, _, _) in enumerate(BAD_LINES.values()):
        lines.insert(2 * k + 1, line)
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    report = read_records_report(path, on_bad_record="skip")
    assert report.read == len(lines) == report.kept + report.skipped
    assert report.kept == 20 and report.skipped == len(BAD_LINES)
    q = read_records_report(path, on_bad_record="quarantine", quarantine_path=tmp_path / "q.jsonl")
    assert q.quarantined == len(_quarantine(tmp_path / "q.jsonl")) == len(BAD_LINES)


def test_conversation_input_and_system_must_agree_with_the_turns(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "Translate.\nhola"}, {"from": "gpt", "value": "hi"}],
         "input": "hola"},
        {"conversations": [{"from": "human", "value": "Translate."}, {"from": "gpt", "value": "hi"}],
         "input": "hola"},
        {"conversations": [{"from": "system", "value": "A"}, {"from": "human", "value": "q"}],
         "system": "B"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    report = read_records_report(path, on_bad_record="skip")
    assert [(r["instruction"], r["input"]) for r in report.table.to_pylist()] == [("Translate.", "hola")]
    assert [(e.line, e.field) for e in report.errors] == [(2, "input"), (3, "system")]
    assert "does not match the end of the last user turn" in str(report.errors[0])


def test_empty_files_bom_and_limit(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_records(tmp_path / "empty.jsonl").num_rows == 0
    (tmp_path / "empty.json").write_bytes(b"  \n")
    with pytest.raises(RecordError, match=r"empty\.json: the file is empty"):
        read_records(tmp_path / "empty.json")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (_good(1) + "\n\n" + _good(2) + "\n").encode())
    assert read_records(bom).column("instruction").to_pylist() == ["Task 1", "Task 2"]
    lines = [_good(i) for i in range(10)]
    write_lines(tmp_path / "ten.jsonl", lines)
    (tmp_path / "ten.json").write_text("[" + ",".join(lines) + "]")
    for name in ("ten.jsonl", "ten.json"):
        assert read_records(tmp_path / name, limit=3).column("instruction").to_pylist() == ["Task 0", "Task 1",
                                                                                           "Task 2"]
    pq.write_table(read_records(tmp_path / "ten.jsonl"), tmp_path / "ten.parquet")
    assert read_records(tmp_path / "ten.parquet", limit=4).num_rows == 4


def test_type_clash_blames_the_odd_row_out_not_the_many(tmp_path: Path) -> None:
    # one early row with a string score among hundreds of numbers: that row is the bad one, not all the others
    rows: list[dict[str, Any]] = [{"instruction": f"q{i}", "score": i} for i in range(300)]
    rows[0]["score"] = "high"
    path = tmp_path / "mix.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with pytest.raises(RecordError, match=r"line 1, field 'score': holds a string \('high'\)"):
        read_records(path)
    report = read_records_report(path, on_bad_record="skip")
    assert (report.kept, report.skipped) == (299, 1)
    assert report.table.column("score").to_pylist() == list(range(1, 300))


# ---- values nested too deep (defect 9: a RecursionError traceback instead of the reader's error) -------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_document_is_a_record_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text(_nested(5000))  # the records array, holding one list nested 4,999 levels
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert (info.value.path, info.value.line) == (str(path), 1)
    assert "nested 4,999 levels deep" in str(info.value) and "at most 32 levels" in str(info.value)
    report = read_records_report(path, on_bad_record="skip")
    assert (report.read, report.kept, report.skipped) == (1, 0, 1)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("depth", [33, 600, 5000])  # past our limit; past the stdlib's stack; past orjson's 1,024
def test_one_deep_value_is_a_bad_record_naming_line_and_field(tmp_path: Path, suffix: str, depth: int) -> None:
    deep = '{"instruction": "x", "tree": ' + _nested(depth) + "}"
    path = tmp_path / f"deep{suffix}"
    if suffix == ".json":
        path.write_text("[\n" + GOOD + ",\n" + deep + ",\n" + _good(3) + "\n]\n")
    else:
        write_lines(path, [GOOD, deep, _good(3)])
    line = 3 if suffix == ".json" else 2
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert (info.value.line, info.value.field) == (line, "tree")
    assert f"nested {depth:,} levels deep (lists and objects); a value may nest at most 32 levels" in str(info.value)
    q = tmp_path / "q.jsonl"
    report = read_records_report(path, on_bad_record="quarantine", quarantine_path=q)
    assert (report.read, report.kept, report.quarantined) == (3, 2, 1)
    assert report.table.column("instruction").to_pylist() == ["Say hi.", "Task 3"]
    [entry] = _quarantine(q)
    assert entry["line"] == line and entry["field"] == "tree" and entry["raw"].startswith('{"instruction": "x"')


def test_values_up_to_the_limit_are_read_and_go_to_parquet(tmp_path: Path) -> None:
    from thresher.data.layouts import MAX_NESTING_DEPTH

    value = orjson.loads(_nested(MAX_NESTING_DEPTH))
    path = write_lines(tmp_path / "ok.jsonl", [orjson.dumps({"instruction": "x", "tree": value}).decode()])
    table = read_records(path)
    assert table.column("tree").to_pylist() == [value]
    pq.write_table(table, tmp_path / "ok.parquet")  # the run directory's format holds it
    assert pq.read_table(tmp_path / "ok.parquet").column("tree").to_pylist() == [value]


def test_deep_value_in_a_conversation_message(tmp_path: Path) -> None:
    deep = '{"conversations": [{"from": "human", "value": "hi", "meta": ' + _nested(3000) + "}]}"
    path = write_lines(tmp_path / "conv.jsonl", [deep])
    with pytest.raises(RecordError, match=r"line 1, field 'conversations': nested 3,002 levels deep"):
        read_records(path)


def test_deep_value_beside_the_records_list_is_stepped_over(tmp_path: Path) -> None:
    path = tmp_path / "holder.json"
    path.write_text('{"meta": ' + _nested(5000) + ', "data": [' + GOOD + "]}")
    assert read_records(path).column("instruction").to_pylist() == ["Say hi."]


def test_deep_arrow_column_is_a_bad_row_and_the_kept_rows_get_a_shallow_type(tmp_path: Path) -> None:
    from thresher.data import records_to_table

    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    rows = [{"instruction": "a", "tree": None}, {"instruction": "b", "tree": deep}]
    with pytest.raises(RecordError, match=r"row 2, field 'tree': nested 40 levels deep"):
        records_to_table(pa.table({"instruction": ["a", "b"], "tree": pa.array([None, deep])}))
    with pytest.raises(RecordError, match=r"row 2, field 'tree': nested 40 levels deep"):
        records_to_table(rows)
    # an HF dataset (Arrow IPC) can hold what Parquet cannot: the reader leaves the row out, not the whole file
    from thresher.data.readers import _finish
    from thresher.data.sources import Source, _arrow_frame

    arrow = _arrow_frame(pa.table({"instruction": ["a", "b"], "tree": pa.array([None, deep])}))
    report = _finish(Source(tmp_path / "deep", "hf", arrow, row_based=True), "alpaca", "skip", None, None)
    assert (report.kept, report.skipped) == (1, 1)
    assert report.table.schema.field("tree").type == pa.null()  # not the 40-level type of the row left out


def test_peeking_at_a_deep_json_file_does_not_crash(tmp_path: Path) -> None:
    from thresher.data import Load

    path = tmp_path / "deep.json"
    path.write_text("[" + GOOD + ", " + '{"instruction": "x", "tree": ' + _nested(5000) + "}]")
    step = Load(path=str(path), on_bad_record="skip")
    assert "instruction" in step.output_columns([])
    assert step().num_rows == 1
