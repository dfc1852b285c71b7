"""The SQLite request cache: round trips, durability of awaited writes, threads and processes, switches, stats."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sqlite3
import threading
from pathlib import Path

import pytest

from thresher.llms.cache import RequestCache, cache_disabled_by_env, default_cache_path, request_key, resolve_cache


def test_put_get_and_stats(tmp_path: Path) -> None:
    c = RequestCache(tmp_path / "c.sqlite")
    c.put("k1", b"v1", kind="chat", model="m")
    c.put("k2", b"v2", kind="embedding", model="e")
    c.flush()
    assert c.get("k1") == b"v1"
    assert c.get_many(["k1", "k2", "nope"]) == {"k1": b"v1", "k2": b"v2"}
    st = c.stats()
    assert (st.hits, st.misses, st.writes, st.rows) == (3, 1, 2, 2)
    assert st.bytes > 0
    assert {(r["kind"], r["model"]) for r in c.by_model()} == {("chat", "m"), ("embedding", "e")}
    assert c.clear(kind="embedding") == 1
    assert c.get("k2") is None
    c.close()


def test_awaited_put_is_committed_for_other_connections(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    c = RequestCache(path)

    async def go() -> None:
        await c.aput("k", b"answer", kind="chat", model="m")
        # the writer committed before aput returned: a fresh connection (another process) sees it
        other = sqlite3.connect(path)
        assert other.execute("SELECT value FROM responses WHERE key='k'").fetchone()[0] == b"answer"
        other.close()

    asyncio.run(go())
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _worker(path: str, start: int, count: int) -> None:
    c = RequestCache(path)
    for i in range(start, start + count):
        c.put(f"key{i}", f"value{i}".encode(), kind="chat", model=f"proc{start}")
    c.get_many([f"key{i}" for i in range(start, start + count)])
    c.close()


def test_threads_and_processes_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    shared = RequestCache.open(path)
    assert RequestCache.open(path) is shared
    threads = [
        threading.Thread(target=lambda s=s: [shared.put(f"t{s}-{i}", b"x", kind="chat", model="t") for i in range(200)])
        for s in range(6)
    ]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(path, s * 150, 300)) for s in range(4)]  # overlapping key ranges
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    shared.flush()
    keys = [f"t{s}-{i}" for s in range(6) for i in range(200)] + [f"key{i}" for i in range(750)]
    found = shared.get_many(keys)
    assert len(found) == len(keys)
    assert found["key10"] == b"value10"


def test_disable_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THRESHER_NO_CACHE", raising=False)
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "env.sqlite"))
    assert default_cache_path() == tmp_path / "env.sqlite"
    assert resolve_cache(False) is None
    assert resolve_cache(True) is not None and resolve_cache(True).path == tmp_path / "env.sqlite"  # type: ignore[union-attr]
    assert resolve_cache(tmp_path / "x.sqlite").path == tmp_path / "x.sqlite"  # type: ignore[union-attr]
    monkeypatch.setenv("THRESHER_NO_CACHE", "1")
    assert cache_disabled_by_env()
    assert resolve_cache(True) is None


def test_request_key_is_stable_and_sensitive() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    k = request_key("chat", {"kind": "openai", "model": "m"}, msgs, {"temperature": 0.5, "max_tokens": 4})
    assert k == request_key("chat", {"model": "m", "kind": "openai"}, msgs, {"max_tokens": 4, "temperature": 0.5})
    assert k != request_key("chat", {"kind": "openai", "model": "m"}, msgs, {"temperature": 0.6, "max_tokens": 4})
    assert k != request_key("chat", {"kind": "openai", "model": "m2"}, msgs, {"temperature": 0.5, "max_tokens": 4})


def test_importing_the_backends_loads_no_model_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, thresher.llms, thresher.generators; "
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'sentence_transformers', 'openai', "
        "'httpx', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
