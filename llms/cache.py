"""The request cache: every LLM, embedding and log-probability answer is kept in SQLite, so nothing is paid twice.

How: a request's key is a hash of (backend, model, what was asked — messages or text —, the sampling parameters
and the sample index); its answer is stored under that key. Before a call, a backend looks all its keys up at once
and sends only the misses. Answers are written by one background writer thread per process: it takes everything
queued since its last commit and writes it in one short transaction (group commit), so a burst of answers costs one
commit, not one each. Async callers await their answer's commit before the request's concurrency slot is freed,
which bounds what a `kill -9` can lose to the requests in flight at that moment.

Why SQLite in WAL mode: readers never block the writer and vice versa, several processes (pipeline workers, Ray
actors on one host) can share one file with `busy_timeout` arbitrating writers, and `synchronous=NORMAL` makes a
commit survive a crash of the process (not of the machine) without an fsync per commit.

Where: `cache=True` uses `$THRESHER_CACHE` (a file) or `$THRESHER_CACHE_DIR/requests.sqlite` or
`~/.cache/thresher/requests.sqlite`; a path uses that file; `cache=False` or `THRESHER_NO_CACHE=1` disables it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    value BLOB NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""
_LOOKUP_CHUNK = 500  # keys per SELECT ... IN (...): well under SQLite's variable limit


def request_key(*parts: Any) -> str:
    """Stable hex key of JSON-able request parts (dict keys sorted, floats as written by json).

    Numbers are keyed as JSON means them, which is how a server reads them: an integral float is its int
    (`temperature=1.0` and `1` are one request; `-0.0` is `0`), bools stay apart from ints. Only integral floats are
    rewritten, so the key of a request without one is what it always was.

    A part that is not plain JSON data is an error, never a `str()` of it: a key that changed from run to run would
    silently pay for every request again.
    """
    try:
        blob = json.dumps(_json_numbers(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"request cache: a request part is not plain JSON data, so it has no stable key: {e}") from e
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def _json_numbers(v: Any) -> Any:
    """`v` with every integral float turned into its int (bools are not floats, so they stay as they are)."""
    # exact type checks first: this runs on every request, and message text is most of what it walks
    t = type(v)
    if t is str or t is int or v is None or t is bool:
        return v
    if t is dict or isinstance(v, dict):
        return {k: x if type(x) is str else _json_numbers(x) for k, x in v.items()}
    if t is list or t is tuple or isinstance(v, (list, tuple)):
        return [x if type(x) is str else _json_numbers(x) for x in v]
    if isinstance(v, float):
        return int(v) if v.is_integer() else v  # nan and inf are not integral: json writes them as before
    return v


def cache_disabled_by_env() -> bool:
    return os.environ.get("THRESHER_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no")


def default_cache_path() -> Path:
    if os.environ.get("THRESHER_CACHE"):
        return Path(os.environ["THRESHER_CACHE"]).expanduser()
    if os.environ.get("THRESHER_CACHE_DIR"):
        return Path(os.environ["THRESHER_CACHE_DIR"]).expanduser() / "requests.sqlite"
    from thresher.paths import user_cache_dir

    return user_cache_dir() / "requests.sqlite"


@dataclass
class CacheStats:
    """Hits and misses seen by this process; rows and bytes of the whole file."""

    path: str
    hits: int
    misses: int
    writes: int
    rows: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Batch:
    """Answers queued together; the writer commits them in one transaction and then wakes their waiters."""

    __slots__ = ("error", "event", "rows", "waiters")

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bytes, float]] = []
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.event = threading.Event()
        self.error: BaseException | None = None


class RequestCache:
    """A SQLite file of answers keyed by request hash; safe across threads and processes.

    Use `RequestCache.open(path)` to share one instance (and one writer thread) per file within a process.
    """

    _instances: dict[tuple[str, int], RequestCache] = {}
    _instances_lock = threading.Lock()

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._local = threading.local()
        self._queue: queue.SimpleQueue[tuple[str, str, str, bytes, Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = self._connect()
            con.execute(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"request cache {self.path}: cannot open it as SQLite: {e}") from e

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> RequestCache:
        """The process-wide instance for `path` (default location when None)."""
        p = Path(path).expanduser() if path is not None else default_cache_path()
        key = (str(p.resolve()), os.getpid())
        with cls._instances_lock:
            inst = cls._instances.get(key)
            if inst is None or inst._closed:
                inst = cls(p)
                cls._instances[key] = inst
            return inst

    def __repr__(self) -> str:
        return f"RequestCache({str(self.path)!r})"

    # ---- connections ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: SQLite connections must not cross processes)."""
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            return con
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=60000")
        self._local.con, self._local.pid = con, os.getpid()
        return con

    # ---- reads ----------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The stored answers among `keys` (missing keys are absent from the result)."""
        if not keys:
            return {}
        con = self._connect()
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[i : i + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for k, v in con.execute(f"SELECT key, value FROM responses WHERE key IN ({marks})", chunk):
                found[k] = bytes(v)
        hits = sum(1 for k in keys if k in found)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    # ---- writes ---------------------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
            return
        with self._lock:
            if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
                return
            if self._writer_pid != os.getpid():
                self._queue = queue.SimpleQueue()  # a forked child must not drain its parent's queue
            self._writer = threading.Thread(
                target=self._write_loop, name=f"thresher-cache-writer:{self.path.name}", daemon=True
            )
            self._writer_pid = os.getpid()
            self._writer.start()
            atexit.register(self.flush)

    def put(self, key: str, value: bytes, *, kind: str, model: str) -> None:
        """Queue an answer; it is committed within one writer round trip (see `flush`)."""
        if self._closed:
            raise BackendError(f"request cache {self.path} is closed")
        self._ensure_writer()
        self._queue.put((key, kind, model, value, None))

    async def aput(self, key: str, value: bytes, *, kind: str, model: str) -> None:
        """Queue an answer and wait until it is committed."""
        if self._closed:
            raise BackendError(f"request cache {self.path} is closed")
        self._ensure_writer()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((key, kind, model, value, (loop, fut)))
        await fut

    def put_many(self, items: Iterable[tuple[str, bytes]], *, kind: str, model: str) -> None:
        for k, v in items:
            self.put(k, v, kind=kind, model=model)

    def flush(self, timeout: float | None = 120.0) -> None:
        """Block until everything queued so far is committed."""
        if self._writer is None or self._writer_pid != os.getpid() or not self._writer.is_alive():
            return
        done = threading.Event()
        self._queue.put(("", "", "", b"", done))
        if not done.wait(timeout):
            raise BackendError(f"request cache {self.path}: writes not committed after {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise BackendError(f"request cache {self.path}: a write failed: {error}") from error

    def _write_loop(self) -> None:
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=60000")
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                break
            items = [item]
            stop = False
            while len(items) < 4096:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            now = time.time()
            rows = [(k, kind, model, v, now) for k, kind, model, v, _ in items if k]
            error: BaseException | None = None
            if rows:
                for attempt in range(20):
                    try:
                        con.execute("BEGIN IMMEDIATE")
                        con.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", rows)
                        con.execute("COMMIT")
                        self.writes += len(rows)
                        error = None
                        break
                    except sqlite3.OperationalError as e:  # "database is locked" beyond busy_timeout
                        error = e
                        if con.in_transaction:
                            con.execute("ROLLBACK")
                        time.sleep(min(2.0, 0.05 * 2**attempt))
                    except sqlite3.Error as e:
                        error = e
                        if con.in_transaction:
                            con.execute("ROLLBACK")
                        break
            if error is not None:
                self._error = error
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for *_, w in items:
                if isinstance(w, threading.Event):
                    w.set()
                elif w is not None:
                    by_loop.setdefault(w[0], []).append(w[1])
            for loop, futs in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop closed while we wrote
                    loop.call_soon_threadsafe(_settle, futs, error)
            if stop:
                break
        con.close()

    # ---- maintenance ----------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        self.flush()
        con = self._connect()
        rows = con.execute("SELECT count(*) FROM responses").fetchone()[0]
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return CacheStats(str(self.path), self.hits, self.misses, self.writes, rows, size)

    def by_model(self) -> list[dict[str, Any]]:
        """Rows and bytes per (kind, model)."""
        self.flush()
        cur = self._connect().execute(
            "SELECT kind, model, count(*), sum(length(value)) FROM responses GROUP BY kind, model ORDER BY 3 DESC"
        )
        return [{"kind": k, "model": m, "rows": n, "bytes": b} for k, m, n, b in cur]

    def clear(self, *, model: str | None = None, kind: str | None = None) -> int:
        """Delete stored answers (all, or those of one model / kind). Returns how many."""
        self.flush()
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        sql = "DELETE FROM responses" + (" WHERE " + " AND ".join(where) if where else "")
        cur = self._connect().execute(sql, args)
        return cur.rowcount

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self._writer is not None and self._writer_pid == os.getpid():
            self._queue.put(None)
            self._writer.join(10)
        self._closed = True
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
            self._local.con = None


def _settle(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for f in futs:
        if f.done():
            continue
        if error is None:
            f.set_result(None)
        else:
            f.set_exception(BackendError(f"request cache write failed: {error}"))


def resolve_cache(cache: bool | str | os.PathLike[str] | RequestCache | None) -> RequestCache | None:
    """The cache a backend should use for its `cache` argument (None when disabled)."""
    if isinstance(cache, RequestCache):
        return cache
    if cache is False or cache_disabled_by_env():
        return None
    if cache is True or cache is None:
        return RequestCache.open()
    if isinstance(cache, (str, os.PathLike)):
        return RequestCache.open(cache)
    raise ConfigError(f"cache must be True, False, a path or a RequestCache; got {type(cache).__name__}")
