"""The local runner: executes a Pipeline in a run directory so that no finished work is ever done twice.

How it works. Before any row is touched, every step is checked (parameters, arity, columns along the DAG) and
fingerprinted (step class + VERSION + semantic parameters + parents' fingerprints). Each step writes under
`run_dir/steps/<name>-<fingerprint>/`: `output/`, `rejected/` and `failed/` hold Parquet shards, and `_done.json`
(written last, atomically) marks the step finished and holds its counts. A re-run skips every step whose
`_done.json` exists; a changed parameter gives that step (and its descendants) a new fingerprint, so only they run.

Row steps stream: batch i covers input rows [start, end) and is committed as `part-<start>-<end>.parquet` files
(rejected and failed first, output last, each via temp file, fsync, os.replace). A run killed mid-step resumes with
every committed batch kept, wherever it lies (the Ray runner's workers finish batches out of order, so committed
ranges may have gaps): only the input rows no output shard covers are computed again, a side shard without its
output shard is a torn commit and goes. What a resume redoes is the batches that were not committed yet (the one
being computed, up to `batches_in_flight()` more on worker threads, and up to two queued for the background
writer), whose model answers are in the request cache. Memory holds a few batches per step at a time, whatever the
number of steps or rows.

Generators commit the same way, batch by batch: batch k's side outputs, then `state/part-k.json` (the state the
generator handed over and the candidates counted so far), then its output shard, which marks the batch committed.
On resume the runner hands the last committed state back (`Checkpoint`) and the generator carries on from there.
Global steps (dedup, selection) write their output at once when they finish.

Before `_done.json` is written, the step's folders are fsynced, so after a machine crash a step that looks finished
has every shard whole. `manifest.json` at the top of the run directory is rewritten atomically after every state
change: each step's parameters (secrets redacted), fingerprint, status, start and end times, row accounting and
metrics (LLM usage and cost), and the versions of thresher, Python and the model libraries. `open_run(run_dir)`
reads it all back. A run directory on an object store (s3://, gs://, ...) is worked on in a local copy that uploads
each commit as it is made: `thresher.pipelines.run_store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from thresher.errors import PipelineError, StepError, ThresherError
from thresher.pipelines.batch_phase import drain_rows, run_batch_phase
from thresher.pipelines.dag import Pipeline
from thresher.pipelines.execute import (
    BatchOutput,
    apply_row_step,
    batch_candidates,
    check_columns,
    empty_generated,
    generated_output,
    map_batches,
    run_on_tables,
    verify_accounting,
)
from thresher.pipelines.prefetch import prefetch
from thresher.pipelines.step import Checkpoint, Filter, GeneratedBatch, Generator, RowStep, Step

MANIFEST = "manifest.json"
DONE = "_done.json"
STATE = "state"  # a generator's state after each committed batch: state/part-<batch>.json
#: what `_done.json` keeps of a step's record, so a cached step reports what the run that made it did
_DONE_FIELDS = ("rows_in", "rows_out", "rows_rejected", "rows_failed", "candidates", "seconds", "metrics",
                "started_at", "finished_at")  # fmt: skip
METRICS = "_metrics.json"  # a row step's metrics as of its last committed batch, carried over a resume
SIDES = ("output", "rejected", "failed")
RUNNERS = ("local", "ray")
ROW_GROUP = 65_536  # rows per Parquet row group in the shards the runners write


# ---- small file helpers ---------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Uncompressed, plain-encoded Parquet: intermediate outputs are written once and read once or twice, and this
    # writes ~3x faster than lz4 with dictionaries (the same trade HF datasets makes with its Arrow cache files).
    # Row groups of at most ROW_GROUP rows: a reader of one range (a Ray worker's batch) decodes at most a group
    # more than it needs, not a whole 1M-row file.
    pq.write_table(table, tmp, compression="none", use_dictionary=False, row_group_size=ROW_GROUP)
    # The bytes reach the disk before the name does: after a machine crash a shard is whole or absent, never a
    # committed-looking truncated file. (The folder itself is synced before `_done.json`: see sync_dirs.)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def sync_dirs(*folders: Path) -> None:
    """fsync folders, so the renames that committed their files survive a machine crash (POSIX keeps a rename in
    the folder's metadata, not in the file's)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def shard_name(start: int, end: int) -> str:
    return f"part-{start:012d}-{end:012d}.parquet"


