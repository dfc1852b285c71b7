"""The Ray runner (`runner: ray`): the same pipelines, resumable the same way, with row steps on a Ray cluster.

How it works. The driver (this process) is a `Runner`: it checks and fingerprints the pipeline, keeps the manifest
and `_done.json` marks exactly as the local runner does, and runs generators and global steps itself. A row step (a
map or a filter) becomes a Ray Data `map_batches` over an actor pool (`ActorPoolStrategy`): the driver lists the
input ranges that no committed batch covers ([start, end), the step's batch size each); each actor rebuilds the step
from its parameters and loads it once (`load()`: a model, a client), then for each range reads the rows from the
parent's Parquet shards in the run directory, runs the batch and commits `part-<start>-<end>.parquet` there itself
(side outputs first, output last, atomically) before it hands the driver only the counts and the output schema.
A row step's rows never pass through Ray's object store; ranges, counts and schemas do. Batches finish in any order, and resume
keeps every committed range (`runner.committed_ranges`), so a killed worker or driver costs only the batches that
were in flight. Ray restarts a dead actor and retries its batch, which is written again, whole, under its own name.

Model steps keep thresher's own client inside each actor: retries, rate limits, structured output, the request
cache (a SQLite file per node). `max_concurrency`, `rpm` and `tpm` are divided among a step's actors
(`share_limits`), so the pool as a whole keeps the limits one process would. Each actor takes two batches at once:
one's reading and committing overlap the other's compute, and a remote-model step computes both at once, so its
request window stays full across batch boundaries, as `batches_in_flight()` does locally.

Global steps with a parallel part run in two stages: NearDedup's vectors are embedded by an actor pool (ranges
committed as `.npy` files under `_vectors/`, resumable the same way), then the search and grouping run on the driver
over the vectors memory-mapped; with `shards`, each k-means cluster is searched by a Ray task of its own (the
grouping stays on the driver). A generator whose rounds are row-parallel (EvolInstruct: `parallel_rounds`) has each
round's batches made by an actor pool from what the round before committed; the driver commits them in batch order,
so its resume is the local generator rule. Other global steps and generators, and a step in Batch API mode (its
jobs go out from the driver), run on the driver as they do locally.

Secrets never enter Ray: a step travels as its class and its parameters without secrets, backend objects pickle
without their keys, and workers read keys from their own environment (`api_key_env`). A step given an `api_key`
parameter is refused before anything runs. The run directory is a path that every node sees as the same folder
(local disk for a one-machine cluster, NFS or another shared mount for several), or an object store
(`thresher.pipelines.run_store`): then each actor reads its input from the store and uploads what it commits from a
scratch folder of its own, and the driver fetches each committed batch into its local copy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from thresher.errors import ConfigError, PipelineError, StepError
from thresher.pipelines.dag import Pipeline
from thresher.pipelines.execute import apply_row_step
from thresher.pipelines.runner import (
    METRICS,
    Runner,
    StepRecord,
    _check_batch_schema,
    _conform,
    _count_rows,
    _jsonable,
    _progress,
    _unified_schema,
    atomic_write_text,
    batch_files,
    check_pipeline,
    commit_batch,
    committed_ranges,
    list_shards,
    merge_metrics,
    pending_ranges,
)
from thresher.pipelines.step import Checkpoint, Filter, GeneratedBatch, Generator, RowStep, Step

WORKERS = "_workers"  # one file per actor started for the step: its process id and node (ops, and the kill tests)
ACTOR_METRICS = "_metrics"  # one file per actor: its step's metrics as of its last committed batch
VECTORS = "_vectors"  # a two-stage step's vectors, one .npy file per committed range
_OPTION_KEYS = ("actors", "num_cpus", "num_gpus")


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("runner: ray needs Ray Data: pip install 'thresher[ray]'") from e
    return ray


# ---- the step as it travels -----------------------------------------------------------------------


def portable_params(name: str, step: Step) -> dict[str, Any]:
    """The parameters an actor rebuilds `step` from: secrets refused (they would enter Ray's object store)."""
    given = sorted(k for k in step._secret_params if getattr(step, k, None) is not None)
    if given:
        raise ConfigError(
            f"step {name!r} ({type(step).__name__}): {given} given as a parameter; under runner: ray a key would travel "
            "through Ray's object store, so workers read it from their environment instead: set the variable named by "
            "the backend's api_key_env (OPENAI_API_KEY by default) on every node and leave the parameter unset"
        )
    return {k: v for k, v in step.get_params().items() if k not in step._secret_params}


def _is_model_step(step: Step) -> bool:
    from thresher.pipelines.model_step import ModelStep

    return isinstance(step, ModelStep)


def share_limits(step: Step, params: dict[str, Any], actors: int) -> dict[str, Any]:
    """`params` with the step's request limits divided among `actors` actors: `max_concurrency` (at least 1 each),
    `rpm` and `tpm`, in each remote backend's spec (or a copy of a backend object) and in the step's own knob."""
    if actors <= 1 or not _is_model_step(step):
        return params
    out = dict(params)
    if isinstance(out.get("max_concurrency"), int):
        out["max_concurrency"] = max(1, out["max_concurrency"] // actors)
    for param in getattr(step, "model_params", {}):
        backend = step._build(param)  # type: ignore[attr-defined]  # cheap: a backend connects in load()
        if not hasattr(backend, "max_concurrency"):
            continue  # an in-process model: nothing shared between actors
        limits: dict[str, Any] = {"max_concurrency": max(1, int(backend.max_concurrency) // actors)}
        for key in ("rpm", "tpm"):
            if getattr(backend, key, None):
                limits[key] = float(getattr(backend, key)) / actors
        spec = out.get(param)
        if spec is None or isinstance(spec, Mapping):
            out[param] = {**(spec or {}), **limits}
        else:
            spec = copy.copy(spec)
            for key, value in limits.items():
                setattr(spec, key, value)
            out[param] = spec
    return out


def _remote_model(step: Step) -> bool:
    if not _is_model_step(step):
        return False
    return any(getattr(step._build(p), "kind", None) == "openai" for p in step.model_params)  # type: ignore[attr-defined]


def _wants_gpu(step: Step) -> bool:
    devices = [getattr(step, "device", None)]
    for param in getattr(step, "model_params", {}):
        spec = getattr(step, param, None)
        devices.append(spec.get("device") if isinstance(spec, Mapping) else getattr(spec, "device", None))
    return any(isinstance(d, str) and d.startswith("cuda") for d in devices)


def batch_api(step: Step) -> bool:
    """Whether the step's model runs in Batch API mode: its requests go out as batch jobs from the driver (the batch
    phase of `thresher.pipelines.batch_phase`), where the provider does the scaling, so it runs as it does locally."""
    if not _is_model_step(step):
        return False
    from thresher.llms.batch import OpenAIBatch

    return any(isinstance(step._build(p), OpenAIBatch) for p in step.model_params)  # type: ignore[attr-defined]


def parallel_rounds(step: Step) -> bool:
    """Whether the step is a generator whose rounds are row-parallel (EvolInstruct: `batch_plan`, `round_inputs`,
    `evolve_batch`), so the cluster makes each round's batches."""
    return isinstance(step, Generator) and all(
        callable(getattr(step, m, None)) for m in ("batch_plan", "round_inputs", "evolve_batch")
    )


def two_stage(step: Step) -> bool:
    """Whether the step is a global step whose vectors the cluster computes (NearDedup embedding its text)."""
    from thresher.filters.embedding import EmbeddingStep

    return isinstance(step, EmbeddingStep) and hasattr(type(step), "preset_vectors_") and step._uses_embedder()


def _search_cluster(vectors: Any, rows: Any, threshold: float, options: dict[str, Any]) -> Any:
    """A Ray task: the pairs among `rows` of the vectors (NearDedup's `find_pairs` over one k-means cluster).
    `vectors` is the vectors file in the run directory, of which it reads only its cluster's rows (memory-mapped),
    or the cluster's vectors themselves (`rows` None)."""
    import numpy as np

    from thresher.filters.near_dedup import find_pairs

    if rows is None:
        return find_pairs(np.ascontiguousarray(vectors), threshold, **options)
    x = np.load(vectors, mmap_mode="r")
    return find_pairs(np.ascontiguousarray(x[rows]), threshold, **options)


def cluster_search_on_ray(path: Path, *, shared: bool = True) -> Any:
    """NearDedup's `search_clusters` for a sharded dedup on the cluster: a task per k-means cluster (one CPU each,
    retried by Ray if its worker dies); the pairs come back to the driver, which groups them. `shared`: the run
    directory is a folder every node sees, so a task gets its row numbers and reads their vectors from `path`;
    else (a run directory on an object store, the vectors file in the driver's local copy) the cluster's vectors
    travel in Ray's object store."""
    ray = _ray()
    task = ray.remote(num_cpus=1, max_retries=3)(_search_cluster)

    def ray_tasks(clusters: list[Any], threshold: float, options: dict[str, Any]) -> list[Any]:
        if shared:
            return list(ray.get([task.remote(str(path), rows, threshold, options) for rows in clusters]))
        import numpy as np

        x = np.load(path, mmap_mode="r")
        return list(ray.get([task.remote(np.asarray(x[rows]), None, threshold, options) for rows in clusters]))

    return ray_tasks


# ---- reading rows by range ------------------------------------------------------------------------


def shard_index(folder: Path, root: Path) -> tuple[list[tuple[str, int, int]], pa.Schema | None]:
    """(path relative to the run directory `root`, first row, rows) of each output shard of a step, and their common
    schema: what a worker needs to read any range without listing the folder again."""
    files = list_shards(folder)
    index = []
    first = 0
    for f in files:
        n = pq.read_metadata(f).num_rows
        index.append((f.relative_to(root).as_posix(), first, n))
        first += n
    return index, _unified_schema(files)


def read_rows(index: Sequence[tuple[str, int, int]], schema: pa.Schema | None, start: int, end: int,
              last: dict[str, Any] | None = None, *, open_file: Any = None) -> pa.Table:  # fmt: skip
    """Rows [start, end) of the shards in `index`, reading only the row groups that hold them. `last` keeps the
    row group read last, so the batches of one group that reach one actor in turn decode it once. `open_file`
    turns an index path into what ParquetFile reads (a path, or an object store's file)."""
    last = {} if last is None else last
    open_file = open_file or (lambda p: p)
    parts = []
    for path, first, n in index:
        if first + n <= start or first >= end:
            continue
        a, b = max(start, first) - first, min(end, first + n) - first
        pf = pq.ParquetFile(open_file(path))  # per call: two calls of one actor may read at once
        at = 0
        for g in range(pf.num_row_groups):
            m = pf.metadata.row_group(g).num_rows
            if at < b and at + m > a:
                lo = max(a, at)
                cached = last.get("group")  # one (key, table) item: threads of one actor may share `last`
                if cached is None or cached[0] != (path, g):
                    cached = last["group"] = ((path, g), pf.read_row_group(g))
                t = cached[1].slice(lo - at, min(b, at + m) - lo)
                parts.append(_conform(t, schema) if schema is not None else t)
            at += m
    if not parts:
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(parts)


def _range_name(start: int, end: int, suffix: str) -> str:
    return f"part-{start:012d}-{end:012d}{suffix}"


def _vector_ranges(folder: Path) -> list[tuple[int, int]]:
    if not folder.is_dir():
        return []
    out: list[tuple[int, int]] = []
    for f in sorted(folder.glob("part-*.npy")):
        _, a, b = f.stem.split("-")
        if out and int(a) < out[-1][1]:
            f.unlink()  # overlaps a range before it: computed again
            continue
        out.append((int(a), int(b)))
    return out


# ---- the actor --------------------------------------------------------------------------------


class _StepWorker:
    """What every actor of a step's pool does once: note its process, rebuild the step, load it."""

    def __init__(self, *, name: str, step_cls: type[Step], params: dict[str, Any], run_dir: str, step_rel: str,
                 parallel: bool = False) -> None:  # fmt: skip
        from thresher.pipelines.run_store import RemoteRunDir, is_remote

        self.name = name
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # A run directory on an object store: this actor works in a scratch copy of its own and uploads each file it
        # commits (the store's credentials come from this node's environment); else the folder every node sees.
        self.store: RemoteRunDir | None = None
        if is_remote(run_dir):
            import tempfile

            self.scratch = tempfile.TemporaryDirectory(prefix="thresher-worker-")
            self.store = RemoteRunDir(run_dir, local=Path(self.scratch.name))
        self.root = self.store.local if self.store is not None else Path(run_dir)
        self.step_dir = self.root / step_rel
        self.lock = threading.Lock()
        # Two calls run at once in an actor, so one batch's reading and committing overlap the other's compute (as
        # the local runner's prefetch and writer threads do). A step computes one batch at a time, as it does
        # locally, unless it says it may take several (`parallel`: a remote-model step, see batches_in_flight).
        self.compute = contextlib.nullcontext() if parallel else threading.Lock()
        # the pid is on disk before the model loads: an operator (or a test) can find and stop a worker mid-step
        atomic_write_text(
            self.step_dir / WORKERS / f"{self.id}.json",
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}),  # the devices Ray gave this actor
            fsync=False,
        )
        self._publish(self.step_dir / WORKERS / f"{self.id}.json")
        # A step that cannot be built or loaded (a bad parameter, a missing model) would fail the same way on every
        # actor restart: the error goes to the driver with the first batch, whole, as a local run raises it.
        self.load_error: Exception | None = None
        try:
            self.step = step_cls(**params)
            self.step.workdir_ = self.step_dir
            self.step.load()
            self.step.begin()
        except Exception as e:
            self.load_error = e

    def _publish(self, *paths: Path, drop: bool = False) -> None:
        """Upload files this actor committed to the object store the run directory is on, in the order given (a
        batch's side outputs before its output shard); `drop`: remove the scratch copies after. No-op otherwise."""
        if self.store is None:
            return
        self.store.push(paths)
        if drop:
            for p in paths:
                p.unlink(missing_ok=True)

    def _save_metrics(self) -> None:
        with self.lock:
            metrics = self.step.metrics()
            if metrics:
                path = self.step_dir / ACTOR_METRICS / f"{self.id}.json"
                atomic_write_text(path, json.dumps(_jsonable(metrics)), fsync=False)
                self._publish(path)


class RangeWorker(_StepWorker):
    """One actor of a step's pool: the step loaded once; each call runs input ranges and commits what they give.

    mode "batch": the step's output, rejected and failed rows for the range, committed as Parquet shards.
    mode "vectors": the step's `row_vectors` for the range, saved as one .npy file (a two-stage global step).
    """

    def __init__(self, *, mode: str, index: list[tuple[str, int, int]], schema: bytes | None, **kw: Any) -> None:
        self.mode = mode
        self.index = index
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema)) if schema is not None else None
        self.last_group: dict[str, Any] = {}  # the input row group read last (read_rows)
        super().__init__(**kw)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        keys = ("start", "end", "rows_out", "rows_rejected", "rows_failed", "schema", "error")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        for start, end in zip(batch["start"], batch["end"], strict=True):
            start, end = int(start), int(end)
            try:
                if self.load_error is not None:
                    raise self.load_error
                row = self._one(start, end)
            except Exception as e:  # handed to the driver whole: Ray's wrappers would keep only its text
                row = (start, end, 0, 0, 0, b"", _pickled_error(e))
            for key, value in zip(keys, row, strict=True):
                out[key].append(value)
        return out

    def _open(self, rel: str) -> Any:
        if self.store is not None:
            return self.store.fs.open_input_file(self.store.remote(rel))
        return str(self.root / rel)

    def _read(self, start: int, end: int) -> pa.Table:
        def read() -> pa.Table:
            return read_rows(self.index, self.schema, start, end, self.last_group, open_file=self._open)

        if self.store is None:
            return read()
        from thresher.pipelines.run_store import retried

        return retried(f"step {self.name!r}: reading input rows [{start}, {end}) from the store", read)

    def _one(self, start: int, end: int) -> tuple[Any, ...]:
        table = self._read(start, end)
        if table.num_rows != end - start:
            raise StepError(f"step {self.name!r}: read {table.num_rows} input rows for [{start}, {end})")
        if self.mode == "vectors":
            with self.compute:
                x = self.step.row_vectors(table)  # type: ignore[attr-defined]
            self._save_vectors(start, end, x)
            counts: tuple[int, int, int] = (end - start, 0, 0)
            schema = b""
        else:
            with self.compute:
                res = apply_row_step(self.step, self.name, table)
            self._save_metrics()  # before the shard: a crash may over-count one batch's usage, never under-count
            commit_batch(self.step_dir, start, end, res)
            self._publish(*batch_files(self.step_dir, start, end), drop=True)
            counts = tuple(t.num_rows if t is not None else 0 for t in (res.output, res.rejected, res.failed))  # type: ignore[assignment]
            schema = res.output.schema.serialize().to_pybytes()
        return (start, end, *counts, schema, b"")

    def _save_vectors(self, start: int, end: int, x: Any) -> None:
        import numpy as np

        self._save_metrics()
        folder = self.step_dir / VECTORS
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / _range_name(start, end, ".npy")
        tmp = folder / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(x, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._publish(final, drop=True)


class RoundWorker(_StepWorker):
    """One actor of a generator with row-parallel rounds (EvolInstruct): each call makes one batch of a round from
    the versions committed before that round, and hands it to the driver, which commits the batches in order."""

    def __init__(self, *, inputs: list[str], **kw: Any) -> None:
        self.prepared: tuple[int, Any] | None = None
        super().__init__(**kw)
        self.tables = [self._read(rel) for rel in inputs]  # the parents' outputs (relative to the run directory)

    def _read(self, rel: str) -> pa.Table:
        """A folder of the run directory as one table (fetched from the object store first when there is one)."""
        from thresher.pipelines.runner import read_folder

        if self.store is not None:
            self.store.pull(self.root / rel)
        return read_folder(self.root / rel)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        import pickle

        out: dict[str, list[Any]] = {"number": [], "batch": [], "error": []}
        for number, round_, a, b, state in zip(batch["number"], batch["round"], batch["a"], batch["b"], batch["state"],
                                               strict=True):  # fmt: skip
            made, error = b"", b""
            try:
                if self.load_error is not None:
                    raise self.load_error
                made = pickle.dumps(self._one(int(round_), int(a), int(b), json.loads(state)))
            except Exception as e:
                error = _pickled_error(e)
            out["number"].append(int(number))
            out["batch"].append(made)
            out["error"].append(error)
        return out

    def _one(self, round_: int, a: int, b: int, state: dict[str, int]) -> Any:
        with self.lock:  # the round's starting versions, read once per actor and round
            if self.prepared is None or self.prepared[0] != round_:
                committed = self._read((self.step_dir / "output").relative_to(self.root).as_posix())
                self.prepared = (round_, self.step.round_inputs(self.tables, committed, round_))  # type: ignore[attr-defined]
            prepared = self.prepared[1]
        with self.compute:
            made = self.step.evolve_batch(prepared, round_, a, b, state)  # type: ignore[attr-defined]
        self._save_metrics()
        return made


def _pickled_error(e: Exception) -> bytes:
    import pickle

    try:
        data = pickle.dumps(e)
        pickle.loads(data)
        return data
    except Exception:  # an exception that does not survive pickling: its type and text, which is what a run shows
        return pickle.dumps(StepError(f"{type(e).__name__}: {e}"))


def _raise_error(result: Mapping[str, Any]) -> None:
    """Raise, on the driver, the exception a worker's step raised for this range (as a local run would)."""
    if result.get("error"):
        import pickle

        raise pickle.loads(result["error"])


def _step_error(e: BaseException) -> BaseException:
    """The exception a step raised in a worker, out of Ray's wrappers (Ray Data's UserCodeException, RayTaskError)."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError keeps the worker's exception here
        if isinstance(cause, BaseException):
            e = cause
        elif type(e).__name__ == "UserCodeException" and e.__cause__ is not None:
            e = e.__cause__
    return e


# ---- the runner -------------------------------------------------------------------------------


class RayRunner(Runner):
    """Runs a pipeline with its row steps on a Ray cluster; see the module docstring.

    address: the cluster to join (None: $RAY_ADDRESS, else a local cluster sized to this machine, shut down at the
    end). actors / num_cpus / num_gpus: each row step's actor pool (default: one actor per CPU of the cluster, or per
    GPU for a step whose device is CUDA; 1 CPU each, 1 GPU for a CUDA step). steps: the same per step name.
    """

    def __init__(self, pipeline: Pipeline, run_dir: str | Path, *, fresh: bool = False, progress: bool = True,
                 address: str | None = None, actors: int | None = None, num_cpus: float | None = None,
                 num_gpus: float | None = None, steps: Mapping[str, Mapping[str, Any]] | None = None) -> None:  # fmt: skip
        super().__init__(pipeline, run_dir, fresh=fresh, progress=progress)
        self.address = address
        self.defaults = {"actors": actors, "num_cpus": num_cpus, "num_gpus": num_gpus}
        self.step_options = {k: dict(v) for k, v in (steps or {}).items()}
        for name, opts in self.step_options.items():
            if name not in pipeline.nodes:
                raise PipelineError(f"ray options name step {name!r}, which is not in the pipeline: {list(pipeline.nodes)}")
            unknown = sorted(set(opts) - set(_OPTION_KEYS))
            if unknown:
                raise PipelineError(f"ray options of step {name!r}: unknown {unknown}; valid: {list(_OPTION_KEYS)}")

    def run(self) -> Any:
        check_pipeline(self.pipeline)
        for node in self.pipeline.nodes.values():  # refused before the cluster starts, not after the first steps
            step = node.step
            on_cluster = (isinstance(step, (RowStep, Filter)) and step.kind == "row") or two_stage(step) or parallel_rounds(step)
            if on_cluster and not batch_api(step):
                portable_params(node.name, step)
        ray = _ray()
        started = False
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=self.progress)
            started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the runner draws its own bar per step
        if not self.progress:  # quiet: Ray Data's plan and timing lines too
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            return super().run()
        finally:
            if started:
                ray.shutdown()

    # ---- dispatch ---------------------------------------------------------------------------------

    def _execute(self, name: str, step: Step, parents: list[str], step_dir: Path, rec: StepRecord) -> None:
        if batch_api(step):
            self._say(f"{name}: Batch API mode: its jobs are sent from the driver, as in a local run")
            super()._execute(name, step, parents, step_dir, rec)
        elif isinstance(step, (RowStep, Filter)) and step.kind == "row":
            self._run_row_step_on_cluster(name, step, parents, step_dir, rec)
        elif parallel_rounds(step):
            step.begin()  # the workers load the step; the driver commits what they make, in order
            self._run_generator(name, step, parents, step_dir, rec)  # type: ignore[arg-type]
        elif two_stage(step):
            import numpy as np

            path = self._vectors_on_cluster(name, step, parents, step_dir)
            # the driver's part (index, search, grouping) reads the vectors memory-mapped: with `shards`, NearDedup
            # holds one k-means cluster's vectors at a time, not all of them
            step.preset_vectors_ = np.load(path, mmap_mode="r")  # type: ignore[attr-defined]
            if getattr(step, "shards", None) is not None:  # its k-means clusters are searched by tasks, in parallel
                step.cluster_search_ = cluster_search_on_ray(path, shared=self.store is None)  # type: ignore[attr-defined]
            try:
                super()._execute(name, step, parents, step_dir, rec)
            finally:
                step.preset_vectors_ = None  # type: ignore[attr-defined]
                step.cluster_search_ = None  # type: ignore[attr-defined]
            if not getattr(step, "store_vectors", False):  # as NearDedup keeps them locally, for rethreshold
                path.unlink(missing_ok=True)
        else:
            super()._execute(name, step, parents, step_dir, rec)

    def _generated_batches(self, name: str, step: Generator, tables: list[pa.Table], checkpoint: Checkpoint,
                           step_dir: Path) -> Iterator[GeneratedBatch]:  # fmt: skip
        """A generator with row-parallel rounds: each round's batches made at once by the step's actor pool, handed
        on in commit order (a round starts once the one before is committed: it evolves what that one made)."""
        if not parallel_rounds(step):
            yield from super()._generated_batches(name, step, tables, checkpoint, step_dir)
            return
        import pickle

        plan = step.batch_plan(tables[0].num_rows if tables else 0, checkpoint.state)  # type: ignore[attr-defined]
        inputs = [self._parent_dir(p).relative_to(self.run_dir).as_posix() for p in self.pipeline.nodes[name].parents]
        number = checkpoint.batches
        for round_ in sorted({p[0] for p in plan}):
            items = [{"number": checkpoint.batches + i, "round": r, "a": a, "b": b, "state": json.dumps(nxt)}
                     for i, (r, a, b, nxt) in enumerate(plan) if r == round_]  # fmt: skip
            done: dict[int, bytes] = {}
            for res in self._map_items(name, step, step_dir, items, RoundWorker, {"inputs": inputs}):
                _raise_error(res)
                done[int(res["number"])] = res["batch"]
                while number in done:
                    yield pickle.loads(done.pop(number))
                    number += 1
        self._prior_metrics[name] = self._prior(step_dir)

    def pool(self, name: str, step: Step, batches: int) -> dict[str, Any]:
        """The actor pool of one step: actors, num_cpus and num_gpus per actor, and whether an actor may compute
        two batches at once (a remote-model step)."""
        opts = {k: v for k, v in self.defaults.items() if v is not None}
        opts.update({k: v for k, v in self.step_options.get(name, {}).items() if v is not None})
        num_gpus = opts.get("num_gpus")
        if num_gpus is None and _wants_gpu(step):
            num_gpus = 1.0
        num_cpus = float(opts.get("num_cpus", 1.0))
        actors = opts.get("actors")
        res = _ray().cluster_resources()
        for what, need in (("GPU", num_gpus or 0.0), ("CPU", num_cpus)):
            if need > res.get(what, 0.0):  # Ray would wait for such a node for ever
                raise ConfigError(
                    f"step {name!r}: an actor needs {need:g} {what}(s) but the Ray cluster has "
                    f"{res.get(what, 0.0):g} in all; set its ray options (num_gpus / num_cpus) or add nodes"
                )
        if actors is None:
            if num_gpus:
                actors = int(res.get("GPU", 0) // num_gpus)
            else:
                actors = int(res.get("CPU", 1) // max(num_cpus, 1e-9))
        actors = max(1, min(int(actors), batches))
        return {"actors": actors, "num_cpus": num_cpus, "num_gpus": num_gpus or 0.0, "parallel": _remote_model(step)}

    def _map_ranges(self, mode: str, name: str, step: Step, todo: list[tuple[int, int]], src: Path,
                    step_dir: Path) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Run `todo` through the step's actor pool; yields each range's result as it finishes (any order)."""
        index, schema = shard_index(src, self.run_dir)
        kwargs = {"mode": mode, "index": index, "schema": schema.serialize().to_pybytes() if schema is not None else None}
        items = [{"start": a, "end": b} for a, b in todo]
        return self._map_items(name, step, step_dir, items, RangeWorker, kwargs)

    def _map_items(self, name: str, step: Step, step_dir: Path, items: list[dict[str, Any]], worker: type,
                   kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:  # fmt: skip
        """`items` through an actor pool of `worker`s that each hold the step; results as they finish (any order)."""
        ray = _ray()
        from ray.data import ActorPoolStrategy

        pool = self.pool(name, step, len(items))
        params = share_limits(step, portable_params(name, step), pool["actors"])
        strategy = ActorPoolStrategy(size=pool["actors"], max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
        ds = ray.data.from_items(items).map_batches(
            worker,
            batch_size=1,
            compute=strategy,
            num_cpus=pool["num_cpus"],
            num_gpus=pool["num_gpus"] or None,
            fn_constructor_kwargs={"name": name, "step_cls": type(step), "params": params,
                                   "run_dir": self.store.uri if self.store is not None else str(self.run_dir),
                                   "step_rel": step_dir.relative_to(self.run_dir).as_posix(),
                                   "parallel": pool["parallel"], **kwargs},
        )  # fmt: skip
        self._say(f"{name}: {len(items)} batches on {pool['actors']} Ray actor(s)")
        try:
            yield from ds.iter_rows()
        except Exception as e:
            inner = _step_error(e)
            if inner is e:
                raise
            raise inner from e  # the message a local run gives, not Ray's wrapper around it

    def _prior(self, step_dir: Path) -> dict[str, Any]:
        """Metrics of every actor that ever worked on the step (and of a local attempt before them), summed."""
        total: dict[str, Any] = {}
        if self.store is not None:  # what the actors wrote to the object store: into the local copy
            for folder in (ACTOR_METRICS, WORKERS):
                self.store.pull(step_dir / folder, exact=False)
        files = [step_dir / METRICS] if (step_dir / METRICS).is_file() else []
        if (step_dir / ACTOR_METRICS).is_dir():
            files += sorted((step_dir / ACTOR_METRICS).glob("*.json"))
        for f in files:
            try:
                total = merge_metrics(total, json.loads(f.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                continue  # a file cut by a crash (written without fsync): that actor's usage is not counted
        return total

    def _run_row_step_on_cluster(self, name: str, step: Step, parents: list[str], step_dir: Path,
                                 rec: StepRecord) -> None:  # fmt: skip
        src, total, bs, _, todo = self._row_step_plan(step, parents, step_dir, rec)
        bar = _progress(total, name, rec.resumed_from_row or 0, self.progress)
        schema = _unified_schema(list_shards(step_dir / "output"))
        if todo:
            for r in self._map_ranges("batch", name, step, todo, src, step_dir):
                start, end = int(r["start"]), int(r["end"])
                _raise_error(r)
                files = batch_files(step_dir, start, end)
                if self.store is not None:  # the worker committed the batch to the object store: into the local copy
                    counts = (int(r["rows_rejected"]), int(r["rows_failed"]), 1)
                    self.store.fetch([f for f, n in zip(files, counts, strict=True) if n])
                try:
                    schema = _check_batch_schema(name, schema, pa.ipc.read_schema(pa.py_buffer(r["schema"])), start, end)
                except StepError:
                    for f in reversed(files):  # committed by the worker: taken back, output shard first
                        f.unlink(missing_ok=True)
                    if self.store is not None:
                        self.store.delete(reversed(files))
                    raise
                bar.update(end - start)
            left = pending_ranges(committed_ranges(step_dir), total, bs)
            if left:  # every range came back, yet some are not on disk: another process deleted them
                raise StepError(f"step {name!r}: input rows {left[:5]} have no committed batch after the run")
        bar.close()
        if not list_shards(step_dir / "output"):  # empty input: the (empty) output still has the step's columns
            in_schema = _unified_schema(list_shards(src))
            step.load()
            step.begin()
            empty = in_schema.empty_table() if in_schema is not None else pa.table({})
            commit_batch(step_dir, 0, 0, apply_row_step(step, name, empty))
        self._prior_metrics[name] = self._prior(step_dir)
        rec.rows_in = total
        rec.rows_out = _count_rows(step_dir / "output")
        rec.rows_rejected = _count_rows(step_dir / "rejected")
        rec.rows_failed = _count_rows(step_dir / "failed")

    def _vectors_on_cluster(self, name: str, step: Step, parents: list[str], step_dir: Path) -> Path:
        """The first stage of a two-stage step: every input row's vector, embedded by the step's actor pool, then
        gathered into one .npy file (`vectors.npy`, as NearDedup stores it) a range at a time; returns its path."""
        import numpy as np
        from numpy.lib.format import open_memmap

        from thresher.filters.near_dedup import VECTORS_FILE

        src = self._parent_dir(parents[0])
        total = _count_rows(src)
        final = step_dir / VECTORS_FILE
        if final.is_file() and len(np.load(final, mmap_mode="r")) == total:  # gathered before a crash: reused
            self._prior_metrics[name] = self._prior(step_dir)
            return final
        bs = max(1, int(getattr(step, "batch_size", 0) or 1024))
        committed = _vector_ranges(step_dir / VECTORS)
        todo = pending_ranges(committed, total, bs)
        bar = _progress(total, f"{name} (vectors)", total - sum(b - a for a, b in todo), self.progress)
        if todo:
            for r in self._map_ranges("vectors", name, step, todo, src, step_dir):
                _raise_error(r)
                if self.store is not None:  # committed by the worker to the object store: into the local copy
                    self.store.fetch([step_dir / VECTORS / _range_name(int(r["start"]), int(r["end"]), ".npy")])
                bar.update(int(r["end"]) - int(r["start"]))
        bar.close()
        self._prior_metrics[name] = self._prior(step_dir)
        ranges = _vector_ranges(step_dir / VECTORS)
        if sum(b - a for a, b in ranges) != total or (ranges and ranges[-1][1] != total):
            raise StepError(f"step {name!r}: the vectors in {step_dir / VECTORS} cover {ranges}, not [0, {total})")
        dim = np.load(step_dir / VECTORS / _range_name(*ranges[0], ".npy"), mmap_mode="r").shape[1] if ranges else 0
        tmp = step_dir / f".{VECTORS_FILE}.{os.getpid()}.tmp"
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        for a, b in ranges:
            out[a:b] = np.load(step_dir / VECTORS / _range_name(a, b, ".npy"))
        out.flush()
        del out
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # whole on disk before its name says so: a reused vectors.npy must not be a torn one
        finally:
            os.close(fd)
        os.replace(tmp, final)
        shutil.rmtree(step_dir / VECTORS, ignore_errors=True)  # all in vectors.npy now
        return final
