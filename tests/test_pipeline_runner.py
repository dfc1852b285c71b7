"""The runner: step cache, re-runs that do no work, parameter changes, SIGKILL and resume, accounting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from thresher.errors import AccountingError, PipelineError, StepError
from thresher.filters import LengthFilter
from thresher.pipelines import Pipeline, RowStep, runtime
from thresher.pipelines.runner import list_shards

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_steps import EvenOnly, Flaky, Numbers, Square, calls, count


def three_steps(counters: Path, *, offset: int = 0, sleep: float = 0.0) -> Pipeline:
    c = str(counters)
    return Numbers(n=100, counter_dir=c) >> Square(offset=offset, sleep=sleep, counter_dir=c) >> EvenOnly(counter_dir=c)


def test_rerun_does_no_step_work(tmp_path: Path) -> None:
    counters = tmp_path / "counters"
    counters.mkdir()
    first = three_steps(counters).run(tmp_path / "run", progress=False)
    assert first.executed == ["numbers", "square", "even_only"]
    work = {n: calls(counters, n) for n in ("numbers", "square", "even_only")}
    assert work == {"numbers": 1, "square": 10, "even_only": 7}  # 100 rows in batches of 10 and 16

    for _ in range(2):
        again = three_steps(counters).run(tmp_path / "run", progress=False)
        assert again.executed == []
        assert again.cached == ["numbers", "square", "even_only"]
        assert {n: calls(counters, n) for n in work} == work  # no step did any work
        assert again.table("even_only").equals(first.table("even_only"))


def test_changed_parameter_reruns_only_that_step_and_descendants(tmp_path: Path) -> None:
    counters = tmp_path / "counters"
    counters.mkdir()
    three_steps(counters).run(tmp_path / "run", progress=False)
    before = {n: calls(counters, n) for n in ("numbers", "square", "even_only")}

    changed = three_steps(counters, offset=1).run(tmp_path / "run", progress=False)
    assert changed.cached == ["numbers"]
    assert changed.executed == ["square", "even_only"]
    assert calls(counters, "numbers") == before["numbers"]
    assert calls(counters, "square") == 2 * before["square"]
    # x^2 + 1 flips parity, so the filter keeps the rows it rejected before
    assert set(changed.table("even_only").column("square").to_pylist()) == {i * i + 1 for i in range(1, 100, 2)}

    # a runtime knob (batch size, sleep) is not part of the fingerprint: nothing re-runs
    knob = Numbers(n=100, counter_dir=str(counters)) >> Square(offset=1, batch_size=33) >> EvenOnly(batch_size=5)
    assert knob.run(tmp_path / "run", progress=False).executed == []


def test_fresh_runs_everything_again(tmp_path: Path) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    three_steps(counters).run(tmp_path / "run", progress=False)
    again = three_steps(counters).run(tmp_path / "run", progress=False, fresh=True)
    assert again.executed == ["numbers", "square", "even_only"]
    assert calls(counters, "numbers") == 2


def test_accounting_and_manifest(tmp_path: Path) -> None:
    pipe = Numbers(n=100) >> Flaky() >> LengthFilter(min_chars=3)
    result = pipe.run(tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for name, rec in manifest["steps"].items():
        if name == "numbers":
            continue
        assert rec["rows_in"] == rec["rows_out"] + rec["rows_rejected"] + rec["rows_failed"], name
        assert rec["status"] == "done"
        assert rec["fingerprint"] and rec["seconds"] is not None
    flaky = manifest["steps"]["flaky"]
    assert flaky["rows_failed"] == 10  # row7, row17, ... row97
    failed = result.failed("flaky")
    assert set(failed.column("failed_by").to_pylist()) == {"flaky"}
    assert failed.column("error").to_pylist()[0] == "backend refused row7"
    rejected = result.rejected("length_filter")
    assert rejected.num_rows == manifest["steps"]["length_filter"]["rows_rejected"] > 0
    assert all(r.startswith("output has ") for r in rejected.column("reason").to_pylist())
    assert set(rejected.column("rejected_by").to_pylist()) == {"length_filter"}


def test_step_that_loses_rows_is_caught(tmp_path: Path) -> None:
    class Lossy(RowStep):
        inputs = ("id",)
        outputs = ("x",)

        def map_batch(self, batch: pa.Table) -> dict[str, list[int]]:
            return {"x": [1] * (batch.num_rows - 1)}

    with pytest.raises(StepError, match="has 9 values for a batch of 10 rows"):
        (Numbers(n=20) >> Lossy(batch_size=10)).run(tmp_path / "r", progress=False)

    from thresher.pipelines.execute import verify_accounting

    with pytest.raises(AccountingError, match="rows were lost or invented"):
        verify_accounting(EvenOnly(), "even_only", 10, 5, 3, 1)


def test_columns_checked_before_any_work(tmp_path: Path) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    # EvenOnly needs `square`, which only Square adds: nothing may run, not even the source
    pipe = Numbers(n=10, counter_dir=str(counters)) >> EvenOnly()
    with pytest.raises(PipelineError, match=r"needs column\(s\) \['square'\]"):
        pipe.run(tmp_path / "run", progress=False)
    assert calls(counters, "numbers") == 0
    assert not (tmp_path / "run").exists()


def test_fan_out_and_fan_in(tmp_path: Path) -> None:
    from thresher.pipelines import GlobalStep

    class Union(GlobalStep):
        inputs = ("id",)
        n_inputs = None

        def process(self, tables: list[pa.Table]) -> pa.Table:
            return pa.concat_tables(tables, promote_options="permissive")

    src = Numbers(n=30)
    sq = Square()
    a, b = LengthFilter(min_chars=3), LengthFilter(max_chars=2, min_chars=0)
    pipe = src >> sq >> [a, b]
    pipe = pipe >> Union()
    assert list(pipe.nodes) == ["numbers", "square", "length_filter", "length_filter_2", "union"]
    assert pipe.nodes["union"].parents == ["length_filter", "length_filter_2"]
    res = pipe.run(tmp_path / "run", progress=False)
    # the two filters partition the rows, so their union has every row exactly once
    assert sorted(res.table("union").column("id").to_pylist()) == sorted(f"row{i}" for i in range(30))

    # the list form of fan-in gives the same graph
    other = [src >> sq >> a, b] >> Union()
    assert set(other.nodes) == {"numbers", "square", "length_filter", "length_filter_2", "union"}


def test_cycle_and_unknown_parent_are_errors() -> None:
    p = Pipeline()
    p.add(Numbers(n=1), name="src")
    with pytest.raises(PipelineError, match="not in the pipeline"):
        p.add(Square(), name="sq", after=["nope"])
    sq = Square()
    chain = Numbers(n=1) >> sq
    with pytest.raises(PipelineError, match="cycle"):
        chain >> Square() >> sq


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pipeline_steps import Numbers, Square, EvenOnly
    c = {counters!r}
    pipe = Numbers(n=100, counter_dir=c) >> Square(sleep={sleep}, counter_dir=c) >> EvenOnly(counter_dir=c)
    pipe.run({run!r}, progress=False)
    """
)


