"""The engine under the methods: the model-step base (per-row failures, unload, usage counted once), seeded
randomness, a run read back from disk, and shards that are on the disk before the step says it is done."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pipeline_steps import EvenOnly, Numbers, Square

from thresher.errors import PipelineError
from thresher.generators import Respond
from thresher.llms.testing import FaultServer
from thresher.pipelines import Filter, Generator, GlobalFilter, Pipeline, RowStep
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.rng import derive_seed, rng
from thresher.pipelines.runner import open_run

pytestmark = pytest.mark.usefixtures("isolated_cache")


def rows(n: int, prefix: str = "question") -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)], "instruction": [f"{prefix} {i}" for i in range(n)]})


class _Table(Generator):
    outputs = ("id", "instruction")

    def __init__(self, *, rows: list[dict[str, Any]]):
        self.rows = rows

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        return pa.Table.from_pylist(self.rows)


# ---- per-row failures in a filter -----------------------------------------------------------------


class _AskingFilter(ModelStep, Filter):
    """Keeps rows the model answers with an even number of characters; a row without an answer fails alone."""

    inputs = ("instruction",)

    def __init__(self, *, backend: Any = None, batch_size: int = 8):
        self.backend, self.batch_size = backend, batch_size

    def keep(self, batch: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        answers = self.model().chat([[{"role": "user", "content": t}] for t in batch.column("instruction").to_pylist()],
                                    max_tokens=8)
        mask = [a.ok and len(a.text or "") % 2 == 0 for a in answers]
        reasons = [f"answer of {len(a.text or '')} characters is odd" for a in answers]
        return mask, reasons, {"error": [a.error for a in answers]}


def test_a_filter_that_asks_a_model_fails_single_rows(fault: FaultServer) -> None:
    table = rows(12)
    instr = table.column("instruction").to_pylist()
    instr[4] = "[[fail]] question 4"
    table = table.set_column(1, "instruction", pa.array(instr))
    spec = {"kind": "openai", "base_url": fault.base_url, "model": "m", "max_retries": 0}
    res = _AskingFilter(backend=spec).apply(table)
    assert res.rows_failed == 1 and res.failed.column("id").to_pylist() == ["r4"]
    assert "500" in res.failed.column("error")[0].as_py()
    assert res.rows_in == res.rows_out + res.rows_rejected + res.rows_failed == 12
    for row in res.rejected.to_pylist():  # each rejected row keeps its own reason, aligned after the failed one left
        answer = f"reply to: {row['instruction']}"
        assert row["reason"] == f"answer of {len(answer)} characters is odd"
    assert all(len(f"reply to: {t}") % 2 == 0 for t in res.output.column("instruction").to_pylist())


# ---- unload ---------------------------------------------------------------------------------------


def test_a_finished_step_releases_its_model(tmp_path: Path) -> None:
    """Two model steps in a row: by the time the second runs, the first one's model object is gone."""
    pytest.importorskip("llama_cpp")
    from thresher.llms.llamacpp import LlamaCpp

    loaded: list[weakref.ref[Any]] = []
    alive_when_second_ran: list[bool] = []

    class Tracked(LlamaCpp):
        def load(self) -> Tracked:
            super().load()
            if not loaded or loaded[-1]() is not self.model_:
                loaded.append(weakref.ref(self.model_))
            return self

    class CheckReleased(RowStep):
        inputs = ("output",)
        outputs = ("checked",)

        def map_batch(self, batch: pa.Table) -> dict[str, Any]:
            gc.collect()
            alive_when_second_ran.append(any(r() is not None for r in loaded))
            return {"checked": [True] * batch.num_rows}

    first = Respond(backend=Tracked(cache=False), max_tokens=2, temperature=0.0)
    pipe = Pipeline("two-models")
    pipe.add(_Table(rows=rows(2).to_pylist()), name="rows")
    pipe.add(first, name="answer", after=["rows"])
    pipe.add(CheckReleased(), name="check", after=["answer"])
    pipe.add(Respond(backend={"kind": "llama_cpp"}, max_tokens=2, temperature=0.0), name="again", after=["check"])
    result = pipe.run(tmp_path / "run", progress=False)
    assert loaded and alive_when_second_ran == [False]
    assert first.backends_ is None  # the step let go of its backend too
    assert result.steps["answer"].metrics["requests"] == 2  # and still reports what it did


