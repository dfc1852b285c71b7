"""A run directory on an object store: a real S3 server on 127.0.0.1 (moto's), reached through pyarrow.fs.

The local runner and the Ray runner (a real local Ray cluster) give the same tables there as on local disk; a driver
killed mid-step resumes from the store on "another machine" (a fresh local copy) with only the uncommitted batches
computed again; a second driver is refused while the first holds the lease; credentials never go in the address."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thresher import open_run
from thresher.errors import PipelineError
from thresher.pipelines import Pipeline

pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from pipeline_steps import EvenOnly, Numbers, Square, count, same_tables, start_test_ray  # noqa: E402

DATA = Path("../shared/data/self-instruct/user_oriented_instructions.jsonl")
BUCKET = "thresher-runs"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "thresher-test", "AWS_SECRET_ACCESS_KEY": "thresher-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 with one bucket; the credentials in this process's environment (so in the Ray
    workers it starts), as a deployment would have them. Yields the endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    before = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FlakyS3:
    """A proxy on 127.0.0.1 in front of the S3 server that answers bursts of requests with 503 SlowDown (what S3
    says when throttling): of every `period` requests, `burst` in a row fail. A burst longer than the attempts
    pyarrow's client makes on its own is what thresher's retries are for."""

    def __init__(self, upstream: str, *, period: int = 100, burst: int = 20) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.count = self.failed = 0
        self.burst = burst
        lock = threading.Lock()
        host, port = upstream.split(":")
        outer = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                with lock:
                    outer.count += 1
                    fail = (outer.count % period) >= period - burst
                    outer.failed += fail
                if fail:
                    error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                             b"<Message>Please reduce your request rate.</Message></Error>")  # fmt: skip
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length") or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def uri(endpoint: str, name: str) -> str:
    return f"s3://{BUCKET}/{name}?endpoint_override={endpoint}&scheme=http"


def listing(address: str) -> dict[str, int]:
    """path (relative to the run directory) -> size of every object under a run directory on the store."""
    fs, base = pafs.FileSystem.from_uri(address)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def on_machine(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """What follows runs as if on another machine: its local copies of store runs live in `folder`."""
    monkeypatch.setenv("THRESHER_MIRROR_DIR", str(folder))


def three_steps(counters: Path | None = None, *, sleep: float = 0.0) -> Pipeline:
    c = str(counters) if counters is not None else None
    return Numbers(n=100) >> Square(sleep=sleep, counter_dir=c) >> EvenOnly(counter_dir=c)


def test_a_run_on_the_store_gives_the_local_tables_and_is_cached_from_any_machine(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = tmp_path / "c"
    counters.mkdir()
    local = three_steps().run(tmp_path / "local", progress=False)
    address = uri(s3, "cached")
    on_machine(monkeypatch, tmp_path / "machine-a")
    first = three_steps(counters).run(address, progress=False)
    same_tables(first, local, ["numbers", "square", "even_only"])
    assert first.rejected("even_only").num_rows == 50
    stored = listing(address)
    assert "manifest.json" in stored
    for rec in first.steps.values():  # every step finished on the store, with its shards beside its mark
        assert f"{rec.dir}/_done.json" in stored
        assert any(p.startswith(f"{rec.dir}/output/part-") for p in stored)
    assert not [p for p in stored if any(part.startswith(".") for part in p.split("/"))]  # no temp file, no lease
    work = count(counters, "square")
    assert work == 100

    # another machine: nothing of the run on its disk; every step is found finished on the store
    on_machine(monkeypatch, tmp_path / "machine-b")
    again = three_steps(counters).run(address, progress=False)
    assert again.cached == ["numbers", "square", "even_only"] and count(counters, "square") == work
    same_tables(again, local, ["numbers", "square", "even_only"])

    # a third reads it back without running anything
    on_machine(monkeypatch, tmp_path / "machine-c")
    read = open_run(address)
    same_tables(read, local, ["square", "even_only"])
    assert read.steps["even_only"].rows_rejected == 50


def test_a_local_copy_fetches_only_objects_it_does_not_hold_in_that_version(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local copy of a run is checked against the store by size and modification time: after its own run it
    holds every object; once another machine has rewritten the run (`fresh`), it fetches the new versions, even
    where they have the same size, and the objects that run removed go from it too."""
    from thresher.pipelines.run_store import RemoteRunDir

    address = uri(s3, "versions")
    on_machine(monkeypatch, tmp_path / "machine-a")
    first = three_steps().run(address, progress=False)
    store = RemoteRunDir(address)
    assert store.local == first.run_dir
    assert store.pull() == 0  # everything it wrote, it uploaded and holds in that version
    shard = next((first.run_dir / first.steps["square"].dir / "output").glob("part-*.parquet"))
    size, mtime = shard.stat().st_size, shard.stat().st_mtime
    stray = first.run_dir / first.steps["square"].dir / "output" / "part-999999999999-999999999999.parquet"
    stray.write_bytes(shard.read_bytes())  # not on the store

    on_machine(monkeypatch, tmp_path / "machine-b")
    time.sleep(1.1)  # S3 keeps modification times to the second
    three_steps().run(address, progress=False, fresh=True)

    on_machine(monkeypatch, tmp_path / "machine-a")
    objects = sum(1 for p in listing(address) if not p.startswith("."))
    fetched = RemoteRunDir(address).pull()
    assert fetched == objects  # every object was written again by machine b
    assert shard.stat().st_size == size and shard.stat().st_mtime != mtime
    assert not stray.exists()
    assert open_run(address).steps["square"].rows_out == 100