def test_sigkill_mid_step_then_resume_gives_same_output(tmp_path: Path) -> None:
    counters = tmp_path / "counters"
    counters.mkdir()
    (tmp_path / "refc").mkdir()
    reference = three_steps(tmp_path / "refc").run(tmp_path / "reference", progress=False)
    run_dir = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), counters=str(counters), run=str(run_dir),
                                          sleep=0.15))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        # wait until Square has committed some but not all of its 10 batches
        while time.time() < deadline:
            shards = [p for d in (run_dir / "steps").glob("square-*") for p in list_shards(d / "output")]
            if len(shards) >= 4:
                break
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = count(counters, "square")
    assert 40 <= done_before_kill < 100
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steps"]["square"]["status"] == "running"

    resumed = three_steps(counters).run(run_dir, progress=False)
    assert resumed.cached == ["numbers"]
    assert calls(counters, "numbers") == 1  # the source was not run again
    redone = count(counters, "square") - done_before_kill
    committed = resumed.steps["square"].resumed_from_row
    assert committed is not None and committed >= 40
    # only the batches after the last committed one ran again (at most the one in flight is repeated)
    assert redone == 100 - committed
    assert resumed.table("even_only").equals(reference.table("even_only"))
    assert resumed.rejected("even_only").equals(reference.rejected("even_only"))
    assert resumed.table("square").equals(reference.table("square"))
    # usage-like metrics add up over the killed attempt and the resumed one (at most one batch counted twice)
    metrics = json.loads((run_dir / "manifest.json").read_text())["steps"]["square"]["metrics"]
    assert 100 <= metrics["rows_processed"] <= 110 and metrics["model"] == "arithmetic"


def test_one_runner_per_run_directory(tmp_path: Path) -> None:
    from thresher.pipelines.runner import _RunLock

    (tmp_path / "run").mkdir()
    with _RunLock(tmp_path / "run"), pytest.raises(PipelineError, match=r"is in use by pid \d+"):
        three_steps(tmp_path).run(tmp_path / "run", progress=False)
    # once released, the directory is usable again
    assert three_steps(tmp_path).run(tmp_path / "run", progress=False).executed