# ---- usage counted once ---------------------------------------------------------------------------


def test_applying_a_step_twice_counts_each_run_once(fault: FaultServer) -> None:
    step = Respond(backend={"kind": "openai", "base_url": fault.base_url, "model": "m"}, max_tokens=8, cache=False)
    first = step.apply(rows(4))
    second = step.apply(rows(3, "other"))
    assert first.metrics["requests"] == 4 and second.metrics["requests"] == 3
    assert second.metrics["completion_tokens"] < first.metrics["completion_tokens"] + second.metrics["completion_tokens"]


def test_a_backend_object_shared_by_two_steps_counts_for_each_its_own(fault: FaultServer, tmp_path: Path) -> None:
    from thresher.llms.openai_compat import OpenAICompatible

    shared = OpenAICompatible(base_url=fault.base_url, model="m")
    pipe = Pipeline("shared")
    pipe.add(_Table(rows=rows(5).to_pylist()), name="rows")
    pipe.add(Respond(backend=shared, max_tokens=8), name="a", after=["rows"])
    pipe.add(Respond(backend=shared, max_tokens=9), name="b", after=["a"])
    result = pipe.run(tmp_path / "run", progress=False)
    assert result.steps["a"].metrics["requests"] == 5
    assert result.steps["b"].metrics["requests"] == 5
    assert fault.stats()["total"] == 10


# ---- seeded randomness ----------------------------------------------------------------------------


def test_derived_randomness_is_the_same_in_every_process() -> None:
    code = "from thresher.pipelines.rng import derive_seed, rng; print(derive_seed(7, 'pick', 'row-1', 2), rng(7, [1, 2], 'round', 3).random())"
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h}, capture_output=True,
                       text=True, check=True).stdout
        for h in ("0", "1", "12345")
    }
    assert len(outs) == 1
    assert outs.pop().split()[0] == str(derive_seed(7, "pick", "row-1", 2))
    assert derive_seed(7, "pick", "row-1", 2) != derive_seed(8, "pick", "row-1", 2)
    assert derive_seed(7, "pick", "row-1", 2) != derive_seed(7, "pick", "row-1", 3)
    assert rng(1, "a").random() == rng(1, "a").random() != rng(1, "b").random()
    with pytest.raises(Exception, match="seed must be an integer"):
        derive_seed(True, "x")  # type: ignore[arg-type]


# ---- a run, read back -----------------------------------------------------------------------------


def small_pipeline(counter_dir: Path) -> Pipeline:
    return Numbers(n=40) >> Square(counter_dir=str(counter_dir)) >> EvenOnly()