def test_bursts_of_throttled_requests_lose_no_row(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """20% of the store's answers are 503 SlowDown, in bursts of 20: longer than pyarrow's client retries on its own
    (about 10 attempts over 6 s), so thresher's retries carry the run (said in the log), and the run and its reading
    back lose nothing."""
    flaky = FlakyS3(s3)
    try:
        local = three_steps().run(tmp_path / "local", progress=False)
        address = uri(flaky.endpoint, "throttled")
        on_machine(monkeypatch, tmp_path / "machine-a")
        with caplog.at_level(logging.WARNING, logger="thresher.run_store"):
            run = three_steps().run(address, progress=False)
        same_tables(run, local, ["numbers", "square", "even_only"])
        on_machine(monkeypatch, tmp_path / "machine-b")
        same_tables(open_run(address), local, ["square", "even_only"])
        assert flaky.failed >= 2 * flaky.burst  # two bursts at least, each past pyarrow's own ~10 attempts
        assert any("trying again" in r.getMessage() for r in caplog.records)
    finally:
        flaky.close()


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pipeline_steps import EvenOnly, Numbers, Square
(Numbers(n=100) >> Square(sleep=0.4, counter_dir={counters!r}) >> EvenOnly()).run({address!r}, progress=False)
"""


def test_a_driver_killed_mid_step_resumes_from_the_store_on_another_machine(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is on the store once committed: a driver killed (SIGKILL) mid-step and its machine gone, a new
    driver elsewhere computes only the batches that were not committed; its lease does not block the new one."""
    counters = tmp_path / "c"
    counters.mkdir()
    reference = three_steps().run(tmp_path / "ref", progress=False)
    address = uri(s3, "killed")
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), counters=str(counters), address=address))
    env = {**os.environ, "THRESHER_MIRROR_DIR": str(tmp_path / "machine-a")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.monotonic() + 120
        while sum(p.split("/")[-2:-1] == ["output"] and "/square-" in p for p in listing(address)) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "no 4 committed batches on the store"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = listing(address)
    assert ".lease.json" in stored  # the dead driver's
    done_before = count(counters, "square")
    on_machine(monkeypatch, tmp_path / "machine-b")
    resumed = three_steps(counters).run(address, progress=False)
    assert resumed.cached == ["numbers"]
    kept = resumed.steps["square"].resumed_from_row
    assert kept is not None and kept >= 40
    assert count(counters, "square") - done_before == 100 - kept  # only the rows no committed batch covered
    same_tables(resumed, reference, ["square", "even_only"])
    assert ".lease.json" not in listing(address)  # released at the end


def test_a_second_driver_is_refused_while_the_lease_is_held(s3: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from thresher.pipelines.run_store import RemoteRunDir

    address = uri(s3, "leased")
    on_machine(monkeypatch, tmp_path / "machine-a")
    with RemoteRunDir(address).lease():
        on_machine(monkeypatch, tmp_path / "machine-b")
        with pytest.raises(PipelineError, match=r"in use by .* pid"):
            three_steps().run(address, progress=False)
    assert three_steps().run(address, progress=False).executed == ["numbers", "square", "even_only"]


def test_credentials_in_the_address_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"credentials in the address \(secret_key\).*environment") as e:
        three_steps().run(f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:1&secret_key=hunter2", progress=False)
    assert "hunter2" not in str(e.value)
    with pytest.raises(PipelineError, match=r"password in the address") as e:
        three_steps().run(f"s3://key:hunter2@{BUCKET}/x", progress=False)
    assert "hunter2" not in str(e.value)


def test_cli_runs_a_recipe_on_the_store_and_writes_its_report_there(s3: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from click.testing import CliRunner

    from thresher.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: store-cli
        steps:
          load: {{step: Load, params: {{path: {DATA.resolve()}, limit: 30}}}}
          short: {{step: LengthFilter, params: {{field: instruction, max_chars: 120}}}}
    """))
    address = uri(s3, "cli")
    on_machine(monkeypatch, tmp_path / "machine-a")
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", address, "--quiet"])
    assert res.exit_code == 0, res.output
    stored = listing(address)
    assert "report.html" in stored and "manifest.json" in stored
    on_machine(monkeypatch, tmp_path / "machine-b")
    run = open_run(address)
    assert run.steps["short"].rows_in == 30 and run.steps["short"].rows_rejected > 0


# ---- the Ray runner: workers on the store ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_on_s3(s3: str) -> Iterator[str]:
    """A local Ray cluster started after the store's credentials are in the environment: its workers read them from
    theirs, as the nodes of a real cluster would (nothing secret goes through Ray)."""
    pytest.importorskip("ray")
    ray = start_test_ray()
    try:
        yield s3
    finally:
        ray.shutdown()


def test_ray_workers_commit_to_the_store_and_the_run_matches_local_disk(
    ray_on_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Load -> TextStats (row step) -> LengthFilter (row filter) -> NearDedup (vectors by actors, k-means clusters
    searched by tasks) with the run directory on the store: the local runner's tables on local disk; the workers'
    files are on the store; another machine finds every step finished."""

    def recipe(runner: str) -> Pipeline:
        text = f"""
        name: ray-on-the-store
        runner: {runner}
        ray: {{actors: 1}}
        steps:
          load: {{step: Load, params: {{path: {DATA.resolve()}, limit: 240}}}}
          stats: {{step: TextStats, params: {{batch_size: 60}}}}
          short: {{step: LengthFilter, params: {{field: instruction, max_chars: 180, batch_size: 50}}}}
          dedup: {{step: NearDedup, params: {{threshold: 0.6, shards: 2}}}}
        """
        return Pipeline.from_yaml(textwrap.dedent(text))

    steps = ["stats", "short", "dedup"]
    local = recipe("local").run(tmp_path / "local", progress=False)
    address = uri(ray_on_s3, "ray")
    on_machine(monkeypatch, tmp_path / "driver")
    on_ray = recipe("ray").run(address, progress=False)
    same_tables(on_ray, local, steps)
    assert local.rejected("short").num_rows > 0 and local.rejected("dedup").num_rows > 0
    assert on_ray.metrics("dedup")["cluster_search"] == "ray_tasks" and on_ray.metrics("dedup")["pairs"] > 0
    stored = listing(address)
    for s in steps:  # row steps and the vectors were made by actors, which wrote to the store
        d = on_ray.steps[s].dir
        assert any(p.startswith(f"{d}/_workers/") for p in stored), s
        assert f"{d}/_done.json" in stored
    assert f"{on_ray.steps['dedup'].dir}/vectors.npy" in stored
    assert not any(p.startswith(f"{on_ray.steps['dedup'].dir}/_vectors/") for p in stored)  # gathered, then gone

    on_machine(monkeypatch, tmp_path / "another")
    again = recipe("ray").run(address, progress=False)
    assert again.cached == ["load", *steps]
    same_tables(again, local, steps)


def test_evol_instruct_rounds_on_the_cluster_read_and_write_the_store(
    ray_on_s3: str, fault: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EvolInstruct's rounds made by actors that read the round before from the store (the driver uploads each
    committed batch): the same rows and requests as a local run on local disk."""
    from test_generators_evol_instruct import evolved_locally_and_on_ray

    on_machine(monkeypatch, tmp_path / "driver")
    local, on_ray = evolved_locally_and_on_ray(fault, tmp_path, uri(ray_on_s3, "evol"))
    assert on_ray.steps["evol"].rows_out == local.steps["evol"].rows_out > 0
    assert any("/_workers/" in p for p in listing(uri(ray_on_s3, "evol")))


def test_a_worker_killed_mid_step_on_the_store_loses_no_row(ray_on_s3: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The one actor of a row step, found by the process id it put on the store, is killed (SIGKILL) after it
    committed 3 batches there: Ray starts another, which takes over; every row is in the output once."""
    import json
    import threading

    counters = tmp_path / "c"
    counters.mkdir()
    reference = (Numbers(n=200) >> Square()).run(tmp_path / "ref", progress=False)
    pipe = Numbers(n=200) >> Square(sleep=0.25, counter_dir=str(counters))
    pipe.ray_options = {"actors": 1}
    address = uri(ray_on_s3, "worker-killed")
    on_machine(monkeypatch, tmp_path / "driver")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(run=pipe.run(address, progress=False, runner="ray")),
                              daemon=True)  # fmt: skip
    thread.start()
    fs, base = pafs.FileSystem.from_uri(address)

    def square_files(folder: str) -> list[str]:
        return [p for p in listing(address) if "/square-" in p and f"/{folder}/" in p]

    deadline = time.monotonic() + 180
    while len(square_files("output")) < 3:
        assert thread.is_alive() and time.monotonic() < deadline, "no 3 committed batches on the store"
        time.sleep(0.1)
    (worker,) = square_files("_workers")
    with fs.open_input_stream(f"{base}/{worker}") as f:
        os.kill(json.loads(f.read())["pid"], signal.SIGKILL)
    thread.join(300)
    assert "run" in result, "the run did not finish"
    run = result["run"]
    assert len(square_files("_workers")) >= 2  # Ray started another actor, which took over
    assert run.table("square").sort_by("id").equals(reference.table("square").sort_by("id"))
    assert count(counters, "square") >= 200  # every row computed at least once; the killed batch again