def test_row_step_on_empty_input_still_has_its_columns(tmp_path: Path) -> None:
    from thresher.filters import ExactDedup

    # an upstream filter that rejects every row: the steps after it see no rows, but their columns must exist
    pipe = Numbers(n=5) >> LengthFilter(min_chars=1000) >> Square() >> ExactDedup(fields=["square"])
    res = pipe.run(tmp_path / "run", progress=False)
    assert res.table("square").num_rows == 0
    assert "square" in res.table("square").column_names
    assert res.table("exact_dedup").num_rows == 0
    assert Square().apply(pa.table({"instruction": pa.array([], pa.string())})).output.column_names == [
        "instruction", "square"
    ]


def test_batches_with_clashing_column_types_fail_the_step_not_every_later_read(tmp_path: Path) -> None:
    class Mixed(RowStep):
        inputs = ("instruction",)
        outputs = ("score",)

        def __init__(self, *, batch_size: int = runtime(10)):
            self.batch_size = batch_size

        def map_batch(self, batch: pa.Table) -> dict[str, list]:
            first = batch.column("id")[0].as_py() == "row0"
            return {"score": [1 if first else "high"] * batch.num_rows}

    pipe = Numbers(n=30) >> Mixed() >> Square()
    with pytest.raises(StepError, match=r"step 'mixed'.*rows \[10, 20\).*'score'.*string.*int64"):
        pipe.run(tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["mixed"]["status"] == "failed"  # not cached as done: a fixed step runs again


def test_step_names_and_parents_are_checked() -> None:
    p = Pipeline()
    p.add(Numbers(n=1), name="src")
    for bad in ("../escape", "a/b", ".hidden", "two words"):
        with pytest.raises(PipelineError, match="is not usable"):
            p.add(Square(), name=bad, after=["src"])
    with pytest.raises(PipelineError, match="same parent twice"):
        p.add(Square(), name="sq", after=["src", "src"])


def test_deleted_output_of_a_finished_step_is_rebuilt(tmp_path: Path) -> None:
    import shutil

    counters = tmp_path / "c"
    counters.mkdir()
    first = three_steps(counters).run(tmp_path / "run", progress=False)
    shutil.rmtree(first.output_dir("square"))
    again = three_steps(counters).run(tmp_path / "run", progress=False)
    assert again.executed == ["square"] and again.cached == ["numbers", "even_only"]
    assert again.table("even_only").equals(first.table("even_only"))


def test_prefetch_keeps_order_raises_producer_errors_and_stops_early() -> None:
    import threading

    from thresher.pipelines.prefetch import prefetch

    assert list(prefetch(range(10), prepare=lambda x: x * x)) == [x * x for x in range(10)]

    def broken():
        yield 1
        raise ValueError("disk gone")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="disk gone"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), depth=2, name="test-prefetch")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: the producer thread must end instead of filling memory
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1


def test_a_column_the_source_only_finds_late_is_checked_against_the_real_data(tmp_path: Path) -> None:
    """Load peeks at the start of a JSONL file; a column first seen further on must not fail the pre-run check,
    and a column that is really absent must still fail before the step that needs it runs."""
    from thresher.data import Load
    from thresher.filters import LengthFilter as LF

    rows = [{"instruction": f"task {i}", "output": "ok"} for i in range(400)]
    rows[350]["critique"] = "far down the file"
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    found = (Load(path=str(path)) >> LF(field="critique", min_chars=0)).run(tmp_path / "ok", progress=False)
    assert found.steps["length_filter"].rows_in == 400

    counters = tmp_path / "c"
    counters.mkdir()
    missing = Load(path=str(path)) >> LF(field="nowhere") >> Square(counter_dir=str(counters))
    with pytest.raises(PipelineError, match=r"needs column\(s\) \['nowhere'\]"):
        missing.run(tmp_path / "missing", progress=False)
    assert calls(counters, "square") == 0


def test_a_run_directory_uri_pyarrow_cannot_open_is_an_error_not_a_local_folder(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Path("nosuch://bucket/run") would be a local folder named "nosuch:"; a URI goes to pyarrow.fs, which names
    # what it cannot open (object stores themselves: tests/test_run_store.py, against a real S3 server)
    from thresher import open_run

    monkeypatch.chdir(tmp_path)
    counters = tmp_path / "counters"
    counters.mkdir()
    with pytest.raises(PipelineError, match=r"run directory 'nosuch://bucket/run': pyarrow cannot open it"):
        three_steps(counters).run("nosuch://bucket/run", progress=False)
    with pytest.raises(PipelineError, match="pyarrow cannot open it"):
        open_run("nosuch://bucket/run")
    assert not (tmp_path / "nosuch:").exists() and calls(counters, "square") == 0
