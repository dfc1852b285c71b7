"""Repairs of messy conversations (real ShareGPT dumps): each kind on its own, the presets, the report's counts,
the `repairs` column, and the old behaviour (a clear per-row error, or a skip) when repair is off."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from thresher.cli import main
from thresher.data import (
    REPAIR_PRESETS,
    REPAIRS,
    Load,
    convert,
    normalize_repair,
    read_records,
    read_records_report,
)
from thresher.errors import ConfigError, RecordError


def _turn(who: str, text: Any) -> dict[str, Any]:
    return {"from": who, "value": text}


def messy_sharegpt() -> list[dict[str, Any]]:
    """Conversations as real ShareGPT exports hold them; each id says what is wrong with it (line = index + 1)."""
    return [
        {"id": "clean", "conversations": [_turn("human", "Hi"), _turn("gpt", "Hello!")]},
        {
            "id": "leading_gpt",  # the exported page starts with the assistant's greeting
            "conversations": [_turn("gpt", "How can I help?"), _turn("human", "What is 2+2?"), _turn("gpt", "4")],
        },
        {
            "id": "two_humans",  # the user sent two messages in a row
            "conversations": [
                _turn("human", "Here is my code:"),
                _turn("human", "def f(): pass"),
                _turn("chatgpt", "It does nothing."),
            ],
        },
        {
            "id": "trailing_human",  # the last question was never answered
            "conversations": [_turn("human", "Q1"), _turn("bing", "A1"), _turn("human", "Q2")],
        },
        {
            "id": "empty_value",  # a failed answer left an empty turn: readable, but nothing to learn from
            "conversations": [
                _turn("human", "Tell me a joke"),
                _turn("gpt", ""),
                _turn("human", "Please?"),
                _turn("bard", "Why did the chicken..."),
            ],
        },
        {"id": "null_value", "conversations": [_turn("human", "Ping"), _turn("gpt", None)]},
        {
            "id": "system_first",
            "conversations": [_turn("system", "Be brief."), _turn("gpt", "Hi!"), _turn("user", "Hi"), _turn("assistant", "Yo")],
        },
    ]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _by_id(table: Any) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "sharegpt_dump.jsonl", messy_sharegpt())


# ---- repair off: the old behaviour, with a pointer to the repair ------------------------------------------------


def test_repair_off_fails_on_the_first_bad_conversation_naming_file_line_field_and_the_fix(messy: Path) -> None:
    with pytest.raises(RecordError) as info:
        read_records(messy)
    e = info.value
    assert (e.path, e.line, e.field) == (str(messy), 2, "conversations[0].from")
    msg = str(e)
    assert "found an assistant turn; expected a user turn here (turns alternate)" in msg
    assert "repair='safe' would read it (it needs drop_leading_assistant)" in msg


def test_repair_off_skips_bad_conversations_and_counts_what_a_repair_would_read(messy: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="thresher.data"):
        report = read_records_report(messy, on_bad_record="skip")
    assert (report.read, report.kept, report.skipped) == (7, 3, 4)
    rows = _by_id(report.table)
    assert sorted(rows) == ["clean", "empty_value", "trailing_human"]
    assert rows["empty_value"]["history"] == [["Tell me a joke", ""]]  # read as written
    assert "repairs" not in report.table.column_names  # no repair asked: the table is as before
    assert [(e.line, e.field) for e in report.errors] == [
        (2, "conversations[0].from"),
        (3, "conversations[1].from"),
        (6, "conversations[1].value"),
        (7, "conversations[1].from"),
    ]
    assert "expected a string, found null; repair='safe' would read it" in str(report.errors[2])
    assert report.repairable_records == 4
    assert report.repairable == {"drop_leading_assistant": 2, "merge_same_role": 1, "drop_empty_turns": 1}
    counts = report.counts()
    assert counts["repairable_records"] == 4 and "repaired" not in counts
    assert any("4 record(s) left out could be read with repair='safe'" in r.getMessage() for r in caplog.records)


# ---- each repair, the presets ----------------------------------------------------------------------------


def test_safe_repairs_read_every_conversation_and_count_each_kind(messy: Path) -> None:
    report = read_records_report(messy, repair="safe")
    assert (report.read, report.kept, report.skipped) == (7, 7, 0)
    rows = _by_id(report.table)
    assert rows["leading_gpt"]["instruction"] == "What is 2+2?" and rows["leading_gpt"]["output"] == "4"
    # merged turns are joined with a blank line
    assert rows["two_humans"]["instruction"] == "Here is my code:\n\ndef f(): pass"
    assert rows["two_humans"]["output"] == "It does nothing."
    # the empty answer goes, and the two questions around it become one turn
    assert rows["empty_value"]["instruction"] == "Tell me a joke\n\nPlease?"
    assert rows["empty_value"]["history"] == []
    assert rows["null_value"]["instruction"] == "Ping" and rows["null_value"]["output"] is None
    assert rows["system_first"]["system"] == "Be brief." and rows["system_first"]["instruction"] == "Hi"
    # a trailing question is no breach of the rules: safe leaves it (a prompt whose answer is to come)
    assert rows["trailing_human"]["instruction"] == "Q2" and rows["trailing_human"]["history"] == [["Q1", "A1"]]
    assert report.repairs == ("drop_empty_turns", "drop_leading_assistant", "merge_same_role")
    assert report.repaired == {"drop_empty_turns": 2, "drop_leading_assistant": 2, "merge_same_role": 2}
    assert report.repair_examples == {
        "drop_empty_turns": [5, 6],
        "drop_leading_assistant": [2, 7],
        "merge_same_role": [3, 5],
    }
    counts = report.counts()
    assert counts["repaired"] == report.repaired and counts["repaired_lines"] == report.repair_examples
    # every row says what was done to it
    assert {k: r["repairs"] for k, r in rows.items()} == {
        "clean": [],
        "leading_gpt": ["drop_leading_assistant"],
        "two_humans": ["merge_same_role"],
        "trailing_human": [],
        "empty_value": ["drop_empty_turns", "merge_same_role"],
        "null_value": ["drop_empty_turns"],
        "system_first": ["drop_leading_assistant"],
    }


def test_all_also_drops_a_trailing_user_turn_but_keeps_a_lone_prompt(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": "trailing", "conversations": [_turn("human", "Q1"), _turn("gpt", "A1"), _turn("human", "Q2")]},
            {"id": "prompt", "conversations": [_turn("human", "Only a question")]},
        ],
    )
    report = read_records_report(path, repair="all")
    rows = _by_id(report.table)
    assert (rows["trailing"]["instruction"], rows["trailing"]["output"]) == ("Q1", "A1")
    assert rows["trailing"]["repairs"] == ["drop_trailing_user"]
    assert (rows["prompt"]["instruction"], rows["prompt"]["output"], rows["prompt"]["repairs"]) == (
        "Only a question", None, []
    )
    assert report.repaired["drop_trailing_user"] == 1 and report.repair_examples["drop_trailing_user"] == [1]


def test_a_list_of_repairs_applies_only_those_and_points_at_the_missing_one(messy: Path) -> None:
    report = read_records_report(messy, repair=["merge_same_role"], on_bad_record="skip")
    rows = _by_id(report.table)
    assert sorted(rows) == ["clean", "empty_value", "trailing_human", "two_humans"]
    assert rows["empty_value"]["repairs"] == []  # its empty turn stays: drop_empty_turns was not asked for
    assert report.repaired == {"merge_same_role": 1}
    leading = next(e for e in report.errors if e.line == 2)
    assert "adding drop_leading_assistant to repair would read it" in str(leading)
    null = next(e for e in report.errors if e.line == 6)
    assert "adding drop_empty_turns to repair would read it" in str(null)


def test_unknown_roles_stay_errors_naming_file_line_and_field(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [messy_sharegpt()[0], {"conversations": [_turn("human", "Hi"), _turn("robot", "Beep")]}],
    )
    with pytest.raises(RecordError) as info:
        read_records(path, repair="all")
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "conversations[1].from")
    assert "unsupported role 'robot'" in str(info.value) and "chatgpt" in str(info.value)


def test_a_conversation_with_no_user_turn_is_still_bad(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": [_turn("gpt", "Hello?"), _turn("gpt", "Anyone?")]}])
    report = read_records_report(path, repair="all", on_bad_record="skip")
    assert report.kept == 0 and "has no user turn" in str(report.errors[0])


def test_openai_messages_take_the_same_repairs(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "First"},
                {"role": "user", "content": "Second"},
                {"role": "assistant", "content": "Done"},
                {"role": "user", "content": "   "},
            ]
        }
    ]
    path = _write_jsonl(tmp_path / "openai.jsonl", rows)
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert info.value.field == "messages[1].role"
    [row] = read_records(path, repair="safe").to_pylist()
    assert (row["system"], row["instruction"], row["output"]) == ("Be kind.", "First\n\nSecond", "Done")
    assert row["repairs"] == ["drop_empty_turns", "drop_leading_assistant", "merge_same_role"]


def test_a_merged_turn_over_max_field_chars_is_a_bad_record(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"conversations": [_turn("human", "a" * 6), _turn("human", "b" * 6), _turn("gpt", "ok")]}],
    )
    report = read_records_report(path, repair="safe", max_field_chars=10, on_bad_record="skip")
    assert report.kept == 0 and report.errors[0].field == "conversations[0]"
    assert "merged with the turns after it" in str(report.errors[0])


def test_repair_names_are_checked_and_listed() -> None:
    assert normalize_repair("none") == frozenset() == normalize_repair(None) == normalize_repair([])
    assert normalize_repair("safe") == frozenset(REPAIR_PRESETS["safe"])
    assert normalize_repair("all") == frozenset(REPAIRS)
    assert normalize_repair("merge_same_role, drop_trailing_user") == {"merge_same_role", "drop_trailing_user"}
    with pytest.raises(ConfigError) as info:
        normalize_repair(["merge_same_role", "fix_everything"])
    assert "'fix_everything'" in str(info.value) and "safe" in str(info.value) and "merge_same_role" in str(info.value)


# ---- through Load, convert and the CLI ---------------------------------------------------------------------


def test_load_repairs_reports_counts_in_its_metrics_and_declares_the_column(messy: Path) -> None:
    step = Load(path=str(messy), repair="safe")
    step.check()
    assert "repairs" in step.output_columns([])
    table = step()
    assert table.num_rows == 7 and "repairs" in table.column_names
    metrics = step.metrics()
    assert metrics["repaired"] == {"drop_empty_turns": 2, "drop_leading_assistant": 2, "merge_same_role": 2}
    assert metrics["repaired_lines"]["merge_same_role"] == [3, 5]
    with pytest.raises(ConfigError, match="Load: unknown repair"):
        Load(path=str(messy), repair="everything").check()


def test_load_fingerprint_follows_what_repair_does_not_how_it_is_spelled(messy: Path) -> None:
    off = Load(path=str(messy))
    # off is the behaviour from before the option: the fingerprint (and every cached step after it) holds
    assert "repair" not in off.semantic_params()
    assert Load(path=str(messy), repair="none").fingerprint() == off.fingerprint()
    safe = Load(path=str(messy), repair="safe").fingerprint()
    assert safe != off.fingerprint()
    spelled = Load(path=str(messy), repair=["merge_same_role", "drop_leading_assistant", "drop_empty_turns"])
    assert spelled.fingerprint() == safe
    assert Load(path=str(messy), repair="all").fingerprint() != safe


def test_load_without_repair_keeps_skipping(messy: Path) -> None:
    step = Load(path=str(messy), on_bad_record="skip")
    assert step().num_rows == 3
    assert step.metrics()["repairable_records"] == 4


def test_convert_with_repair_writes_the_repairs_column_and_reads_back(messy: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.jsonl"
    assert convert(messy, out, to_layout="sharegpt", repair="safe") == 7
    written = {r["id"]: r for r in map(orjson.loads, out.read_bytes().splitlines())}
    assert written["two_humans"]["repairs"] == ["merge_same_role"]
    assert [t["from"] for t in written["leading_gpt"]["conversations"]] == ["human", "gpt"]
    # the repaired file reads clean, with or without repairs; the column keeps what was done before
    again = read_records_report(out, repair="safe")
    assert not any(again.repaired.values())
    assert _by_id(again.table)["empty_value"]["repairs"] == ["drop_empty_turns", "merge_same_role"]
    assert read_records(out).num_rows == 7


def test_cli_convert_repair(messy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out.json"
    result = runner.invoke(main, ["convert", str(messy), str(out), "--to", "alpaca", "--repair", "safe"])
    assert result.exit_code == 0, result.output
    assert "wrote 7 rows" in result.output
    assert "repaired: drop_empty_turns 2, drop_leading_assistant 2, merge_same_role 2" in result.output
    rows = orjson.loads(out.read_bytes())
    assert len(rows) == 7 and {r["id"]: r["repairs"] for r in rows}["two_humans"] == ["merge_same_role"]

    # named repairs, comma-separated
    out2 = tmp_path / "out2.jsonl"
    result = runner.invoke(
        main,
        ["convert", str(messy), str(out2), "--to", "sharegpt", "--repair", "merge_same_role,drop_leading_assistant",
         "--on-bad-record", "skip"],
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 of 7 records" in result.output  # the one with a null turn
    assert "--repair safe would read 1 of them (needed: drop_empty_turns 1)" in result.output


def test_cli_convert_without_repair_fails_with_the_record_and_the_fix(messy: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(messy), str(tmp_path / "o.jsonl"), "--to", "alpaca"])
    assert result.exit_code == 2
    assert f"{messy}, line 2, field 'conversations[0].from'" in result.output
    assert "repair='safe' would read it" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_convert_rejects_an_unknown_repair(messy: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(messy), str(tmp_path / "o.jsonl"), "--to", "alpaca",
                                       "--repair", "tidy"])
    assert result.exit_code == 2 and "unknown repair 'tidy'" in result.output