def test_open_run_reads_back_what_a_run_produced(tmp_path: Path) -> None:
    result = small_pipeline(tmp_path).run(tmp_path / "run", progress=False)
    back = open_run(tmp_path / "run")
    assert list(back.steps) == list(result.steps) == ["numbers", "square", "even_only"]
    for name in back.steps:
        assert back.table(name).equals(result.table(name))
        assert back.steps[name].status == "done" and back.done(name)
        rec = back.steps[name]
        assert rec.started_at is not None and rec.finished_at is not None and rec.started_at <= rec.finished_at
    assert back.rejected("even_only").num_rows == back.steps["even_only"].rows_rejected == 20
    assert back.metrics("square")["rows_processed"] == 40
    assert back.parents("even_only") == ["square"]
    versions = back.manifest["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["thresher"] and versions["pyarrow"] == pa.__version__
    # a second run: cached steps keep the times and counts of the run that made them
    again = open_run(small_pipeline(tmp_path).run(tmp_path / "run", progress=False).run_dir)
    assert again.steps["square"].status == "cached"
    assert again.steps["square"].started_at == back.steps["square"].started_at
    with pytest.raises(PipelineError, match="not a run directory"):
        open_run(tmp_path)
    with pytest.raises(KeyError, match="no step named"):
        back.table("nope")


# ---- durable shards -------------------------------------------------------------------------------


def test_shards_reach_the_disk_before_the_step_is_marked_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine crash must not leave a `_done.json` beside a truncated shard: every shard's bytes are fsynced
    before it gets its name, and its folder (the rename) before `_done.json` is written."""
    events: list[tuple[str, str]] = []
    fds: dict[int, str] = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        fd = real_open(path, flags, *a, **k)
        fds[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd: Any) -> None:
        events.append(("fsync", fds.get(fd, "?") if isinstance(fd, int) else "?"))
        real_fsync(fd)

    def spy_replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    small_pipeline(tmp_path).run(tmp_path / "run", progress=False)
    monkeypatch.undo()

    shards = [(i, e[1]) for i, e in enumerate(events) if e[0] == "replace" and e[1].endswith(".parquet")]
    assert shards
    for i, move in shards:
        src, dst = move.split(" -> ")
        assert ("fsync", src) in events[:i], f"{dst} was renamed before its bytes were synced"
    dones = [i for i, e in enumerate(events) if e[0] == "replace" and e[1].endswith("_done.json")]
    assert len(dones) == 3
    for i, move in shards:
        folder = str(Path(move.split(" -> ")[1]).parent)
        done = next(d for d in dones if d > i)
        synced = [j for j, e in enumerate(events[:done]) if e == ("fsync", folder)]
        assert synced and synced[-1] > i, f"{folder} was not synced between its shard and _done.json"


def test_manifest_is_json_with_step_times(tmp_path: Path) -> None:
    small_pipeline(tmp_path).run(tmp_path / "run", progress=False)
    doc = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {"pipeline", "started_at", "updated_at", "versions", "steps"} <= set(doc)
    assert all("started_at" in s and "finished_at" in s for s in doc["steps"].values())


# ---- a global step's model calls survive its crash ------------------------------------------------


class _EmbedAll(ModelStep, GlobalFilter):
    """Embeds every instruction and keeps every row (the first half of a dedup)."""

    inputs = ("instruction",)
    outputs = ("norm",)
    model_params = {"embedder": "embed"}

    def __init__(self, *, embedder: Any = None):
        self.embedder = embedder

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        vectors = self.model("embedder").embed(table.column("instruction").to_pylist())
        return [True] * table.num_rows, "", {"norm": [float((v * v).sum()) for v in vectors]}


def test_a_global_step_that_dies_half_way_finds_its_embeddings_in_the_cache(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    from thresher.llms.embeddings import SentenceTransformerEmbeddings

    class DiesInThirdChunk(SentenceTransformerEmbeddings):
        store_every = 40

        def _compute(self, texts: list[str], keys: list[str]) -> Any:
            self.chunks_ = getattr(self, "chunks_", 0) + 1
            if self.chunks_ == 3:
                raise RuntimeError("the machine went away")
            return super()._compute(texts, keys)

    table = pa.table({"id": [f"r{i}" for i in range(200)],
                      "instruction": [f"Describe item number {i} in {i % 13 + 2} words." for i in range(200)]})

    def pipe(embedder: Any) -> Pipeline:
        p = Pipeline("embed")
        p.add(_Table(rows=table.to_pylist()), name="rows")
        p.add(_EmbedAll(embedder=embedder), name="embed", after=["rows"])
        return p

    with pytest.raises(Exception, match="the machine went away"):
        pipe(DiesInThirdChunk()).run(tmp_path / "run", progress=False)
    result = pipe(SentenceTransformerEmbeddings()).run(tmp_path / "run", progress=False)
    metrics = result.steps["embed"].metrics
    assert metrics["cache_hits"] == 80 and metrics["cache_misses"] == 120  # two chunks of 40 were kept
    assert result.table("embed").num_rows == 200
    assert all(abs(x - 1.0) < 1e-4 for x in result.table("embed").column("norm").to_pylist())
