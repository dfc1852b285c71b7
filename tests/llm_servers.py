"""Fixtures for backend tests: real servers on 127.0.0.1 and the converted transformers model.

- `fault_server` (session) / `fault` (per test: stats reset, faults cleared): the fault-injecting OpenAI-compatible
  server of `thresher.llms.testing`, in its own process.
- `llama_server` (session): `thresher serve`, the OpenAI-compatible server that decodes the bundled SmolLM2 GGUF in
  batches (llama.cpp through `LlamaCpp`'s batched decoder).
- `smol_hf_dir` (session): the bundled GGUF converted once to a transformers directory (kept under
  ~/.cache/thresher, so only the first session on a machine pays the 20-40 s conversion).
- `isolated_cache` (autouse where imported): every test gets its own request-cache file.
- `kill_9_when` / `kill_9_and_rerun`: the SIGKILL-and-resume protocol of the generator tests.

`tests/conftest.py` registers this module as a plugin (`pytest_plugins`), so every test module has these fixtures
and the session ones are made once per test session, not once per module. Helpers (`kill_9_when`,
`kill_9_and_rerun`, `free_port`) are imported by name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from thresher.llms.testing import FaultConfig, FaultServer

__all__ = ["fault", "fault_server", "free_port", "isolated_cache", "kill_9_and_rerun", "kill_9_when",
           "llama_server", "smol_hf_dir"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def fault(fault_server: FaultServer) -> FaultServer:
    """The session's fault server with default settings and zeroed counters."""
    defaults = FaultConfig()
    fault_server.configure(**{k: getattr(defaults, k) for k in defaults.__dataclass_fields__})
    fault_server.reset()
    return fault_server


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "requests.sqlite"
    monkeypatch.setenv("THRESHER_CACHE", str(path))
    monkeypatch.delenv("THRESHER_NO_CACHE", raising=False)
    return path


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """base_url of `thresher serve` running the bundled model, 8 sequences decoded together."""
    pytest.importorskip("llama_cpp")
    from thresher.llms.bundled import smollm2_gguf
    from thresher.llms.native_probe import ensure_llama_cpp_runs

    # a llama.cpp build this CPU cannot run fails here with the rebuild command, not as a server that exits 132
    ensure_llama_cpp_runs(smollm2_gguf())
    port = free_port()
    cmd = [
        sys.executable, "-m", "thresher.llms.serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--n-ctx", "2048", "--n-parallel", "8",
        # threads: the default, chosen while decoding (cpu_threads.ThreadTuner). A fixed 1 kept llama.cpp's spinning
        # threads from crawling when the tests' own work shared the 2 cores, but left the second core idle
        # otherwise: the server-backed tests ran 266 s at 1 thread, 174 s tuned
    ]  # fmt: skip
    # the server's log goes to a file: llama.cpp's load report alone would fill a pipe and block the server
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"thresher serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("thresher serve did not answer /v1/models within 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def smol_hf_dir() -> Path:
    """The bundled SmolLM2 GGUF as a transformers directory (converted once per machine)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from thresher.llms.bundled import smollm2_gguf
    from thresher.llms.hf import hf_dir_for_gguf

    return hf_dir_for_gguf(smollm2_gguf())


def kill_9_when(proc: subprocess.Popen[bytes], server: FaultServer, requests: int, timeout: float = 120.0) -> int:
    """SIGKILL `proc` once `server` has seen `requests` requests (answered or in flight); returns how many it saw."""
    import signal

    deadline = time.monotonic() + timeout
    while server.stats()["total"] < requests:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, f"the server saw fewer than {requests} requests in {timeout} s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(server.stats()["total"])


@dataclass(frozen=True)
class KillRun:
    """Requests the server saw: in a whole run (`total`), before the kill (`first`), in the rerun (`second`)."""

    total: int
    first: int
    committed: int  # output batches the killed run had committed
    second: int

    @property
    def resent(self) -> int:
        return self.first + self.second - self.total


def kill_9_and_rerun(
    server: FaultServer, script: Path, work: Path, cache: Path, step: str, *, args: Sequence[str] = (),
    inputs: Sequence[str] = (),
) -> KillRun:
    """Run `python script BASE_URL DIR *args` unbroken in `work/ref` (with a request cache of its own), then in `work`:
    SIGKILL once the server has seen half the requests of the whole run, and run it again to the end. `inputs` are
    files in `work` the script reads, copied for the reference run; `step` names the step whose committed batches
    are counted. Compare `open_run(work / "run")` with `open_run(work / "ref" / "run")` afterwards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ref = work / "ref"
    ref.mkdir()
    for name in inputs:
        (ref / name).write_bytes((work / name).read_bytes())
    subprocess.run([sys.executable, str(script), server.base_url, str(ref), *args], check=True, timeout=300,
                   env={**env, "THRESHER_CACHE": str(work / "ref-cache.sqlite")})  # fmt: skip
    total = int(server.stats()["total"])  # every request of a whole run, each asked once
    server.reset()
    env["THRESHER_CACHE"] = str(cache)
    cmd = [sys.executable, str(script), server.base_url, str(work), *args]
    first = kill_9_when(subprocess.Popen(cmd, env=env), server, total // 2)
    assert first < total
    committed = len(list(next((work / "run" / "steps").glob(f"{step}-*")).glob("output/part-*.parquet")))
    server.reset()
    subprocess.run(cmd, env=env, check=True, timeout=300)
    run = KillRun(total, first, committed, int(server.stats()["total"]))
    print(f"{total} requests in a whole run; kill -9 after {first} ({committed} batches committed); the rerun sent "
          f"{run.second}; re-sent {run.resent}")
    return run
