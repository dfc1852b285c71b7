"""`runner: ray`: the same tables as the local runner, on a real local Ray cluster (one per module: 2 CPUs, one actor
per pool), a worker killed mid-step and a killed driver losing no row; and, for both runners, resume keeping every
committed batch when the committed ranges have gaps (the Ray runner's workers finish batches out of order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thresher.errors import ConfigError, PipelineError, StepError
from thresher.pipelines import Pipeline, RowStep, runtime
from thresher.pipelines.runner import committed_ranges, list_shards, pending_ranges

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from pipeline_steps import EvenOnly, Numbers, Square, count, same_tables, start_test_ray  # noqa: E402

DATA = Path("../shared/data/self-instruct/user_oriented_instructions.jsonl")


def three_steps(counters: Path | None = None, *, n: int = 100, sleep: float = 0.0) -> Pipeline:
    c = str(counters) if counters is not None else None
    return Numbers(n=n) >> Square(sleep=sleep, counter_dir=c) >> EvenOnly(counter_dir=c)


def two_steps(counters: Path | None = None, *, n: int = 200, sleep: float = 0.0) -> Pipeline:
    # the kill tests: one row step on the cluster (each pool's actors take seconds to start on 2 shared cores)
    pipe = Numbers(n=n) >> Square(sleep=sleep, counter_dir=str(counters) if counters is not None else None)
    pipe.ray_options = {"actors": 1}  # one actor per pool on 2 cores
    return pipe


def step_dir(run_dir: Path, name: str) -> Path:
    return next((run_dir / "steps").glob(f"{name}-*"))


# ---- resume with gaps (both runners) ----------------------------------------------------------------


def test_pending_ranges_fill_every_gap() -> None:
    assert pending_ranges([], 20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert pending_ranges([(10, 20), (40, 45)], 50, 8) == [(0, 8), (8, 10), (20, 28), (28, 36), (36, 40), (45, 50)]
    assert pending_ranges([(0, 50)], 50, 8) == []


def test_local_resume_keeps_committed_batches_after_a_gap(tmp_path: Path) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    reference = three_steps().run(tmp_path / "ref", progress=False)
    run_dir = tmp_path / "run"
    three_steps(counters).run(run_dir, progress=False)
    before = count(counters, "even_only")
    # what a killed Ray run leaves: batches 1 and 4 of EvenOnly (16 rows each) not committed, the rest committed;
    # batch 1 torn (its rejected shard written, its output shard not)
    d = step_dir(run_dir, "even_only")
    (d / "_done.json").unlink()
    for a, b in ((16, 32), (64, 80)):
        (d / "output" / f"part-{a:012d}-{b:012d}.parquet").unlink()
    (d / "rejected" / f"part-{64:012d}-{80:012d}.parquet").unlink()
    assert committed_ranges(d) == [(0, 16), (32, 48), (48, 64), (80, 96), (96, 100)]
    assert not (d / "rejected" / f"part-{16:012d}-{32:012d}.parquet").exists()  # the torn commit went
    resumed = three_steps(counters).run(run_dir, progress=False)
    assert resumed.executed == ["even_only"]
    assert count(counters, "even_only") - before == 32  # the two gaps, nothing else
    assert resumed.steps["even_only"].resumed_from_row == 68
    same_tables(resumed, reference, ["even_only"])
    assert resumed.table("even_only").equals(reference.table("even_only"))  # in row order, not just the same rows


# ---- a real local Ray cluster -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster for this module (2 CPUs, 2 logical GPUs: Ray's resources are counts, so where actors of
    a CUDA step go is tested without a device; 200 MB object store); its workers import the test steps."""
    pytest.importorskip("ray")
    ray = start_test_ray(num_gpus=2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_recipe_under_ray_gives_the_local_tables(ray_cluster: str, llama_server: str, tmp_path: Path) -> None:
    """Load -> TextStats (row step) -> LengthFilter -> Respond (llama.cpp server) -> NearDedup (global), twice."""

    def recipe(cache: Path, runner: str) -> Pipeline:
        text = f"""
        name: ray-equivalence
        runner: {runner}
        ray: {{actors: 1}}
        steps:
          load: {{step: Load, params: {{path: {DATA.resolve()}, limit: 12}}}}
          stats: {{step: TextStats, params: {{batch_size: 5}}}}
          short: {{step: LengthFilter, params: {{field: instruction, max_chars: 180, batch_size: 4}}}}
          respond:
            step: Respond
            params:
              backend: {{kind: openai, base_url: "{llama_server}", model: smollm2, max_concurrency: 1, cache: "{cache}"}}
              max_tokens: 12
              temperature: 0.0
              seed: 0
              batch_size: 3
          dedup: {{step: NearDedup, params: {{threshold: 0.6}}}}
        """
        return Pipeline.from_yaml(textwrap.dedent(text))

    local = recipe(tmp_path / "local.sqlite", "local").run(tmp_path / "local", progress=False)
    assert recipe(tmp_path / "x.sqlite", "ray").runner == "ray"
    t0 = time.perf_counter()
    on_ray = recipe(tmp_path / "ray.sqlite", "ray").run(tmp_path / "ray", progress=False)
    print(f"ray run: {time.perf_counter() - t0:.1f}s")
    steps = ["stats", "short", "respond", "dedup"]
    same_tables(on_ray, local, steps)
    assert local.rejected("short").num_rows > 0 and local.table("respond").num_rows > 0
    # the model was asked on the cluster, not answered from the local run's cache
    assert on_ray.metrics("respond")["requests"] == local.metrics("respond")["requests"] > 0
    for s in steps:
        a, b = on_ray.steps[s], local.steps[s]
        assert (a.rows_in, a.rows_out, a.rows_rejected, a.rows_failed) == (b.rows_in, b.rows_out, b.rows_rejected,
                                                                           b.rows_failed)
    # row steps ran in actors (one pool each), NearDedup's vectors too; its index and grouping on the driver
    for s in ("stats", "short", "respond", "dedup"):
        assert list((step_dir(tmp_path / "ray", s) / "_workers").glob("*.json")), s
    assert (step_dir(tmp_path / "ray", "dedup") / "vectors.npy").is_file()


def test_sharded_near_dedup_searches_each_cluster_in_a_ray_task(ray_cluster: str, tmp_path: Path) -> None:
    """NearDedup with `shards` under Ray: the vectors embedded by actors, each k-means cluster searched by a task of
    its own, the grouping on the driver; the same kept and rejected rows, with the same reasons, as locally."""

    def recipe(runner: str) -> Pipeline:
        text = f"""
        name: ray-sharded-dedup
        runner: {runner}
        ray: {{actors: 1}}
        steps:
          load: {{step: Load, params: {{path: {DATA.resolve()}, limit: 240}}}}
          dedup: {{step: NearDedup, params: {{threshold: 0.6, shards: 3}}}}
        """
        return Pipeline.from_yaml(textwrap.dedent(text))

    local = recipe("local").run(tmp_path / "local", progress=False)
    on_ray = recipe("ray").run(tmp_path / "ray", progress=False)
    same_tables(on_ray, local, ["dedup"])
    m_local, m_ray = local.metrics("dedup"), on_ray.metrics("dedup")
    assert m_local["shards"] == m_ray["shards"] == 3 and m_local["pairs"] == m_ray["pairs"] > 0
    assert local.rejected("dedup").num_rows > 0
    assert m_local["cluster_search"] == "sequential" and m_ray["cluster_search"] == "ray_tasks"


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_and_kill_the_worker(pipe: Pipeline, run_dir: Path, step: str, after: int) -> tuple[Any, int]:
    """Run `pipe` on the cluster (in a thread) and SIGKILL the one actor of `step` once `after` of its batches are
    committed; returns the finished run and the batches committed at the kill."""
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["run"] = pipe.run(run_dir, progress=False, runner="ray")
        except BaseException as e:  # surfaced below
            result["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    _wait_for(lambda: (run_dir / "steps").is_dir() and any(
        len(list_shards(d / "output")) >= after for d in (run_dir / "steps").glob(f"{step}-*")), 120, "batches")
    d = step_dir(run_dir, step)
    workers = list((d / "_workers").glob("*.json"))
    assert len(workers) == 1  # one actor in the pool
    committed_at_kill = len(list_shards(d / "output"))
    os.kill(json.loads(workers[0].read_text())["pid"], signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    assert len(list((d / "_workers").glob("*.json"))) >= 2  # Ray started a new actor, which took over
    return result["run"], committed_at_kill


def test_worker_killed_mid_step_loses_no_row(ray_cluster: str, tmp_path: Path) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    reference = two_steps().run(tmp_path / "ref", progress=False)
    run, committed_at_kill = run_and_kill_the_worker(two_steps(counters, sleep=0.25), tmp_path / "run", "square", 3)
    assert committed_at_kill < 20  # killed mid-step: 20 batches in all
    rec = run.steps["square"]
    assert rec.rows_in == 200 and rec.rows_out == 200
    assert rec.rows_rejected == rec.rows_failed == 0
    assert run.table("square").equals(reference.table("square"))  # every row, in row order
    # the killed actor's batch in flight was done again; nothing else
    assert 200 <= count(counters, "square") <= 200 + 20  # two batches in flight in the actor at most


def test_killed_model_worker_resends_only_its_requests_in_flight(ray_cluster: str, fault: Any, tmp_path: Path) -> None:
    from thresher.generators import Respond

    def pipe(cache: Path) -> Pipeline:
        spec = {"kind": "openai", "base_url": fault.base_url, "model": "fake", "max_concurrency": 4, "cache": str(cache)}
        p = Numbers(n=80) >> Respond(backend=spec, max_tokens=8, batch_size=8)
        p.ray_options = {"actors": 1}
        return p

    fault.configure(latency=0.2)
    reference = pipe(tmp_path / "ref.sqlite").run(tmp_path / "ref", progress=False)
    fault.reset()
    run, committed_at_kill = run_and_kill_the_worker(pipe(tmp_path / "run.sqlite"), tmp_path / "run", "respond", 3)
    assert committed_at_kill < 10
    sent = fault.stats()["total"]
    print(f"80 requests in a whole run; killed after {committed_at_kill} of 10 batches; sent {sent}")
    # the answers the killed actor had committed to the request cache are not asked again: what is re-sent is at
    # most the step's window of requests in flight (4)
    assert 80 <= sent <= 80 + 4
    assert run.table("respond").equals(reference.table("respond"))


_DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import ray
    ray.init(address={address!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {tests!r}}}}}, log_to_driver=False)
    from pipeline_steps import Numbers, Square
    pipe = Numbers(n=200) >> Square(sleep=0.25, counter_dir={counters!r})
    pipe.ray_options = {{"actors": 1}}
    pipe.run({run!r}, progress=False, runner="ray")
    """
)


def test_killed_driver_resumes(ray_cluster: str, tmp_path: Path) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    reference = two_steps().run(tmp_path / "ref", progress=False)
    run_dir = tmp_path / "run"
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), address=ray_cluster, counters=str(counters), run=str(run_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(TESTS)})
    try:
        _wait_for(lambda: proc.poll() is None and (run_dir / "steps").is_dir() and any(
            len(list_shards(d / "output")) >= 4 for d in (run_dir / "steps").glob("square-*")), 180, "4 batches")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steps"]["square"]["status"] == "running"
    time.sleep(2)  # Ray stops the dead driver's actors; one may still commit the batch it was running
    done_before = count(counters, "square")
    resumed = two_steps(counters).run(run_dir, progress=False, runner="ray")
    assert resumed.cached == ["numbers"]
    kept = resumed.steps["square"].resumed_from_row
    assert kept is not None and kept >= 40
    assert count(counters, "square") - done_before == 200 - kept  # only the rows no committed batch covered
    assert resumed.table("square").equals(reference.table("square"))


def test_cli_runner_ray(ray_cluster: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from thresher.cli import main
    from thresher.pipelines.runner import open_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: cli\nray: {{actors: 1}}\nsteps:\n  load: {{step: Load, params: {{path: {DATA.resolve()}, limit: 10}}}}\n"
                      "  stats: {step: TextStats, params: {batch_size: 4}}\n")  # fmt: skip
    cli = CliRunner()
    bad = cli.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "x"), "--address", "127.0.0.1:1"])
    assert bad.exit_code == 2 and "--runner ray" in bad.output
    for runner in ("local", "ray"):
        res = cli.invoke(main, ["run", str(recipe), "--runner", runner, "--out", str(tmp_path / runner), "-q",
                                "--no-report"])  # fmt: skip
        assert res.exit_code == 0, res.output
    on_ray, local = open_run(tmp_path / "ray"), open_run(tmp_path / "local")
    assert on_ray.table("stats").equals(local.table("stats"))
    assert list((step_dir(tmp_path / "ray", "stats") / "_workers").glob("*.json"))
    assert not (step_dir(tmp_path / "local", "stats") / "_workers").exists()


class Boom(RowStep):
    """Fails its batch when the batch holds row `bad` (a bug in a step, raised in a worker)."""

    inputs = ("id",)
    outputs = ("ok",)

    def __init__(self, *, bad: str = "row10", batch_size: int = runtime(10)):
        self.bad, self.batch_size = bad, batch_size

    def map_batch(self, batch: Any) -> dict[str, Any]:
        ids = batch.column("id").to_pylist()
        if self.bad in ids:
            raise ValueError(f"{self.bad} is bad")
        return {"ok": [True] * len(ids)}


class BadLoad(Boom):
    """A step whose model cannot load on the workers (the driver never loads a row step under runner: ray)."""

    def load(self) -> None:
        raise FileNotFoundError("no model at /models/missing")


def test_a_step_error_in_a_worker_fails_the_run_with_its_own_message(ray_cluster: str, tmp_path: Path) -> None:
    pipe = Numbers(n=30) >> Boom()
    pipe.ray_options = {"actors": 1}
    with pytest.raises(StepError, match=r"step 'boom' \(Boom\) failed: row10 is bad$"):
        pipe.run(tmp_path / "run", progress=False, runner="ray")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["boom"]["status"] == "failed"
    assert manifest["steps"]["boom"]["error"] == "ValueError: row10 is bad"
    # a load() that fails on the workers fails the run with its own message too
    pipe = Numbers(n=30) >> BadLoad()
    pipe.ray_options = {"actors": 1}
    with pytest.raises(StepError, match=r"step 'bad_load' \(BadLoad\) failed: no model at /models/missing$"):
        pipe.run(tmp_path / "run2", progress=False, runner="ray")


def test_two_actors_keep_the_steps_max_concurrency_together(ray_cluster: str, fault: Any, tmp_path: Path) -> None:
    from thresher.generators import Respond

    fault.configure(latency=0.2)
    spec = {"kind": "openai", "base_url": fault.base_url, "model": "fake", "max_concurrency": 4, "cache": False}
    pipe = Numbers(n=64) >> Respond(backend=spec, max_tokens=8, batch_size=8)
    pipe.ray_options = {"actors": 2, "num_cpus": 0.5}
    res = pipe.run(tmp_path / "run", progress=False, runner="ray")
    stats = fault.stats()
    assert res.steps["respond"].rows_out == 64 and stats["total"] == 64
    assert len(list((step_dir(tmp_path / "run", "respond") / "_workers").glob("*.json"))) == 2
    # 2 in flight per actor (4 divided by 2), two batches at once in each actor sharing that window: never above 4
    assert 3 <= stats["peak_in_flight"] <= 4, stats["peak_in_flight"]
    assert res.metrics("respond")["requests"] == 64  # both actors' usage, summed


def test_evol_instruct_rounds_run_row_parallel_on_the_cluster(ray_cluster: str, fault: Any, tmp_path: Path) -> None:
    """Each round's batches are made by the pool (from the versions the round before committed) and committed in
    order by the driver: the same rows, rejections and requests as a local run."""
    from test_generators_evol_instruct import evolved_locally_and_on_ray

    local, on_ray = evolved_locally_and_on_ray(fault, tmp_path, tmp_path / "ray")
    a, b = on_ray.steps["evol"], local.steps["evol"]
    assert (a.candidates, a.rows_out, a.rows_rejected) == (b.candidates, b.rows_out, b.rows_rejected)
    assert on_ray.metrics("evol")["requests"] == local.metrics("evol")["requests"]
    assert list((step_dir(tmp_path / "ray", "evol") / "_workers").glob("*.json"))  # made by actors


def test_a_batch_api_step_runs_its_jobs_from_the_driver(ray_cluster: str, fault: Any, tmp_path: Path) -> None:
    from test_llms_batch import spec

    from thresher.generators import Respond

    pipe = Numbers(n=12) >> Respond(backend=spec(fault, cache=str(tmp_path / "c.sqlite")), max_tokens=8, batch_size=4)
    res = pipe.run(tmp_path / "run", progress=False, runner="ray")
    assert res.steps["respond"].rows_out == 12
    routes = fault.stats()["routes"]
    assert routes.get("POST /v1/batches") == 1 and "POST /v1/chat/completions" not in routes  # one batch job
    assert not (step_dir(tmp_path / "run", "respond") / "_workers").exists()  # not by actors


def test_an_actor_the_cluster_cannot_place_is_an_error(ray_cluster: str, tmp_path: Path) -> None:
    pipe = two_steps(n=20)
    pipe.ray_options = {"steps": {"square": {"num_gpus": 3}}}  # the test cluster has 2
    with pytest.raises(ConfigError, match=r"step 'square': an actor needs 3 GPU\(s\) but the Ray cluster has 2"):
        pipe.run(tmp_path / "run", progress=False, runner="ray")


def test_a_cuda_step_gets_an_actor_per_gpu_each_with_its_own_device(ray_cluster: str, tmp_path: Path) -> None:
    """A step whose device is CUDA asks 1 GPU an actor by default, so the pool has one actor per GPU of the cluster
    and Ray gives each its own (CUDA_VISIBLE_DEVICES); `num_gpus: 2` gives one actor both."""
    from pipeline_steps import WhereAmI

    res = (Numbers(n=40) >> WhereAmI()).run(tmp_path / "one-each", progress=False, runner="ray")
    t = res.table("where_am_i")
    assert t.num_rows == 40
    # two actors started, each on a device of its own (which one did more batches is up to Ray's scheduling)
    actors = {w["pid"]: w["gpus"] for w in (json.loads(f.read_text())
                                            for f in (step_dir(tmp_path / "one-each", "where_am_i") / "_workers").iterdir())}  # fmt: skip
    assert sorted(actors.values()) == ["0", "1"]
    for pid, gpus in zip(t.column("pid").to_pylist(), t.column("gpus").to_pylist(), strict=True):
        assert actors[pid] == gpus  # each row computed on its actor's device

    pipe = Numbers(n=10) >> WhereAmI()
    pipe.ray_options = {"steps": {"where_am_i": {"num_gpus": 2}}}
    both = pipe.run(tmp_path / "both", progress=False, runner="ray").table("where_am_i")
    assert set(both.column("gpus").to_pylist()) == {"0,1"}


def test_secrets_never_travel_to_the_cluster(tmp_path: Path) -> None:
    import pickle

    from thresher.generators import Respond
    from thresher.llms.openai_compat import OpenAICompatible
    from thresher.pipelines.ray_runner import RayRunner, portable_params

    step = Respond(backend={"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, api_key="sk-secret")
    with pytest.raises(ConfigError, match=r"step 'respond'.*api_key.*environment"):
        portable_params("respond", step)
    pipe = Numbers(n=3) >> step
    with pytest.raises(ConfigError, match=r"api_key"):
        RayRunner(pipe, tmp_path / "run", progress=False).run()  # refused before any cluster starts
    backend = OpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", api_key="sk-secret")
    assert b"sk-secret" not in pickle.dumps(backend)
    assert b"sk-secret" not in pickle.dumps(portable_params("r", Respond(backend=backend)))


def test_limits_are_divided_among_actors() -> None:
    from thresher.generators import Respond
    from thresher.llms.openai_compat import OpenAICompatible
    from thresher.pipelines.ray_runner import portable_params, share_limits

    spec = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrency": 64, "rpm": 600}
    step = Respond(backend=spec)
    shared = share_limits(step, portable_params("r", step), 4)
    assert shared["backend"]["max_concurrency"] == 16 and shared["backend"]["rpm"] == 150
    assert step.backend["max_concurrency"] == 64  # the driver's step is left as it was
    obj = OpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", max_concurrency=10, tpm=1000)
    shared = share_limits(Respond(backend=obj), {"backend": obj}, 3)
    assert (shared["backend"].max_concurrency, shared["backend"].tpm) == (3, 1000 / 3)
    assert obj.max_concurrency == 10
    # an in-process model is not shared: nothing to divide
    assert share_limits(Respond(), {"backend": None}, 4) == {"backend": None}


def test_runner_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="unknown runner 'spark'"):
        three_steps().run(tmp_path / "a", runner="spark")
    with pytest.raises(PipelineError, match="address names a Ray cluster"):
        three_steps().run(tmp_path / "a", address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"runner"):
        Pipeline.from_yaml("runner: spark\nsteps:\n  n: {step: TextStats}\n")
    p = Pipeline.from_yaml("runner: ray\nray: {actors: 2, steps: {n: {num_gpus: 1}}}\nsteps:\n  n: {step: TextStats}\n")
    assert p.runner == "ray" and p.ray_options == {"actors": 2, "steps": {"n": {"num_gpus": 1.0}}}
    again = Pipeline.from_yaml(p.to_yaml())
    assert (again.runner, again.ray_options) == (p.runner, p.ray_options)