def _state_name(batch: int) -> str:
    return f"part-{batch:012d}.json"


def _shard_range(p: Path) -> tuple[int, int]:
    _, a, b = p.stem.split("-")
    return int(a), int(b)


def list_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")


def _unified_schema(files: list[Path]) -> pa.Schema | None:
    schemas = [pq.read_schema(f) for f in files]
    if not schemas:
        return None
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise StepError(f"the shards in {files[0].parent} disagree on column types: {e}") from e


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema.equals(schema):
        return table
    cols = []
    for f in schema:
        i = table.schema.get_field_index(f.name)
        cols.append(table.column(i).cast(f.type) if i >= 0 else pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def read_folder(folder: Path) -> pa.Table:
    """Every shard of a step's output (or side output) as one table, in row order."""
    files = list_shards(folder)
    schema = _unified_schema(files)
    if schema is None:
        return pa.table({})
    return pa.concat_tables([_conform(pq.read_table(f), schema) for f in files])


def iter_batches(folder: Path, batch_size: int, skip: int = 0) -> Iterator[pa.Table]:
    """Batches of exactly `batch_size` rows (the last one shorter) over a step's output, from row `skip` on."""
    files = list_shards(folder)
    schema = _unified_schema(files)
    if schema is None:
        return
    pending: list[pa.Table] = []
    n_pending = 0
    seen = 0
    for f in files:
        pf = pq.ParquetFile(f)
        rows = pf.metadata.num_rows
        if seen + rows <= skip:  # whole file before the resume point
            seen += rows
            continue
        for rb in pf.iter_batches(batch_size=max(batch_size, 1024)):
            t = pa.Table.from_batches([rb])
            if seen < skip:
                cut = min(skip - seen, t.num_rows)
                seen += cut
                t = t.slice(cut)
            if not t.num_rows:
                continue
            pending.append(_conform(t, schema))
            n_pending += t.num_rows
            while n_pending >= batch_size:
                whole = pa.concat_tables(pending)
                yield whole.slice(0, batch_size)
                rest = whole.slice(batch_size)
                pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
    if n_pending:
        yield pa.concat_tables(pending)


def _check_batch_schema(name: str, before: pa.Schema | None, batch: pa.Schema, start: int, end: int) -> pa.Schema:
    """The schema of the committed batches plus this one; StepError naming the column when they cannot unify."""
    if before is None:
        return batch
    try:
        return pa.unify_schemas([before, batch], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        clashes = []
        for f in batch:
            i = before.get_field_index(f.name)
            if i < 0:
                continue
            try:
                pa.unify_schemas([pa.schema([before.field(i)]), pa.schema([f])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                clashes.append(f"{f.name!r} is {f.type} here but {before.field(i).type} in the batches before")
        raise StepError(
            f"step {name!r}: the output of rows [{start}, {end}) does not fit the batches before it: "
            f"{'; '.join(clashes) or e}. A step must return one type per column in every batch"
        ) from e


def committed_ranges(step_dir: Path) -> list[tuple[int, int]]:
    """The input ranges a row step has committed, in order, after removing torn commits.

    A batch is committed when its output shard is in place (side outputs are written before it). Committed ranges
    may leave gaps: batches finish out of order on the Ray runner, and a run killed there leaves every batch that
    finished. A side shard whose output shard is missing, and an output shard that overlaps one before it (only a
    run with another batch size racing this one could leave that), are deleted: their rows are computed again."""
    ranges: list[tuple[int, int]] = []
    for shard in list_shards(step_dir / "output"):
        a, b = _shard_range(shard)
        if ranges and a < ranges[-1][1]:
            shard.unlink()
            continue
        ranges.append((a, b))
    keep = set(ranges)
    for side in ("rejected", "failed"):
        for shard in list_shards(step_dir / side):
            if _shard_range(shard) not in keep:
                shard.unlink()
    return ranges


def pending_ranges(committed: list[tuple[int, int]], total: int, batch_size: int) -> list[tuple[int, int]]:
    """The batches left to compute: [0, total) minus the committed ranges, each gap cut into `batch_size` rows."""
    out: list[tuple[int, int]] = []
    at = 0
    for a, b in [*committed, (total, total)]:
        for s in range(at, min(a, total), batch_size):
            out.append((s, min(s + batch_size, a, total)))
        at = max(at, b)
    return out


def read_ranges(folder: Path, ranges: list[tuple[int, int]], batch_size: int) -> Iterator[pa.Table]:
    """The rows of each range of a step's output, in order (ranges of at most `batch_size` rows, ascending)."""
    i = 0
    while i < len(ranges):
        j = i  # a run of adjacent ranges is read in one pass over the shards
        while j + 1 < len(ranges) and ranges[j + 1][0] == ranges[j][1]:
            j += 1
        sizes = [b - a for a, b in ranges[i : j + 1]]
        buf: list[pa.Table] = []
        have = k = 0
        for batch in iter_batches(folder, batch_size, skip=ranges[i][0]):
            buf.append(batch)
            have += batch.num_rows
            while k < len(sizes) and have >= sizes[k]:
                whole = pa.concat_tables(buf)
                yield whole.slice(0, sizes[k])
                rest = whole.slice(sizes[k])
                buf, have, k = ([rest] if rest.num_rows else []), rest.num_rows, k + 1
            if k == len(sizes):
                break
        if k < len(sizes):  # the input ended early: the caller's row check names the range
            yield pa.concat_tables(buf) if buf else pa.table({})
            return
        i = j + 1


def _count_rows(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in list_shards(folder))


# ---- checking -------------------------------------------------------------------------------------


def check_pipeline(pipeline: Pipeline) -> dict[str, list[str]]:
    """Check every step before running anything. Returns the columns each node's output will have."""
    if not pipeline.nodes:
        raise PipelineError("the pipeline has no steps")
    columns: dict[str, list[str]] = {}
    for node in pipeline.nodes.values():
        step = node.step
        try:
            step.check()
        except ThresherError as e:
            raise type(e)(f"step {node.name!r}: {e}") from e
        parent_cols = [columns[p] for p in node.parents]
        check_columns(step, node.name, parent_cols)
        columns[node.name] = step.output_columns(parent_cols)
    fingerprints(pipeline)
    return columns


def fingerprints(pipeline: Pipeline) -> dict[str, str]:
    fps: dict[str, str] = {}
    for node in pipeline.nodes.values():
        fps[node.name] = node.step.fingerprint([fps[p] for p in node.parents])
    return fps


# ---- results --------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    name: str
    step: str
    params: dict[str, Any]
    parents: list[str]
    fingerprint: str
    dir: str
    status: str = "pending"  # pending | running | done | cached | failed
    rows_in: int | None = None
    rows_out: int | None = None
    rows_rejected: int | None = None
    rows_failed: int | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    resumed_from_row: int | None = None
    #: generators: candidates considered (= out + rejected + failed); batches resumed from
    candidates: int | None = None
    resumed_from_batch: int | None = None
    #: wall-clock times (Unix seconds) of this run of the step; a cached step keeps those of the run that made it
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class RunResult:
    """What a run produced: each step's record (counts, metrics, timings) and its tables, read from disk.

    Returned by `Pipeline.run`, or rebuilt from a run directory alone with `open_run(run_dir)` (the HTML report
    and other tools read runs this way, in a later process)."""

    run_dir: Path
    steps: dict[str, StepRecord]
    #: the whole manifest.json as written (pipeline name, times, versions, steps)
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> RunResult:
        """The run in `run_dir`, from its manifest.json (raises PipelineError when there is none)."""
        run_dir = local_run_dir(run_dir)  # an object store's run: read from its working copy
        path = run_dir / MANIFEST
        if not path.is_file():
            raise PipelineError(f"{run_dir} is not a run directory: it has no {MANIFEST}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: not valid JSON ({e})") from e
        known = {f.name for f in dataclasses.fields(StepRecord)}
        steps = {}
        for name, rec in (doc.get("steps") or {}).items():
            steps[name] = StepRecord(**{k: v for k, v in rec.items() if k in known})
        return cls(run_dir, steps, doc)

    def metrics(self, name: str) -> dict[str, Any]:
        """The metrics a step reported (LLM usage and cost, load reports, ...)."""
        self._dir(name)
        return dict(self.steps[name].metrics or {})

    def parents(self, name: str) -> list[str]:
        self._dir(name)
        return list(self.steps[name].parents)

    def _dir(self, name: str) -> Path:
        if name not in self.steps:
            raise KeyError(f"no step named {name!r}; steps: {list(self.steps)}")
        return self.run_dir / self.steps[name].dir

    def output_dir(self, name: str) -> Path:
        return self._dir(name) / "output"

    def table(self, name: str) -> pa.Table:
        return read_folder(self._dir(name) / "output")

    def rejected(self, name: str) -> pa.Table:
        return read_folder(self._dir(name) / "rejected")

    def failed(self, name: str) -> pa.Table:
        return read_folder(self._dir(name) / "failed")

    def done(self, name: str) -> bool:
        """Whether the step finished (its `_done.json` is in place)."""
        return (self._dir(name) / DONE).is_file()

    @property
    def executed(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "done"]

    @property
    def cached(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "cached"]


# ---- the runner -----------------------------------------------------------------------------------


def local_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The local folder a run works in: `run_dir` itself, or for an object-store URI (s3://, gs://, ...) its local
    working copy, made equal to the store (`thresher.pipelines.run_store`: Path alone would quietly make a local
    folder named "s3:")."""
    from thresher.pipelines.run_store import working_dir

    return working_dir(run_dir)


def open_run(run_dir: str | os.PathLike[str]) -> RunResult:
    """Read back what a run produced: manifest, each step's output/rejected/failed tables and metrics."""
    return RunResult.open(run_dir)


def _versions() -> dict[str, str | None]:
    """The versions that decide what a run produced: thresher, Python and the libraries models run on."""
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("thresher", "pyarrow", "llama-cpp-python", "openai", "transformers", "torch", "peft",
                 "sentence-transformers", "faiss-cpu", "datasets", "ray"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def merge_metrics(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Add the numbers of two attempts at one step (requests, tokens, cost); other values: the latest wins."""
    out = dict(before)
    for k, v in now.items():
        b = out.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(b, (int, float)):
            out[k] = b + v
        elif isinstance(v, dict) and isinstance(b, dict):
            out[k] = merge_metrics(b, v)
        else:
            out[k] = v
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, Step):
        return {"step": type(v).__name__, "params": _jsonable(v.public_params())}
    return repr(v)


class Runner:
    def __init__(self, pipeline: Pipeline, run_dir: str | Path, *, fresh: bool = False, progress: bool = True):
        from thresher.pipelines.run_store import RemoteRunDir, is_remote, local_path

        self.pipeline = pipeline
        # a run directory on an object store: the run works in a local copy and uploads each commit as it goes
        self.store = RemoteRunDir(os.fspath(run_dir)) if is_remote(run_dir) else None
        self.run_dir = self.store.local if self.store is not None else local_path(os.fspath(run_dir))
        self.fresh = fresh
        self.progress = progress
        self.records: dict[str, StepRecord] = {}
        self._prior_metrics: dict[str, dict[str, Any]] = {}
        self._versions: dict[str, str | None] | None = None
        self.started = time.time()

    # manifest ----------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        if self._versions is None:
            self._versions = _versions()
        doc = {
            "pipeline": self.pipeline.name,
            "started_at": self.started,
            "updated_at": time.time(),
            "versions": self._versions,
            "steps": {n: _jsonable(vars(r)) for n, r in self.records.items()},
        }
        atomic_write_text(self.run_dir / MANIFEST, json.dumps(doc, indent=2, ensure_ascii=False))
        self._upload(self.run_dir / MANIFEST)

    def _upload(self, *paths: Path) -> None:
        """Copy committed files to the object store the run directory is on (in the order given); no-op locally."""
        if self.store is not None:
            self.store.push(paths)

    # running -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        from thresher.llms import budget

        check_pipeline(self.pipeline)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _RunLock(self.run_dir), (self.store.lease() if self.store is not None else contextlib.nullcontext()):
            if self.store is not None:  # the working copy starts as what the store holds, whatever was here before
                fetched = self.store.pull()
                self._say(f"run directory {self.store.uri}: {fetched} files fetched into {self.run_dir}")
            budget.start_run()  # max_cost_usd bounds what this run spends, over all of its steps
            return self._run()

    def _run(self) -> RunResult:
        fps = fingerprints(self.pipeline)
        for node in self.pipeline.nodes.values():
            fp = fps[node.name]
            self.records[node.name] = StepRecord(
                name=node.name,
                step=f"{type(node.step).__module__}.{type(node.step).__qualname__}",
                params=_jsonable(node.step.public_params()),
                parents=list(node.parents),
                fingerprint=fp,
                dir=f"steps/{node.name}-{fp[:16]}",
            )
        if self.fresh:
            for rec in self.records.values():
                shutil.rmtree(self.run_dir / rec.dir, ignore_errors=True)
                if self.store is not None:
                    self.store.remove(self.run_dir / rec.dir)
        self._write_manifest()
        for node in self.pipeline.nodes.values():
            rec = self.records[node.name]
            step_dir = self.run_dir / rec.dir
            done = step_dir / DONE
            if done.exists() and not list_shards(step_dir / "output"):
                # a finished step whose output was deleted by hand: run it again rather than feed 0 rows downstream
                self._say(f"{node.name}: output missing from {step_dir}, running it again")
                done.unlink()
            if done.exists():
                stats = json.loads(done.read_text())
                for k in _DONE_FIELDS:
                    setattr(rec, k, stats.get(k))
                rec.status = "cached"
                self._say(f"{node.name}: cached ({rec.rows_out} rows)")
                self._write_manifest()
                continue
            # columns a peeking source could not promise before the run: checked now against the real data
            check_columns(node.step, node.name, [self._columns_of(p) for p in node.parents])
            rec.status = "running"
            rec.error = None
            rec.started_at, rec.finished_at = time.time(), None
            self._write_manifest()
            t0 = time.perf_counter()
            try:
                node.step.workdir_ = step_dir
                self._execute(node.name, node.step, node.parents, step_dir, rec)
                rec.metrics = _jsonable(merge_metrics(self._prior_metrics.pop(node.name, {}), node.step.metrics()))
            except BaseException as e:
                rec.status = "failed"
                rec.error = f"{type(e).__name__}: {e}"
                rec.seconds = time.perf_counter() - t0
                self._write_manifest()
                self._unload(node.name, node.step)
                if isinstance(e, ThresherError) or not isinstance(e, Exception):
                    raise
                raise StepError(f"step {node.name!r} ({type(node.step).__name__}) failed: {e}") from e
            # a finished step lets go of its model before the next one loads its own
            self._unload(node.name, node.step)
            rec.seconds = time.perf_counter() - t0
            rec.finished_at = time.time()
            verify_accounting(
                node.step, node.name, rec.rows_in or 0, rec.rows_out or 0, rec.rows_rejected or 0, rec.rows_failed or 0
            )
            stats = {k: getattr(rec, k) for k in _DONE_FIELDS}
            stats.update(fingerprint=rec.fingerprint)
            # every shard's rename reaches the disk before the mark that says the step is finished
            sync_dirs(*(step_dir / side for side in (*SIDES, STATE)), step_dir)
            atomic_write_text(done, json.dumps(stats, indent=2))
            if self.store is not None:  # the store's copy of the step as the mirror's (resume deletions too), mark last
                self.store.sync_up(step_dir, last=[done])
            rec.status = "done"
            self._write_manifest()
            self._say(
                f"{node.name}: {rec.rows_in} in -> {rec.rows_out} out, {rec.rows_rejected} rejected, "
                f"{rec.rows_failed} failed ({rec.seconds:.2f}s)"
            )
        return RunResult.open(self.run_dir)

    def _execute(self, name: str, step: Step, parents: list[str], step_dir: Path, rec: StepRecord) -> None:
        """Load the step and run it into `step_dir` (the Ray runner sends row steps to a cluster instead)."""
        step.load()
        step.begin()
        if isinstance(step, (RowStep, Filter)) and step.kind == "row":
            self._run_row_step(name, step, parents, step_dir, rec)
        elif isinstance(step, Generator):
            self._run_generator(name, step, parents, step_dir, rec)
        else:
            self._run_whole_step(name, step, parents, step_dir, rec)

    def _unload(self, name: str, step: Step) -> None:
        try:
            step.unload()
        except Exception as e:  # releasing memory must not turn a finished step into a failed one
            self._say(f"{name}: unload() failed: {type(e).__name__}: {e}")

    def _say(self, msg: str) -> None:
        if self.progress:
            print(f"[thresher] {msg}", file=sys.stderr)

    def _columns_of(self, parent: str) -> list[str]:
        schema = _unified_schema(list_shards(self._parent_dir(parent)))
        return schema.names if schema is not None else []

    def _parent_dir(self, parent: str) -> Path:
        return self.run_dir / self.records[parent].dir / "output"

    def _row_step_plan(
        self, step: Step, parents: list[str], step_dir: Path, rec: StepRecord
    ) -> tuple[Path, int, int, list[tuple[int, int]], list[tuple[int, int]]]:
        """(input folder, input rows, batch size, committed ranges, ranges left) of a row step about to run.

        Resume keeps every committed batch and computes only the input rows none covers."""
        src = self._parent_dir(parents[0])
        total = self.records[parents[0]].rows_out
        if total is None:
            total = _count_rows(src)
        bs = max(1, int(getattr(step, "batch_size", 1024) or 1024))
        committed = committed_ranges(step_dir)
        rec.resumed_from_row = sum(b - a for a, b in committed) or None
        return src, total, bs, committed, pending_ranges(committed, total, bs)

    def _run_row_step(self, name: str, step: Step, parents: list[str], step_dir: Path, rec: StepRecord) -> None:
        src, total, bs, committed, todo = self._row_step_plan(step, parents, step_dir, rec)
        done_rows = rec.resumed_from_row or 0
        # Batch API backends: the requests of every row left go out as batch jobs first (thresher.pipelines.batch_phase)
        run_batch_phase(step, name, lambda: drain_rows(step, name, read_ranges(src, todo, bs)), self._say)
        # usage and cost of the attempts before a crash, as of their last committed batch
        prior = json.loads((step_dir / METRICS).read_text()) if committed and (step_dir / METRICS).exists() else {}
        self._prior_metrics[name] = prior
        bar = _progress(total, name, done_rows, self.progress)
        schema = _unified_schema(list_shards(step_dir / "output"))
        with _ShardWriter(step_dir, self._batch_uploader(step_dir)) as writer:  # batch i written while i+1 computes
            batches = map_batches(step, name, prefetch(read_ranges(src, todo, bs)))
            for (start, end), (batch, out) in zip(todo, batches, strict=False):
                if batch.num_rows != end - start:
                    raise StepError(f"step {name!r}: read {batch.num_rows} input rows for [{start}, {end})")
                # a batch whose columns cannot share a type with the batches before it fails the step here, before
                # it is committed: once the step is done, every later read of its shards would fail instead
                schema = _check_batch_schema(name, schema, out.output.schema, start, end)
                writer.put(start, end, out, merge_metrics(prior, step.metrics()))
                bar.update(batch.num_rows)
        bar.close()
        if not list_shards(step_dir / "output"):  # empty input: still leave a (empty) output
            schema = _unified_schema(list_shards(src))
            empty = schema.empty_table() if schema is not None else pa.table({})
            # through the step, as in memory: the output must have the columns it adds, or a step downstream that
            # reads them (a dedup on a score) fails on a run where an upstream filter rejected every row
            commit_batch(step_dir, 0, 0, apply_row_step(step, name, empty))
        rec.rows_in = total
        rec.rows_out = _count_rows(step_dir / "output")
        rec.rows_rejected = _count_rows(step_dir / "rejected")
        rec.rows_failed = _count_rows(step_dir / "failed")

    def _run_generator(self, name: str, step: Generator, parents: list[str], step_dir: Path, rec: StepRecord) -> None:
        """Commit each batch the generator yields, with its state; on resume, hand the last state back."""
        tables = [read_folder(self._parent_dir(p)) for p in parents]
        rec.rows_in = sum(t.num_rows for t in tables)
        # resume: the committed batches are the output shards 0, 1, ... k-1 without a gap (a batch's output shard
        # is written last, after its side outputs and its state); anything numbered k or later is a torn commit
        committed = 0
        for shard in list_shards(step_dir / "output"):
            a, b = _shard_range(shard)
            if a != committed:
                break
            committed = b
        for side in SIDES:
            for shard in list_shards(step_dir / side):
                if _shard_range(shard)[1] > committed:
                    shard.unlink()
        for f in sorted((step_dir / STATE).glob("part-*.json")) if (step_dir / STATE).is_dir() else []:
            if int(f.stem.split("-")[1]) >= committed:
                f.unlink()
        last: dict[str, Any] = {}
        if committed:
            last = json.loads((step_dir / STATE / _state_name(committed - 1)).read_text(encoding="utf-8"))
        rec.resumed_from_batch = committed or None
        prior = json.loads((step_dir / METRICS).read_text()) if committed and (step_dir / METRICS).exists() else {}
        self._prior_metrics[name] = prior
        checkpoint = Checkpoint(
            state=last.get("state"),
            batches=committed,
            rows=_count_rows(step_dir / "output"),
            _read_output=lambda: read_folder(step_dir / "output"),
        )
        candidates = int(last.get("candidates", 0))
        schema = _unified_schema(list_shards(step_dir / "output"))
        bar = _progress(None, name, checkpoint.rows, self.progress)
        number = committed
        for batch in self._generated_batches(name, step, tables, checkpoint, step_dir):
            out = generated_output(step, name, batch, number)
            schema = _check_batch_schema(name, schema, out.output.schema, number, number + 1)
            candidates += batch_candidates(batch, out)
            # metrics and state before the output shard: the shard's presence is what says "committed"
            metrics = merge_metrics(prior, step.metrics())
            if metrics:
                atomic_write_text(step_dir / METRICS, json.dumps(_jsonable(metrics)), fsync=False)
            state_doc = {"batch": number, "candidates": candidates, "state": batch.state}
            atomic_write_text(step_dir / STATE / _state_name(number), json.dumps(state_doc, ensure_ascii=False))
            sync_dirs(step_dir / STATE)
            commit_batch(step_dir, number, number + 1, out)
            self._upload(step_dir / METRICS, step_dir / STATE / _state_name(number),
                         *batch_files(step_dir, number, number + 1))  # fmt: skip
            number += 1
            bar.update(out.output.num_rows)
        bar.close()
        if not list_shards(step_dir / "output"):  # made nothing: still leave an (empty) output, with its columns
            commit_batch(step_dir, 0, 0, BatchOutput(empty_generated(step)))
        rec.candidates = candidates
        rec.rows_out = _count_rows(step_dir / "output")
        rec.rows_rejected = _count_rows(step_dir / "rejected")
        rec.rows_failed = _count_rows(step_dir / "failed")
        if rec.rows_out + rec.rows_rejected + rec.rows_failed != candidates:
            raise StepError(
                f"generator {name!r}: its committed shards hold {rec.rows_out} out + {rec.rows_rejected} rejected + "
                f"{rec.rows_failed} failed rows but its batches counted {candidates} candidates"
            )

    def _batch_uploader(self, step_dir: Path) -> Callable[[int, int], None] | None:
        """What uploads a committed row-step batch to the object store (None for a local run directory)."""
        if self.store is None:
            return None
        return lambda start, end: self._upload(step_dir / METRICS, *batch_files(step_dir, start, end))

    def _generated_batches(self, name: str, step: Generator, tables: list[pa.Table], checkpoint: Checkpoint,
                           step_dir: Path) -> Iterator[GeneratedBatch]:  # fmt: skip
        """The batches a generator makes, in order (the Ray runner computes some generators' batches on a cluster)."""
        return step.generate_batches(tables, checkpoint)

    def _run_whole_step(self, name: str, step: Step, parents: list[str], step_dir: Path, rec: StepRecord) -> None:
        for side in SIDES:
            shutil.rmtree(step_dir / side, ignore_errors=True)
        tables = [read_folder(self._parent_dir(p)) for p in parents]
        rec.rows_in = sum(t.num_rows for t in tables)
        # a step that needs every row at once reports when it has them all
        bar = _progress(rec.rows_in or 0, name, 0, self.progress)
        run_batch_phase(step, name, lambda: run_on_tables(step, name, tables), self._say)
        out = run_on_tables(step, name, tables)
        bar.update(rec.rows_in or out.output.num_rows)
        bar.close()
        self._write_whole(step_dir, out)
        rec.rows_out = out.output.num_rows
        rec.rows_rejected = out.rejected.num_rows if out.rejected is not None else 0
        rec.rows_failed = out.failed.num_rows if out.failed is not None else 0

    def _write_whole(self, step_dir: Path, out: BatchOutput, rows_per_file: int = 1_000_000) -> None:
        for side, table in (("rejected", out.rejected), ("failed", out.failed), ("output", out.output)):
            if table is None or (side != "output" and not table.num_rows):
                continue
            n = table.num_rows
            for a in range(0, max(n, 1), rows_per_file):
                b = min(n, a + rows_per_file)
                atomic_write_parquet(table.slice(a, b - a), step_dir / side / shard_name(a, b))


def batch_files(step_dir: Path, start: int, end: int) -> list[Path]:
    """The files one committed batch may have, in commit order (side outputs, then the output shard)."""
    return [step_dir / side / shard_name(start, end) for side in ("rejected", "failed", "output")]


def commit_batch(step_dir: Path, start: int, end: int, out: BatchOutput) -> None:
    """Persist one batch: side outputs first, the output shard last (its presence marks the batch committed)."""
    fname = shard_name(start, end)
    if out.rejected is not None and out.rejected.num_rows:
        atomic_write_parquet(out.rejected, step_dir / "rejected" / fname)
    if out.failed is not None and out.failed.num_rows:
        atomic_write_parquet(out.failed, step_dir / "failed" / fname)
    atomic_write_parquet(out.output, step_dir / "output" / fname)


class _ShardWriter:
    """Commits batches in order on a background thread, so writing overlaps the next batch's compute.

    Parquet writing releases the GIL. The queue holds at most two batches, so memory stays bounded; a batch still
    queued when the process dies was never committed, which resume handles like any unfinished batch.
    """

    def __init__(self, step_dir: Path, after: Callable[[int, int], None] | None = None) -> None:
        self.step_dir = step_dir
        self.after = after  # called with (start, end) once a batch is committed (its upload to an object store)
        self.queue: queue.Queue[tuple[int, int, BatchOutput, dict[str, Any]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="thresher-shard-writer", daemon=True)

    def __enter__(self) -> _ShardWriter:
        self.thread.start()
        return self

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    start, end, out, metrics = item
                    if metrics:  # before the shard: a crash may over-count one batch's usage, never under-count
                        atomic_write_text(self.step_dir / METRICS, json.dumps(_jsonable(metrics)), fsync=False)
                    commit_batch(self.step_dir, start, end, out)
                    if self.after is not None:
                        self.after(start, end)
                except BaseException as e:  # surfaced to the caller on its next put() or at exit
                    self.error = e

    def put(self, start: int, end: int, out: BatchOutput, metrics: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((start, end, out, metrics))

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


class _RunLock:
    """One runner per run directory at a time: two would write the same shards and the same manifest."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fh: Any = None

    def __enter__(self) -> _RunLock:
        import fcntl

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise PipelineError(f"run directory {self.path.parent} is in use by {holder}; wait for it or use --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()}")
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, name: str, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    return tqdm(total=total, initial=initial, desc=name, unit="row", leave=False, dynamic_ncols=True, disable=None)

