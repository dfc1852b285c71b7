"""Generators commit as they go: each batch is a commit point saved with the generator's state, side outputs carry
rejected and failed candidates, candidates = output + rejected + failed, and a run killed with SIGKILL resumes
from its last commit, re-sending at most the requests that were in flight."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from llm_servers import kill_9_and_rerun
from pipeline_steps import Expand, Numbers, calls

from thresher.errors import AccountingError, StepError
from thresher.llms.testing import FaultServer
from thresher.pipelines import Generator, Pipeline
from thresher.pipelines.runner import open_run
from thresher.pipelines.step import Checkpoint, GeneratedBatch

pytestmark = pytest.mark.usefixtures("isolated_cache")


def seeds_table(n: int = 12) -> pa.Table:
    return pa.table({"id": [f"seed{i}" for i in range(n)], "instruction": [f"Name {i} animals." for i in range(n)]})


class _Seeds(Generator):
    outputs = ("id", "instruction")

    def __init__(self, *, n: int = 12):
        self.n = n

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        return seeds_table(self.n)


def backend(server: FaultServer, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", **kw}


def expand_pipeline(server: FaultServer, counter_dir: Path, **kw: Any) -> Pipeline:
    pipe = Pipeline("grow")
    pipe.add(_Seeds(), name="seeds")
    params = {"backend": backend(server, max_concurrency=8), "target": 50, "per_batch": 10, **kw}
    pipe.add(Expand(counter_dir=str(counter_dir), **params), name="expand", after=["seeds"])
    return pipe


def test_each_batch_commits_with_its_state_and_side_outputs(fault: FaultServer, tmp_path: Path) -> None:
    result = expand_pipeline(fault, tmp_path).run(tmp_path / "run", progress=False)
    rec = result.steps["expand"]
    step_dir = tmp_path / "run" / rec.dir
    # 50 kept rows at 10 candidates a batch, one in seven turned down: 6 batches, 60 candidates
    assert calls(tmp_path, "expand_batches") == 6
    assert len(list((step_dir / "output").glob("part-*.parquet"))) == 6
    states = sorted((step_dir / "state").glob("part-*.json"))
    assert [json.loads(p.read_text())["batch"] for p in states] == list(range(6))
    assert json.loads(states[-1].read_text())["state"] == {"made": rec.rows_out, "asked": 60, "batch": 6}
    assert rec.candidates == 60 == rec.rows_out + rec.rows_rejected + rec.rows_failed
    assert rec.rows_rejected == 9 and rec.rows_failed == 0
    rejected = result.rejected("expand")
    assert set(rejected.column("rejected_by").to_pylist()) == {"expand"}
    assert rejected.column("reason").to_pylist()[0] == "candidate 3: every seventh is turned down"
    out = result.table("expand")
    assert out.column("instruction").to_pylist()[0].startswith("reply to: Write a task like #0: Name ")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["expand"]["candidates"] == 60
    assert manifest["steps"]["expand"]["metrics"]["requests"] == 60


def test_failed_requests_fail_their_candidates_not_the_batch(fault: FaultServer, tmp_path: Path) -> None:
    pipe = Pipeline("grow")
    pipe.add(_FailSeeds(), name="seeds")
    pipe.add(Expand(backend=backend(fault, max_retries=0), target=5, per_batch=6, max_batches=2), name="expand",
             after=["seeds"])
    result = pipe.run(tmp_path / "run", progress=False)
    failed = result.failed("expand")
    # the only seed asks for a 500 every time: every candidate fails, with the server's reason; none is lost
    assert failed.num_rows == result.steps["expand"].candidates - result.steps["expand"].rows_rejected
    assert set(failed.column("failed_by").to_pylist()) == {"expand"}
    assert all("500" in e for e in failed.column("error").to_pylist())


class _FailSeeds(Generator):
    outputs = ("id", "instruction")

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        return pa.table({"id": ["s"], "instruction": ["[[fail]] anything"]})


def test_a_crash_resumes_from_the_last_commit_and_counts_usage_once(fault: FaultServer, tmp_path: Path) -> None:
    """A generator that dies in batch 3 is run again in the same process with the same step object: it carries on
    from the committed state (batches 0-2 are not made again), ends with the rows of an unbroken run, and the
    manifest's request count equals what the server saw (the first attempt's usage is not counted twice)."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "c").mkdir()
    reference = expand_pipeline(fault, tmp_path / "ref", seed=5).run(tmp_path / "ref_run", progress=False)
    fault.reset()
    os.environ["THRESHER_CACHE"] = str(tmp_path / "other-cache.sqlite")  # the reference's answers are not reused
    try:
        pipe = expand_pipeline(fault, tmp_path / "c", seed=5, crash_at_batch=3)
        with pytest.raises(Exception, match="crash at batch 3"):
            pipe.run(tmp_path / "run", progress=False)
        assert calls(tmp_path / "c", "expand_batches") == 3
        result = pipe.run(tmp_path / "run", progress=False)
    finally:
        del os.environ["THRESHER_CACHE"]
    assert calls(tmp_path / "c", "expand_batches") == 6  # 3 committed + the 3 left, none twice
    rec = result.steps["expand"]
    assert rec.resumed_from_batch == 3
    assert result.table("expand").to_pylist() == reference.table("expand").to_pylist()
    assert result.rejected("expand").to_pylist() == reference.rejected("expand").to_pylist()
    # batch 3's requests were answered before the crash: the retry found them in the request cache
    assert fault.stats()["total"] == 60
    assert rec.metrics["requests"] == 60
    assert rec.candidates == 60


