"""Lossless round trips: every layout x every file format, every pair of layouts, and the shared reference data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from thresher.data import (
    CANONICAL_COLUMNS,
    FILE_FORMATS,
    LAYOUTS,
    convert,
    read_records,
    read_records_report,
    records_to_table,
    write_dataset_info,
    write_records,
)
from thresher.errors import ConfigError, RecordError

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import data_path, sample_rows

ALPACA_DEMO = "llama-factory-demo/alpaca_en_demo.json"
SEED_TASKS = "self-instruct/seed_tasks.jsonl"


@pytest.fixture(scope="module")
def samples() -> pa.Table:
    return records_to_table(sample_rows())


@pytest.fixture(scope="module")
def alpaca_demo(shared_data: Path) -> pa.Table:
    return read_records(shared_data / ALPACA_DEMO)


@pytest.fixture(scope="module")
def seed_tasks(shared_data: Path) -> pa.Table:
    return read_records(shared_data / SEED_TASKS)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


# ---- every layout x every format ------------------------------------------------------------------


@pytest.mark.parametrize("file_format", FILE_FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_samples_round_trip_every_layout_and_format(
    samples: pa.Table, layout: str, file_format: str, tmp_path: Path
) -> None:
    path = data_path(tmp_path, "rows", file_format)
    assert write_records(samples, path, layout=layout, file_format=file_format) == samples.num_rows
    report = read_records_report(path)  # layout and format detected
    assert report.layout == layout
    assert report.file_format == file_format
    assert (report.read, report.skipped, report.quarantined) == (samples.num_rows, 0, 0)
    assert _rows(report.table) == _rows(samples)
    assert report.table.schema.equals(samples.schema)


@pytest.mark.parametrize("file_format", FILE_FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_alpaca_demo_round_trips_every_layout_and_format(
    alpaca_demo: pa.Table, layout: str, file_format: str, tmp_path: Path
) -> None:
    path = data_path(tmp_path, "demo", file_format)
    write_records(alpaca_demo, path, layout=layout, file_format=file_format)
    assert read_records(path).equals(alpaca_demo)


@pytest.mark.parametrize("file_format", ["json", "jsonl", "parquet", "csv"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_tasks_round_trip_every_layout_and_format(
    seed_tasks: pa.Table, layout: str, file_format: str, tmp_path: Path
) -> None:
    path = data_path(tmp_path, "seeds", file_format)
    write_records(seed_tasks, path, layout=layout, file_format=file_format)
    assert _rows(read_records(path)) == _rows(seed_tasks)


def test_seed_tasks_round_trip_hf(seed_tasks: pa.Table, tmp_path: Path) -> None:
    write_records(seed_tasks, tmp_path / "seeds_hf", layout="sharegpt", file_format="hf")
    write_records(seed_tasks, tmp_path / "seeds_hf", layout="self_instruct", file_format="hf")  # replaces it
    assert read_records(tmp_path / "seeds_hf").equals(seed_tasks)


def test_reads_a_dataset_dict_saved_to_disk(samples: pa.Table, tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset(samples)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd").equals(samples)  # the train split
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ConfigError, match=r"splits \['a', 'b'\] and no 'train'"):
        read_records(tmp_path / "ab")


# ---- every pair of layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("dst", LAYOUTS)
@pytest.mark.parametrize("src", LAYOUTS)
def test_every_layout_pair_converts_losslessly(samples: pa.Table, src: str, dst: str, tmp_path: Path) -> None:
    a, b, back = tmp_path / "a.jsonl", tmp_path / "b.parquet", tmp_path / "back.json"
    write_records(samples, a, layout=src)
    assert convert(a, b, to_layout=dst) == samples.num_rows
    assert read_records_report(b).layout == dst
    convert(b, back, to_layout=src)
    assert read_records_report(back).layout == src
    assert _rows(read_records(back)) == _rows(samples)


# ---- what each layout looks like on disk ------------------------------------------------------------


def test_sharegpt_file_is_what_llama_factory_reads(samples: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "sg.json"
    write_records(samples, path, layout="sharegpt")
    rows = json.loads(path.read_text(encoding="utf-8"))
    multi = rows[1]
    assert [t["from"] for t in multi["conversations"]] == ["human", "gpt", "human", "gpt", "human", "gpt"]
    assert multi["conversations"][-2]["value"] == "Translate to English.\nBonjour tout le monde"
    assert multi["system"] == "You are a terse translator."
    assert multi["input"] == "Bonjour tout le monde"  # kept so the split can be undone
    assert "input" not in rows[0]  # no input, no key
    assert [t["from"] for t in rows[2]["conversations"]] == ["human"]  # no answer yet: ends on the user turn


def test_messages_and_prompt_completion_files_are_what_trl_reads(samples: pa.Table, tmp_path: Path) -> None:
    write_records(samples, tmp_path / "m.jsonl", layout="messages", extra_columns=False)
    write_records(samples, tmp_path / "pc.jsonl", layout="prompt_completion", extra_columns=False)
    m = [orjson.loads(x) for x in (tmp_path / "m.jsonl").read_bytes().splitlines()]
    pc = [orjson.loads(x) for x in (tmp_path / "pc.jsonl").read_bytes().splitlines()]
    assert set(m[0]) == {"id", "messages"}
    assert m[0]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert m[1]["messages"][0] == {"role": "system", "content": "You are a terse translator."}
    assert set(pc[0]) == {"id", "prompt", "completion"}
    assert pc[0]["completion"] == [{"role": "assistant", "content": "Hi!"}]
    assert [t["role"] for t in pc[1]["prompt"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert pc[2]["completion"] is None


def test_extra_columns_are_top_level_keys_in_every_layout(samples: pa.Table, tmp_path: Path) -> None:
    for layout in LAYOUTS:
        path = tmp_path / f"{layout}.jsonl"
        write_records(samples, path, layout=layout)
        first = orjson.loads(path.read_bytes().splitlines()[0])
        assert first["source"] == "seed" and first["score"] == 4.5 and first["tags"] == ["greeting"], layout
        assert first["meta"] == {"lang": "en", "turns": 1}, layout


def test_csv_keeps_null_apart_from_empty_and_nested_fields_as_json(samples: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    write_records(samples, path)
    text = path.read_text(encoding="utf-8")
    assert '"[[""What is 2+2?"",""4""],[""And 3+3?"",""6""]]"' in text  # history as JSON text in the cell
    back = read_records(path)
    assert back.column("output").to_pylist() == ["Hi!", "Hello everyone", None, ""]
    assert back.column("system").to_pylist() == [None, "You are a terse translator.", None, ""]


def test_hand_written_csv_with_history_as_json_text(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text('instruction,output,history,n\nq2,a2,"[[""q1"", ""a1""]]",3\nq,a,,4\n', encoding="utf-8")
    rows = read_records(path).to_pylist()
    assert rows[0]["history"] == [["q1", "a1"]] and rows[1]["history"] == []
    assert [r["n"] for r in rows] == [3, 4]  # a CSV column that is all numbers reads back as numbers


# ---- Self-Instruct's own seed format -------------------------------------------------------------------


def test_self_instruct_seed_mapping(seed_tasks: pa.Table, shared_data: Path) -> None:
    """instruction -> instruction; instances[0].input/output -> input/output; id kept; name and
    is_classification kept as extra columns."""
    lines = (shared_data / SEED_TASKS).read_bytes().splitlines()
    original = [orjson.loads(x) for x in lines]
    assert seed_tasks.num_rows == 175
    assert seed_tasks.column_names == [*CANONICAL_COLUMNS, "name", "is_classification"]
    first = seed_tasks.slice(0, 1).to_pylist()[0]
    assert first["id"] == "seed_task_0" and first["name"] == "breakfast_suggestion"
    assert first["instruction"] == original[0]["instruction"]
    assert first["input"] == "" and first["output"] == original[0]["instances"][0]["output"]
    assert sum(seed_tasks.column("is_classification").to_pylist()) == 26
    assert sum(1 for x in seed_tasks.column("input").to_pylist() if x) == 125


def test_self_instruct_layout_writes_the_seed_file_back(seed_tasks: pa.Table, shared_data: Path, tmp_path: Path):
    out = tmp_path / "seeds.jsonl"
    write_records(seed_tasks, out, layout="self_instruct")
    original = [orjson.loads(x) for x in (shared_data / SEED_TASKS).read_bytes().splitlines()]
    assert [orjson.loads(x) for x in out.read_bytes().splitlines()] == original


def test_self_instruct_tasks_with_several_instances_keep_them(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    task = {
        "id": "t1",
        "instruction": "Classify the sentiment.",
        "instances": [{"input": "great", "output": "positive"}, {"input": "awful", "output": "negative"}],
        "is_classification": True,
    }
    bare = {"id": "t2", "instruction": "Name a color.", "instances": [], "is_classification": False}
    path.write_bytes(orjson.dumps(task) + b"\n" + orjson.dumps(bare) + b"\n")
    table = read_records(path)
    row = table.to_pylist()[0]
    assert (row["input"], row["output"]) == ("great", "positive")
    assert row["extra_instances"] == [{"input": "awful", "output": "negative"}]
    assert table.to_pylist()[1]["output"] is None
    write_records(table, tmp_path / "again.jsonl", layout="self_instruct")
    assert [orjson.loads(x) for x in (tmp_path / "again.jsonl").read_bytes().splitlines()] == [task, bare]


# ---- reading files written by other tools ---------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_reads_llama_factory_sharegpt_variants(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "be nice"},
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        # LLaMA-Factory's sharegpt with role/content tags
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "system": "be nice"},
    ]
    table = read_records(_jsonl(tmp_path / "sg.jsonl", rows))
    got = [(r["instruction"], r["output"], r["system"], r["history"]) for r in table.to_pylist()]
    assert got == [("hi", "hello", "be nice", [])] * 3


def test_reads_openai_messages_and_sharegpt_style_messages(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}], "split": "train"},
        {"messages": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "split": "test"},
    ]
    report = read_records_report(_jsonl(tmp_path / "m.jsonl", rows))
    assert report.layout == "messages"
    a, b = report.table.to_pylist()
    assert (a["system"], a["history"], a["instruction"], a["output"]) == ("S", [["u1", "a1"]], "u2", "a2")
    assert (b["instruction"], b["output"], b["split"]) == ("u", "a", "test")
    assert read_records(tmp_path / "m.jsonl", layout="openai").equals(report.table)  # alias


def test_reads_trl_prompt_completion_plain_conversational_and_prompt_only(tmp_path: Path) -> None:
    rows = [
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [{"role": "user", "content": "What color is the sky?"}],
         "completion": [{"role": "assistant", "content": "Blue."}]},
        {"prompt": [{"role": "user", "content": "Write a poem."}]},
    ]
    table = read_records(_jsonl(tmp_path / "pc.jsonl", rows), layout="prompt_completion")
    got = [(r["instruction"], r["output"]) for r in table.to_pylist()]
    assert got == [("The sky is", " blue."), ("What color is the sky?", "Blue."), ("Write a poem.", None)]


def test_json_containers_object_with_list_jsonl_in_json_and_single_record(tmp_path: Path) -> None:
    rows = [{"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}]
    (tmp_path / "obj.json").write_bytes(orjson.dumps({"version": 2, "data": rows}))
    (tmp_path / "lines.json").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    (tmp_path / "one.json").write_bytes(orjson.dumps(rows[0]))
    expect = ["a", "b"]
    assert read_records(tmp_path / "obj.json").column("instruction").to_pylist() == expect
    assert read_records(tmp_path / "lines.json").column("instruction").to_pylist() == expect
    assert read_records(tmp_path / "one.json").column("instruction").to_pylist() == ["a"]


def test_explicit_format_and_layout_override_detection(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    row = {"instruction": "q", "output": "a", "prompt": "kept as an extra column", "completion": "this one too"}
    path.write_bytes(orjson.dumps(row) + b"\n")
    with pytest.raises(ConfigError, match=r"pass file_format, one of json, jsonl, parquet, csv, hf"):
        read_records(path)
    # detected as prompt/completion, whose rows cannot also hold an instruction: the error says how to choose
    with pytest.raises(RecordError, match=r"field 'instruction': .*prompt_completion layout.*layout='alpaca'"):
        read_records(path, file_format="jsonl")
    table = read_records(path, file_format="jsonl", layout="alpaca")
    assert table.column("prompt").to_pylist() == ["kept as an extra column"]
    assert table.column("completion").to_pylist() == ["this one too"]
    with pytest.raises(ConfigError, match=r"unknown layout 'alpacca'; valid layouts: alpaca, sharegpt, messages"):
        read_records(path, file_format="jsonl", layout="alpacca")
    with pytest.raises(ConfigError, match=r"unknown file format 'xml'; valid formats: json, jsonl, parquet, csv, hf"):
        read_records(path, file_format="xml")
    with pytest.raises(ConfigError, match=r"unknown on_bad_record 'ignore'; valid choices: fail, skip, quarantine"):
        read_records(path, file_format="jsonl", on_bad_record="ignore")
    with pytest.raises(RecordError, match=r"cannot tell the layout from the keys \['text'\]"):
        read_records(_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))


def test_writes_are_atomic_and_leave_no_temp_files(samples: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")
    write_records(samples, path)
    assert read_records(path).num_rows == samples.num_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with pytest.raises(ConfigError, match="extension"):
        write_records(samples, tmp_path / "out.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ---- LLaMA-Factory dataset_info.json ---------------------------------------------------------------------


def test_dataset_info_entries_merge_into_an_existing_file(samples: pa.Table, tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps({"theirs": {"file_name": "x.json"}}))
    write_records(samples, tmp_path / "a.json", layout="alpaca")
    write_records(samples, tmp_path / "s.jsonl", layout="sharegpt")
    write_records(samples, tmp_path / "m.parquet", layout="messages", extra_columns=False)
    write_dataset_info(tmp_path, "ours_alpaca", "a.json", "alpaca")
    write_dataset_info(tmp_path, "ours_sharegpt", "s.jsonl", "sharegpt")
    path = write_dataset_info(tmp_path, "ours_messages", "m.parquet", "messages")
    info = json.loads(path.read_text())
    assert info["theirs"] == {"file_name": "x.json"}
    assert info["ours_alpaca"] == {
        "file_name": "a.json",
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                    "history": "history"},
    }
    assert info["ours_sharegpt"]["formatting"] == "sharegpt"
    assert info["ours_sharegpt"]["columns"] == {"messages": "conversations", "system": "system"}
    assert info["ours_sharegpt"]["tags"] == {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                             "assistant_tag": "gpt", "system_tag": "system"}
    assert info["ours_messages"]["columns"] == {"messages": "messages"}
    assert info["ours_messages"]["tags"]["role_tag"] == "role"
    assert info["ours_messages"]["tags"]["user_tag"] == "user"
    # a file without the optional columns gets no mapping for them (LLaMA-Factory looks every mapped column up)
    (tmp_path / "plain.json").write_bytes(orjson.dumps([{"instruction": "q", "input": "", "output": "a"}]))
    info = json.loads(write_dataset_info(tmp_path, "plain", "plain.json", "alpaca").read_text())
    assert info["plain"]["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    assert len(info) == 5
    with pytest.raises(ConfigError, match=r"LLaMA-Factory reads the layouts alpaca, sharegpt, messages"):
        write_dataset_info(tmp_path, "pc", "pc.jsonl", "prompt_completion")
