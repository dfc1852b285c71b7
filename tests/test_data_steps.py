"""Load and Concat as pipeline steps, the CLI helpers convert and summarize, import cost and read speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.data import CANONICAL_COLUMNS, convert, peek_record_columns, read_records, summarize, write_records
from thresher.data.steps import Concat, Load
from thresher.errors import ConfigError, RecordError, StepError
from thresher.pipelines import Pipeline
from thresher.pipelines.registry import resolve

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import sample_rows, write_lines


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_steps_register_under_their_names() -> None:
    assert resolve("Load") is Load
    assert resolve("Concat") is Concat
    assert Load.n_inputs == 0 and Load.outputs == CANONICAL_COLUMNS
    assert Concat.n_inputs is None and Concat.inputs == ("id",)


def test_load_on_its_own_reads_and_reports(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [orjson.dumps(r) for r in sample_rows()] + [b'{"instruction": 3}'])
    step = Load(path=str(path), on_bad_record="quarantine")
    table = step()
    assert table.num_rows == 4 and table.column_names[:6] == list(CANONICAL_COLUMNS)
    m = step.metrics()
    assert (m["read"], m["kept"], m["quarantined"], m["layout"]) == (5, 4, 1, "alpaca")
    assert Path(m["quarantine_path"]).name == "in.jsonl.quarantine.jsonl"
    assert Load(path=str(path), on_bad_record="skip", limit=2)().num_rows == 2
    with pytest.raises(RecordError, match=r"line 5, field 'instruction'"):
        Load(path=str(path))()


def test_load_checks_parameters_before_running(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", sample_rows())
    with pytest.raises(ConfigError, match="valid choices: fail, skip, quarantine"):
        Load(path=str(path), on_bad_record="drop").check()
    with pytest.raises(ConfigError, match="valid layouts"):
        Load(path=str(path), layout="chatml").check()
    with pytest.raises(ConfigError, match="does not exist"):
        Load(path=str(tmp_path / "nope.jsonl")).check()


def test_load_fingerprint_follows_file_content_and_parameters(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", sample_rows())
    fp = Load(path=str(path)).fingerprint()
    assert Load(path=str(path)).fingerprint() == fp
    assert Load(path=str(path), on_bad_record="skip").fingerprint() != fp
    _jsonl(path, sample_rows()[:2])
    assert Load(path=str(path)).fingerprint() != fp


def test_load_output_columns_peek_at_the_file(tmp_path: Path) -> None:
    extras = ["source", "score", "tags", "meta"]
    for name, layout in [("a.jsonl", "alpaca"), ("s.json", "sharegpt"), ("m.parquet", "messages"),
                         ("p.csv", "prompt_completion"), ("hf_dir", "alpaca")]:
        path = tmp_path / name
        write_records(sample_rows(), path, layout=layout, file_format="hf" if name == "hf_dir" else None)
        assert Load(path=str(path)).output_columns([]) == [*CANONICAL_COLUMNS, *extras], name
        assert read_records(path).column_names == [*CANONICAL_COLUMNS, *extras], name
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(orjson.dumps({"id": "s", "name": "n", "instruction": "i", "instances": []}) + b"\n")
    assert peek_record_columns(seeds) == [*CANONICAL_COLUMNS, "name"]


def test_load_and_concat_in_a_pipeline_resume_and_account(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", sample_rows()[:2])
    b = tmp_path / "b.parquet"
    write_records(sample_rows()[2:], b, layout="sharegpt")
    rows = sample_rows()
    rows[0]["extra_only_here"] = 1

    def pipeline() -> Pipeline:
        return [Load(path=str(a)), Load(path=str(b))] >> Concat()

    first = pipeline().run(tmp_path / "run", progress=False)
    out = first.table("concat")
    assert out.num_rows == 4
    assert out.column("instruction").to_pylist() == [r["instruction"] for r in sample_rows()]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["load"]["metrics"]["read"] == 2
    assert manifest["steps"]["load_2"]["metrics"]["layout"] == "sharegpt"

    again = pipeline().run(tmp_path / "run", progress=False)
    assert again.executed == []
    _jsonl(a, rows[:2])  # edit one input: that load and the concat re-run, the other load is cached
    third = pipeline().run(tmp_path / "run", progress=False)
    assert third.executed == ["load", "concat"] and third.cached == ["load_2"]
    assert third.table("concat").column("extra_only_here").to_pylist() == [1, None, None, None]


def test_concat_names_clashing_column_types() -> None:
    with pytest.raises(StepError, match=r"'score' \(int64 vs string\)"):
        Concat()(pa.table({"id": ["a"], "score": [1]}), pa.table({"id": ["b"], "score": ["high"]}))


def test_convert_returns_rows_and_checks_the_layout_first(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [orjson.dumps(r) for r in sample_rows()] + [b"{oops"])
    with pytest.raises(ConfigError, match="valid layouts"):
        convert(src, tmp_path / "out.json", to_layout="chatml")
    with pytest.raises(RecordError, match="line 5"):
        convert(src, tmp_path / "out.json", to_layout="sharegpt")
    assert not (tmp_path / "out.json").exists()
    assert convert(src, tmp_path / "out.json", to_layout="sharegpt", on_bad_record="skip") == 4
    assert convert(src, tmp_path / "out", to_layout="messages", file_format="hf", on_bad_record="skip") == 4
    assert read_records(tmp_path / "out").equals(read_records(tmp_path / "out.json"))


def test_summarize_a_file_and_a_folder_of_parquet_shards(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", sample_rows())
    s = summarize(path)
    assert (s["rows"], s["layout"], s["file_format"]) == (4, "alpaca", "jsonl")
    assert s["columns"][:6] == list(CANONICAL_COLUMNS)
    assert s["numeric"]["score"] == {"count": 3, "min": 0.0, "mean": pytest.approx(7.75 / 3), "median": 3.25,
                                     "max": 4.5}

    shards = tmp_path / "rejected"
    shards.mkdir()
    pq.write_table(pa.table({"instruction": ["a", "b"], "ifd": [0.5, 1.5], "rejected_by": ["ifd", "ifd"],
                             "reason": ["IFD > 1", "IFD > 1"]}), shards / "part-0-2.parquet")
    pq.write_table(pa.table({"instruction": ["c"], "ifd": [0.25], "rejected_by": ["dedup"],
                             "reason": ["near duplicate of x"]}), shards / "part-2-3.parquet")
    s = summarize(shards)
    assert (s["rows"], s["layout"], s["file_format"]) == (3, "alpaca", "parquet")
    assert s["numeric"]["ifd"] == {"count": 3, "min": 0.25, "mean": 0.75, "median": 0.5, "max": 1.5}
    assert s["value_counts"] == {"rejected_by": {"ifd": 2, "dedup": 1},
                                 "reason": {"IFD > 1": 2, "near duplicate of x": 1}}
    json.dumps(s)  # the CLI prints it as JSON


def test_import_stays_light() -> None:
    code = "import sys, thresher.data, thresher.data.steps; print(sorted({'datasets', 'torch', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reading_100k_alpaca_rows_from_jsonl_is_fast(shared_data: Path, tmp_path: Path) -> None:
    demo = json.loads((shared_data / "llama-factory-demo/alpaca_en_demo.json").read_text(encoding="utf-8"))
    lines = [orjson.dumps(r) for r in demo]
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        for _ in range(100):
            fh.write(b"\n".join(lines) + b"\n")
        fh.write(b"\n".join(lines[: 100_000 - 100 * len(lines)]) + b"\n")
    t0 = time.perf_counter()
    table = read_records(path)
    seconds = time.perf_counter() - t0
    assert table.num_rows == 100_000
    # about 1 s on two busy cores; the bound leaves room for a loaded CI machine
    assert seconds < 5.0, f"reading 100k rows took {seconds:.2f}s"


def test_load_reports_repeated_ids(tmp_path, caplog) -> None:
    import json as _json

    from thresher.data import Load

    rows = [{"id": "a", "instruction": "x", "output": "1"}, {"id": "a", "instruction": "y", "output": "2"},
            {"id": "b", "instruction": "z", "output": "3"}]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(_json.dumps(r) for r in rows))
    step = Load(path=str(path))
    with caplog.at_level("WARNING", logger="thresher.data"):
        res = step.apply()
    assert res.rows_out == 3  # kept as given, nothing dropped
    assert res.metrics["duplicate_ids"] == 1
    assert "1 rows repeat an id" in caplog.text