def test_the_seed_decides_the_choices(fault: FaultServer, tmp_path: Path) -> None:
    a = expand_pipeline(fault, tmp_path, seed=1).run(tmp_path / "a", progress=False).table("expand")
    b = expand_pipeline(fault, tmp_path, seed=1).run(tmp_path / "b", progress=False).table("expand")
    c = expand_pipeline(fault, tmp_path, seed=2).run(tmp_path / "c", progress=False).table("expand")
    assert a.column("parent_id").to_pylist() == b.column("parent_id").to_pylist()
    assert a.column("parent_id").to_pylist() != c.column("parent_id").to_pylist()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from pipeline_steps import Expand
    from thresher.data.steps import Load
    from thresher.pipelines.dag import Pipeline

    base_url, work = sys.argv[1], Path(sys.argv[2])
    pipe = Pipeline("kill9")
    pipe.add(Load(path=work / "seeds.jsonl"), name="seeds")
    backend = {"kind": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 16}
    pipe.add(Expand(backend=backend, target=400, per_batch=40, seed=3), name="expand", after=["seeds"])
    pipe.run(work / "run", progress=False)
    """
)


def test_kill_9_mid_generator_resends_at_most_max_concurrency(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    fault.configure(latency=0.02)
    rows = seeds_table(30).to_pylist()
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "grow.py"
    script.write_text(KILL_SCRIPT)
    run = kill_9_and_rerun(fault, script, tmp_path, isolated_cache, "expand", args=[str(Path(__file__).parent)],
                           inputs=["seeds.jsonl"])  # fmt: skip
    assert run.committed >= 1
    assert 0 <= run.resent <= 16  # max_concurrency
    got, want = open_run(tmp_path / "run"), open_run(tmp_path / "ref" / "run")
    assert got.table("expand").to_pylist() == want.table("expand").to_pylist()
    assert got.rejected("expand").to_pylist() == want.rejected("expand").to_pylist()
    assert got.steps["expand"].candidates == want.steps["expand"].candidates
    assert got.steps["expand"].resumed_from_batch == run.committed


# ---- the contract, without a model ----------------------------------------------------------------


class _Scripted(Generator):
    """Yields the batches it is given (as lists of rows); for checking what the engine accepts."""

    outputs = ("id",)

    def __init__(self, *, batches: list[dict[str, Any]]):
        self.batches = batches

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint):  # type: ignore[no-untyped-def]
        for b in self.batches[checkpoint.batches :]:
            yield GeneratedBatch(**b)


def test_candidates_must_add_up() -> None:
    step = _Scripted(batches=[{"output": [{"id": "a"}], "rejected": [{"id": "b", "reason": "too short"}],
                               "candidates": 3}])
    with pytest.raises(AccountingError, match="3 candidates but gave 1 out \\+ 1 rejected \\+ 0 failed"):
        step.apply()


def test_rejected_candidates_need_a_reason_and_state_must_be_json() -> None:
    with pytest.raises(StepError, match="rejected rows need a 'reason'"):
        _Scripted(batches=[{"output": [{"id": "a"}], "rejected": [{"id": "b"}]}]).apply()
    with pytest.raises(StepError, match="state is not JSON"):
        _Scripted(batches=[{"output": [{"id": "a"}], "state": {"rng": object()}}]).apply()


def test_standalone_generator_returns_every_batch_and_side_output() -> None:
    res = _Scripted(batches=[
        {"output": [{"id": "a"}], "rejected": [{"id": "b", "reason": "dup"}], "candidates": 2},
        {"output": [{"id": "c"}, {"id": "d"}], "failed": [{"id": "e", "error": "timeout"}], "candidates": 3},
    ]).apply()
    assert res.output.column("id").to_pylist() == ["a", "c", "d"]
    assert res.rejected.column("reason").to_pylist() == ["dup"]
    assert res.failed.column("error").to_pylist() == ["timeout"]
    assert res.failed.column("failed_by").to_pylist() == ["_scripted"]


def test_one_shot_generators_still_work_and_commit_once(tmp_path: Path) -> None:
    pipe = Pipeline("n")
    pipe.add(Numbers(n=30, counter_dir=str(tmp_path)), name="numbers")
    first = pipe.run(tmp_path / "run", progress=False)
    assert first.steps["numbers"].rows_out == 30 and first.steps["numbers"].candidates == 30
    assert calls(tmp_path, "numbers") == 1


class _KeepsNothing(Generator):
    """One batch whose every candidate is rejected."""

    outputs = ("id", "instruction")

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint):  # type: ignore[no-untyped-def]
        empty = pa.table({"id": pa.array([], pa.string()), "instruction": pa.array([], pa.string())})
        yield GeneratedBatch(output=empty, rejected=[{"id": "b", "reason": "too short"}], candidates=1)


def test_a_generator_that_keeps_nothing_leaves_an_empty_output_with_its_columns(tmp_path: Path) -> None:
    """Every candidate rejected: the output is empty but keeps the batches' columns, so the next step still runs."""
    from thresher.data.steps import Concat

    pipe = Pipeline("nothing")
    pipe.add(_KeepsNothing(), name="gen")
    pipe.add(Concat(), name="pool", after=["gen"])
    result = pipe.run(tmp_path / "run", progress=False)
    assert result.table("gen").num_rows == 0 and result.table("gen").column_names == ["id", "instruction"]
    assert result.table("pool").column_names == ["id", "instruction"]


class _YieldsNoBatch(Generator):
    """Stops before its first batch (a seed set with nothing to grow from, a budget already spent)."""

    outputs = ("id", "instruction")

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint):  # type: ignore[no-untyped-def]
        return iter(())


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_generator_that_yields_no_batch_leaves_its_columns(tmp_path: Path, in_memory: bool) -> None:
    """No batch at all: the empty output still has the declared columns, and Concat after it runs (it used to fail
    with "needs column(s) ['id'] ... available: []")."""
    from thresher.data.steps import Concat

    pipe = Pipeline("no-batch")
    pipe.add(_YieldsNoBatch(), name="gen")
    pipe.add(Concat(), name="pool", after=["gen"])
    if in_memory:  # the path a step called on tables takes
        from thresher.pipelines.execute import run_on_tables

        gen = run_on_tables(_YieldsNoBatch(), "gen", []).output
        pool = run_on_tables(Concat(), "pool", [gen]).output
    else:
        result = pipe.run(tmp_path / "run", progress=False)
        gen, pool = result.table("gen"), result.table("pool")
    assert gen.num_rows == 0 and gen.column_names == ["id", "instruction"]
    assert pool.num_rows == 0 and pool.column_names == ["id", "instruction"]
