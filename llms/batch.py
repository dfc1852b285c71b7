"""`OpenAIBatch`: the OpenAI-compatible backend in Batch API mode (half the price, hours instead of seconds), and the
same requests written for `vllm run-batch` (`batch: vllm-file`) to be answered on a GPU box.

How a call runs. The backend is `OpenAICompatible` with one change: where a request would leave for the server
(`_send`), it is queued instead. A call first runs in *collecting* mode: cache hits are answered as always, every miss
is queued under its request-cache keys (its `custom_id` is the first sample's key) and its prompt gets a placeholder
error. The queued requests are written as Batch API JSONL (one line each; files split to `batch_max_requests` lines
and `batch_max_bytes` bytes), uploaded (`POST /files`), submitted (`POST /batches`, completion window 24h) and polled
with backoff; the answers go into the request cache. The call then runs again, and repeats while it queues new
requests (a structured-output re-ask is asked only after the answer it corrects is there), and finally runs for real:
every answer is a cache hit. A step run by the pipeline runner does this for its whole input at once
(`thresher.pipelines.batch_phase`), so a 10,000-row Respond is one batch job (per stage), not one per row batch.

Restarts. Every job is written to a ledger in the run directory (`<step dir>/batches/ledger.jsonl`, appended and
fsynced): its uploaded file and request keys *before* the job is created, its id the moment it is. A re-run reads
the ledger: keys in a live job are waited for, never sent again (a job created just before a kill, whose id was not
written, is found by its input file); only keys in no job are submitted. Finished jobs are recorded with their
failed keys and cost. `thresher batches RUN_DIR` lists the jobs (status, counts, cost), `--cancel` cancels them.

Failures. A line that failed inside a job (an error line, an expired or cancelled job, a job that failed validation)
fails its row with the reason (`on_batch_error: fail`), or is sent online at once (`on_batch_error: online`).
Costs are counted at `batch_prices` (default: half of `prices`, the Batch API's discount).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from thresher.errors import BackendError, BatchPending, BudgetExceeded, ConfigError
from thresher.llms import budget
from thresher.llms.base import Usage
from thresher.llms.cache import resolve_cache
from thresher.llms.http import Transport, dumps, loads
from thresher.llms.limits import RETRYABLE_STATUS, RetryPolicy, retry_after_seconds
from thresher.llms.openai_compat import OpenAICompatible, _error_message, _Failed

log = logging.getLogger("thresher.llms.batch")

MODES = ("openai", "vllm-file")
ON_ERROR = ("fail", "online")
MAX_REQUESTS = 50_000  # the Batch API's limits per input file
MAX_BYTES = 200 * 1024 * 1024
FINAL = ("completed", "expired", "cancelled", "failed")
LEDGER = "ledger.jsonl"
PENDING = "queued for the Batch API (collecting)"
MAX_STAGES = 50  # collecting passes that queue requests, each waiting for the answers of the one before
_COLLECTOR: contextvars.ContextVar[Collector | None] = contextvars.ContextVar("thresher_batch_collector", default=None)


@dataclass
class Line:
    """One queued request: its endpoint, the body the server would get, the cache keys of its samples."""

    path: str
    body: dict[str, Any]
    keys: list[str]


@dataclass
class Collector:
    """The requests a collecting run queued, by custom_id (a request asked twice is queued once)."""

    pending: dict[str, Line] = field(default_factory=dict)

    def add(self, path: str, body: dict[str, Any], keys: list[str]) -> None:
        self.pending.setdefault(keys[0], Line(path, body, list(keys)))


# ---- the ledger -----------------------------------------------------------------------------------


@dataclass
class BatchRecord:
    """One batch job as the ledger knows it."""

    file_id: str
    endpoint: str
    requests: dict[str, list[str]]  # custom_id -> the cache keys of its samples
    mode: str = "openai"
    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    lines: int = 0
    bytes: int = 0
    batch_id: str | None = None
    status: str = "submitting"
    counts: dict[str, int] = field(default_factory=dict)
    collected: bool = False
    abandoned: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # key -> why
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    created_at: float = 0.0
    output: str | None = None  # vllm-file: where the output file is expected

    def all_keys(self) -> Iterator[str]:
        for ks in self.requests.values():
            yield from ks


class Ledger:
    """The batch jobs of one step, replayed from an append-only JSONL file (or kept in memory without a run dir).

    Each event is one line, flushed and fsynced before the call that depends on it goes on; a torn last line (a kill
    while writing) is skipped on reading."""

    _open: ClassVar[dict[tuple[str, int], Ledger]] = {}
    _open_lock = threading.Lock()

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.RLock()  # held while a job is submitted or collected
        self.records: dict[str, BatchRecord] = {}  # by file_id
        self.failed_: dict[str, str] = {}  # key -> why, over every collected job (asked once per request)
        if path is not None and path.is_file():
            for raw in path.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                self._apply(event)

    @classmethod
    def open(cls, path: Path | None) -> Ledger:
        """The process's one instance for `path` (every backend of a step sees the jobs of the others at once);
        without a path, a new ledger in memory."""
        if path is None:
            return cls(None)
        key = (str(Path(path).resolve()), os.getpid())
        with cls._open_lock:
            if key not in cls._open:
                cls._open[key] = cls(path)
            return cls._open[key]

    def _apply(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind == "submitting":
            fields_ = {k: v for k, v in e.items() if k in BatchRecord.__dataclass_fields__}
            self.records[e["file_id"]] = BatchRecord(**fields_)
            return
        rec = self.records.get(e.get("file_id", ""))
        if rec is None:
            return
        if kind == "created":
            rec.batch_id, rec.status, rec.created_at = e["batch_id"], e.get("status", "validating"), e.get("time", 0.0)
            rec.output = e.get("output")
        elif kind == "status":
            rec.status, rec.counts = e["status"], dict(e.get("counts") or {})
        elif kind == "collected":
            rec.collected, rec.status = True, e["status"]
            rec.counts = dict(e.get("counts") or rec.counts)
            rec.failed = dict(e.get("failed") or {})
            rec.prompt_tokens, rec.completion_tokens = int(e.get("prompt_tokens", 0)), int(e.get("completion_tokens", 0))
            rec.cost_usd = float(e.get("cost_usd", 0.0))
            self.failed_.update(rec.failed)
        elif kind == "abandoned":
            rec.abandoned = True

    def write(self, event: dict[str, Any]) -> None:
        event = {**event, "time": event.get("time", time.time())}
        with self.lock:
            self._apply(event)
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def live(self) -> list[BatchRecord]:
        """Jobs submitted and not collected yet."""
        return [r for r in self.records.values() if r.batch_id and not r.collected and not r.abandoned]

    def orphans(self) -> list[BatchRecord]:
        """Uploads whose job creation was not recorded (a kill in between): the job may exist or not."""
        return [r for r in self.records.values() if r.batch_id is None and not r.abandoned]

    def failed(self) -> dict[str, str]:
        """Why each request that failed inside a collected job failed, by cache key."""
        return self.failed_


def ledgers(run_dir: str | os.PathLike[str]) -> list[tuple[str, Ledger]]:
    """(step folder name, its ledger) for every step of a run that sent batch jobs."""
    root = Path(run_dir)
    found = sorted(root.glob(f"steps/*/batches/{LEDGER}"))
    return [(p.parent.parent.name, Ledger(p)) for p in found]


# ---- HTTP for files and batches -------------------------------------------------------------------


class BatchApi:
    """The few calls of the Files and Batches endpoints, synchronous (a job makes a handful of them), with retries."""

    def __init__(self, base_url: str, api_key: str | None, headers: Mapping[str, str] | None, policy: RetryPolicy,
                 timeout: float) -> None:  # fmt: skip
        self.base_url, self.policy, self.timeout = base_url.rstrip("/"), policy, timeout
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.calls = 0

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> bytes:
        url = self.base_url + path
        attempt = 0
        while True:
            req = urllib.request.Request(url, data=body, method=method, headers={**self.headers, "Content-Type": content_type})
            self.calls += 1
            retry_after: float | None = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    data: bytes = r.read()
                    return data
            except urllib.error.HTTPError as e:
                content = e.read()
                if e.code not in RETRYABLE_STATUS:
                    raise BackendError(f"{method} {url}: HTTP {e.code}: {_error_message(content)}") from None
                problem = f"HTTP {e.code}: {_error_message(content)}"
                retry_after = retry_after_seconds({k.lower(): v for k, v in e.headers.items()})
            except (urllib.error.URLError, OSError) as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt >= self.policy.max_retries:
                raise BackendError(f"{method} {url}: {problem} (gave up after {attempt + 1} attempts)")
            time.sleep(self.policy.delay(attempt, retry_after))
            attempt += 1

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        raw = self.call(method, path, json.dumps(body).encode() if body is not None else None)
        out = json.loads(raw)
        if not isinstance(out, dict):
            raise BackendError(f"{method} {self.base_url}{path}: expected a JSON object, got {raw[:100]!r}")
        return out

    def upload(self, name: str, content: bytes) -> dict[str, Any]:
        """`POST /files` (multipart: purpose=batch and the file)."""
        boundary = f"thresher-{uuid.uuid4().hex}"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n".encode(),
            content,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
        raw = self.call("POST", "/files", b"".join(parts), f"multipart/form-data; boundary={boundary}")
        out: dict[str, Any] = json.loads(raw)
        return out


# ---- the backend ----------------------------------------------------------------------------------


def split_lines(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Consecutive groups of JSONL lines, each at most `max_requests` lines and `max_bytes` bytes."""
    files: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            raise ConfigError(f"Batch API: one request is {len(line)} bytes, over batch_max_bytes={max_bytes}")
        if cur and (len(cur) >= max_requests or size + len(line) > max_bytes):
            files.append(cur)
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        files.append(cur)
    return files


def _records(body: Mapping[str, Any], kind: str, keys: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(cache records by key, why none) from one answered line's response body."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return {}, f"the answer has no choices: {str(body)[:200]}"
    ordered = sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index", 0))
    out: dict[str, dict[str, Any]] = {}
    for key, c in zip(keys, ordered, strict=False):
        text = (c.get("message") or {}).get("content") if kind == "chat" else c.get("text")
        if text is None:
            return out, f"choice {c.get('index')} has no text (finish_reason={c.get('finish_reason')!r})"
        rec: dict[str, Any] = {"text": text, "finish_reason": c.get("finish_reason")}
        lp = c.get("logprobs")
        if lp is not None:
            rec["logprobs"] = lp.get("content", lp) if isinstance(lp, dict) else lp
        out[key] = rec
    return out, None


class OpenAIBatch(OpenAICompatible):
    """`OpenAICompatible` that sends its requests as Batch API jobs (see the module docstring).

    Takes every parameter of `OpenAICompatible`, and:
    - batch: True or "openai" (the Batch API of the server at base_url), or "vllm-file" (JSONL files for
      `vllm run-batch`: the run stops with `BatchPending` until the output file is put beside the input file).
    - on_batch_error: "fail" (a request that failed inside a job fails its row, with the reason) or "online" (it is
      sent online at once, at the online price).
    - batch_prices: USD per 1M tokens in batch mode (default: half of `prices`).
    - batch_poll_interval / batch_poll_max: seconds before the first status poll, growing 1.5x per poll up to the max.
    - batch_max_requests / batch_max_bytes: the limits of one input file (the Batch API's: 50,000 and 200 MB).
    - batch_dir: where the ledger and the vllm-file JSONL go (default: the step's folder in the run directory).
    Its identity is the online backend's, so both share fingerprints and request-cache answers.
    """

    def __init__(
        self,
        *,
        batch: bool | str = True,
        on_batch_error: str = "fail",
        batch_prices: Mapping[str, float] | None = None,
        batch_poll_interval: float = 10.0,
        batch_poll_max: float = 300.0,
        batch_max_requests: int = MAX_REQUESTS,
        batch_max_bytes: int = MAX_BYTES,
        batch_dir: str | os.PathLike[str] | None = None,
        **online: Any,
    ) -> None:
        self.batch = batch
        self.on_batch_error = on_batch_error
        self.batch_prices = batch_prices
        self.batch_poll_interval = batch_poll_interval
        self.batch_poll_max = batch_poll_max
        self.batch_max_requests = batch_max_requests
        self.batch_max_bytes = batch_max_bytes
        self.batch_dir = batch_dir
        self.workdir_: Path | None = None
        self.collector_: Collector | None = None
        self.ledger_: Ledger | None = None
        self.api_: BatchApi | None = None
        super().__init__(**online)

    # ---- configuration --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "openai" if self.batch is True else str(self.batch)

    def check(self) -> None:
        super().check()
        if self.batch is False or self.mode not in MODES:
            raise ConfigError(f"OpenAIBatch: batch must be true or one of {list(MODES)}, got {self.batch!r}")
        if self.on_batch_error not in ON_ERROR:
            raise ConfigError(f"OpenAIBatch: on_batch_error must be one of {list(ON_ERROR)}, got {self.on_batch_error!r}")
        if self.batch_prices is not None and set(self.batch_prices) - {"prompt", "completion"}:
            raise ConfigError(f"OpenAIBatch: batch_prices keys must be 'prompt' and 'completion', got {sorted(self.batch_prices)}")
        for name in ("batch_poll_interval", "batch_poll_max"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"OpenAIBatch: {name} must be a positive number of seconds, got {getattr(self, name)!r}")
        for name, low in (("batch_max_requests", 1), ("batch_max_bytes", 1024)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"OpenAIBatch: {name} must be an integer >= {low}, got {v!r}")

    def request_prices(self) -> dict[str, float] | None:
        """What one answered request is charged per 1M tokens: the batch prices."""
        if self.batch_prices is not None:
            return {k: float(v) for k, v in self.batch_prices.items()}
        if self.prices:
            return {k: float(v) / 2 for k, v in self.prices.items()}
        return None

    def __repr__(self) -> str:
        return f"OpenAIBatch(model={self.model!r}, base_url={self.resolved_base_url!r}, batch={self.batch!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(collector_=None, ledger_=None, api_=None)
        return state

    def load(self) -> OpenAIBatch:
        super().load()
        if resolve_cache(self.cache) is None:  # (not self._cache: another thread may be inside load() right now)
            raise ConfigError(
                "OpenAIBatch: batch mode needs the request cache (the answers of a job come back through it); "
                "drop cache=False / --no-cache / THRESHER_NO_CACHE, or use the online backend"
            )
        return self

    def attach_workdir(self, path: str | os.PathLike[str] | None) -> None:
        """Keep the ledger (and vllm-file JSONL) in `path`/batches: the step's folder of a run (ModelStep.load)."""
        self.workdir_ = Path(path) if path is not None else None
        self.ledger_ = None

    def folder(self) -> Path | None:
        if self.batch_dir is not None:
            return Path(self.batch_dir)
        return self.workdir_ / "batches" if self.workdir_ is not None else None

    def ledger(self) -> Ledger:
        if self.ledger_ is None:
            folder = self.folder()
            self.ledger_ = Ledger.open(folder / LEDGER if folder is not None else None)
        return self.ledger_

    def api(self) -> BatchApi:
        if self.api_ is None:
            policy = RetryPolicy(self.max_retries, self.retry_base_delay, self.retry_max_delay)
            self.api_ = BatchApi(self.resolved_base_url, self._api_key(), self.headers, policy, self.timeout)
        return self.api_

    # ---- where requests go ----------------------------------------------------------------------

    async def _generate(self, chats: Any, prompts: Any, params: dict[str, Any]) -> list[Any]:
        if self.collector_ is not None:  # a collecting pass over a whole step (thresher.pipelines.batch_phase)
            token = _COLLECTOR.set(self.collector_)
            try:
                return await super()._generate(chats, prompts, params)
            finally:
                _COLLECTOR.reset(token)
        for _ in range(MAX_STAGES):  # on its own, one call: queue what is missing, wait for its jobs, until none is
            col = Collector()
            token = _COLLECTOR.set(col)
            before = self.usage.copy()
            try:
                await super()._generate(chats, prompts, {**params, "progress": False})
            finally:
                _COLLECTOR.reset(token)
                restore_usage(self.usage, before)
            if not col.pending:
                return await super()._generate(chats, prompts, params)
            await self.submit_and_wait(col)
        raise too_many_stages(self)

    async def _send(self, transport: Transport, path: str, body: dict[str, Any], est: int, keys: list[str]) -> dict[str, Any]:
        why = self.ledger().failed().get(keys[0])
        if why is not None and self.on_batch_error == "fail":
            raise _Failed(why)
        col = _COLLECTOR.get()
        if why is None and col is not None:
            col.add(path, body, keys)
            raise _Failed(PENDING)
        if why is None:  # a final pass met a request no collecting pass saw (a step that asks differently each time)
            log.warning("%s: a request outside any batch job was sent online (key %s)", self.resolved_base_url, keys[0])
        return await super()._send(transport, path, body, est, keys)

    # ---- jobs -----------------------------------------------------------------------------------

    async def submit_and_wait(self, col: Collector) -> None:
        """Submit what `col` queued that is in no live job, then wait for every job holding a queued key."""
        wait = await asyncio.to_thread(self._submit_missing, col)
        if wait:
            await self._wait(wait)

    def _submit_missing(self, col: Collector) -> list[BatchRecord]:
        # under the ledger's lock: two calls at once (a row step's two batches in flight) must neither take each
        # other's fresh upload for an orphan nor both submit one request
        ledger = self.ledger()
        with ledger.lock:
            self._adopt_orphans()
            live = {k: rec for rec in ledger.live() for k in rec.all_keys()}
            wait = {id(live[ln.keys[0]]): live[ln.keys[0]] for ln in col.pending.values() if ln.keys[0] in live}
            new = [line for line in col.pending.values() if line.keys[0] not in live]
            if new:
                if self.over_budget():
                    raise BudgetExceeded(
                        f"{self.resolved_base_url} (model {self.model!r}): max_cost_usd={self.max_cost_usd} reached; "
                        f"{len(new)} request(s) were not submitted as a batch job. Re-run with a larger budget to resume"
                    )
                for rec in self._submit(new):
                    wait[id(rec)] = rec
        return list(wait.values())

    def _submit(self, lines: list[Line]) -> list[BatchRecord]:
        by_path: dict[str, list[Line]] = {}
        for line in lines:
            by_path.setdefault(line.path, []).append(line)
        out = []
        for path, group in by_path.items():
            endpoint = "/v1" + path
            encoded = [
                (json.dumps({"custom_id": line.keys[0], "method": "POST", "url": endpoint, "body": line.body},
                            ensure_ascii=False) + "\n").encode()
                for line in group
            ]  # fmt: skip
            index = {line.keys[0]: line.keys for line in group}
            for chunk in split_lines(encoded, self.batch_max_requests, self.batch_max_bytes):
                cids = [json.loads(raw)["custom_id"] for raw in chunk]
                out.append(self._create(endpoint, b"".join(chunk), {c: index[c] for c in cids}))
        return out

    def _create(self, endpoint: str, content: bytes, requests: dict[str, list[str]]) -> BatchRecord:
        ledger = self.ledger()
        name = f"thresher-{uuid.uuid4().hex[:12]}"
        common = {"endpoint": endpoint, "requests": requests, "mode": self.mode, "base_url": self.resolved_base_url,
                  "model": self.model, "api_key_env": self.api_key_env, "lines": len(requests), "bytes": len(content)}  # fmt: skip
        self.usage.batches += 1
        self.usage.batch_requests += len(requests)
        if self.mode == "vllm-file":
            folder = self.folder()
            if folder is None:
                raise ConfigError("OpenAIBatch(batch='vllm-file') needs a folder for its files: run it in a pipeline "
                                  "(the step's run folder) or set batch_dir")  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            src, dst = folder / f"{name}.input.jsonl", folder / f"{name}.output.jsonl"
            tmp = src.with_name(f".{src.name}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, src)
            ledger.write({"event": "submitting", "file_id": str(src), **common})
            ledger.write({"event": "created", "file_id": str(src), "batch_id": f"vllm-file:{name}", "status": "waiting",
                          "output": str(dst)})  # fmt: skip
            return ledger.records[str(src)]
        api = self.api()
        uploaded = api.upload(f"{name}.jsonl", content)
        file_id = str(uploaded["id"])
        ledger.write({"event": "submitting", "file_id": file_id, **common})  # before the job exists: see _adopt_orphans
        job = api.json("POST", "/batches", {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                                            "metadata": {"thresher": name}})  # fmt: skip
        ledger.write({"event": "created", "file_id": file_id, "batch_id": job["id"], "status": job.get("status")})
        log.info("batch job %s: %d requests (%d bytes) to %s", job["id"], len(requests), len(content), endpoint)
        return ledger.records[file_id]

    def _adopt_orphans(self) -> None:
        """A job whose creation was not recorded (killed between the upload and the ledger line): find it by its
        input file among the server's jobs; if there is none, its keys are in no job and are submitted again."""
        ledger = self.ledger()
        orphans = ledger.orphans()
        for rec in [r for r in orphans if r.mode == "vllm-file"]:  # its file was written, the job never recorded
            ledger.write({"event": "abandoned", "file_id": rec.file_id})
        orphans = [r for r in orphans if r.mode != "vllm-file"]
        if not orphans:
            return
        jobs = self.api().json("GET", "/batches?limit=100").get("data") or []
        by_file = {j.get("input_file_id"): j for j in jobs}
        for rec in orphans:
            job = by_file.get(rec.file_id)
            if job is not None:
                ledger.write({"event": "created", "file_id": rec.file_id, "batch_id": job["id"], "status": job.get("status")})
            else:
                ledger.write({"event": "abandoned", "file_id": rec.file_id})

    async def _wait(self, jobs: list[BatchRecord]) -> None:
        interval = float(self.batch_poll_interval)
        waiting = list(jobs)
        while waiting:
            for rec in list(waiting):
                if await asyncio.to_thread(self._poll, rec):
                    waiting.remove(rec)
            if waiting:
                await asyncio.sleep(interval)
                interval = min(float(self.batch_poll_max), interval * 1.5)

    def _poll(self, rec: BatchRecord) -> bool:
        """Look at a job once; collect it when it is finished. Returns whether it is."""
        ledger = self.ledger()
        assert rec.batch_id is not None
        if rec.collected:  # by another call waiting on the same job
            return True
        if rec.mode == "vllm-file":
            assert rec.output is not None
            out = Path(rec.output)
            if not out.is_file():
                raise BatchPending(
                    f"{rec.lines} request(s) wait in {rec.file_id}: answer them on a GPU box with `python -m "
                    f"vllm.entrypoints.openai.run_batch -i {Path(rec.file_id).name} -o {out.name} --model {self.model}`, "
                    f"put {out.name} in {out.parent}, and run again to collect the answers"
                )
            with ledger.lock:
                if not rec.collected:
                    self._collect(rec, "completed", out.read_bytes(), b"", None)
            return True
        job = self.api().json("GET", f"/batches/{rec.batch_id}")
        status = str(job.get("status"))
        counts = dict(job.get("request_counts") or {})
        if status != rec.status or counts != rec.counts:
            ledger.write({"event": "status", "file_id": rec.file_id, "status": status, "counts": counts})
        if status not in FINAL:
            return False
        with ledger.lock:
            if rec.collected:
                return True
            api = self.api()
            output = api.call("GET", f"/files/{job['output_file_id']}/content") if job.get("output_file_id") else b""
            errors = api.call("GET", f"/files/{job['error_file_id']}/content") if job.get("error_file_id") else b""
            why = None
            if status == "failed":
                msgs = [str(e.get("message")) for e in ((job.get("errors") or {}).get("data") or []) if isinstance(e, dict)]
                why = "; ".join(msgs[:3]) or "no reason given"
            self._collect(rec, status, output, errors, why)
        return True

    def _collect(self, rec: BatchRecord, status: str, output: bytes, errors: bytes, job_error: str | None) -> None:
        """Answers into the request cache (committed), then the job's outcome into the ledger."""
        cache = self._cache
        kind = "chat" if rec.endpoint.endswith("/chat/completions") else "completion"
        prices = self.request_prices() or {}
        failed: dict[str, str] = {}
        seen: set[str] = set()
        pt = ct = 0
        where = f"Batch API job {rec.batch_id} ({status})"
        for raw in (output + b"\n" + errors).splitlines():
            if not raw.strip():
                continue
            try:
                line = loads(raw)
                cid = str(line["custom_id"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s: an output line that is not JSON with a custom_id: %r", where, raw[:120])
                continue
            keys = rec.requests.get(cid)
            if keys is None:
                continue
            seen.add(cid)
            resp = line.get("response") or {}
            body = resp.get("body") if isinstance(resp, dict) else None
            code = resp.get("status_code") if isinstance(resp, dict) else None
            if line.get("error") or code != 200 or not isinstance(body, dict):
                err = line.get("error") or (body or {}).get("error") or body or {}
                msg = err.get("message", err) if isinstance(err, dict) else err
                code_txt = f"HTTP {code}" if code else str((err or {}).get("code") if isinstance(err, dict) else "error")
                failed[keys[0]] = f"{where}: {code_txt}: {' '.join(str(msg).split())[:300]}"
                continue
            recs, why = _records(body, kind, keys)
            usage = body.get("usage") or {}
            pt += int(usage.get("prompt_tokens") or 0)
            ct += int(usage.get("completion_tokens") or 0)
            if why is not None:
                failed[keys[0]] = f"{where}: {why}"
            if cache is not None:
                for key, value in recs.items():
                    cache.put(key, dumps(value), kind=kind, model=self.model)
        for cid, keys in rec.requests.items():
            if cid not in seen:
                failed[keys[0]] = f"{where}: " + (f"the job failed: {job_error}" if job_error else
                                                  "no answer for this request in the job's output")  # fmt: skip
        if cache is not None:
            cache.flush()
        cost = (pt * float(prices.get("prompt", 0.0)) + ct * float(prices.get("completion", 0.0))) / 1e6
        self.usage.prompt_tokens += pt
        self.usage.completion_tokens += ct
        self.usage.cost_usd += cost
        budget.add(self.budget_key(), cost)
        counts = {"total": rec.lines, "completed": len(seen) - sum(1 for c in seen if rec.requests[c][0] in failed),
                  "failed": len(failed)}  # fmt: skip
        self.ledger().write({"event": "collected", "file_id": rec.file_id, "status": status, "counts": counts,
                             "failed": failed, "prompt_tokens": pt, "completion_tokens": ct, "cost_usd": cost})  # fmt: skip
        if failed:
            log.warning("%s: %d of %d requests failed (on_batch_error=%s)", where, len(failed), rec.lines,
                        self.on_batch_error)  # fmt: skip


#: what a collecting pass counts that the real pass counts again: put back after it (what it sent online stays)
_RECOUNTED = ("cache_hits", "cache_misses", "errors", "reasks")


def too_many_stages(backend: OpenAIBatch) -> BackendError:
    return BackendError(
        f"{backend!r}: still queueing new requests after {MAX_STAGES} rounds of batch jobs, each round answered; a step "
        "whose requests never settle (or answers that never reach the request cache) cannot run in batch mode"
    )


def restore_usage(usage: Usage, before: Usage) -> None:
    """Put the counts a collecting pass repeats back to `before`, in place. Requests it sent online (failed lines
    with on_batch_error=online) and their tokens and cost are real and stay."""
    for name in _RECOUNTED:
        setattr(usage, name, getattr(before, name))


# The constructor takes every OpenAICompatible parameter by name (config.make_backend reads the signature).
_own = [p for n, p in inspect.signature(OpenAIBatch.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY]
_base = [p for n, p in inspect.signature(OpenAICompatible.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY]
OpenAIBatch.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_base, *_own]
)


# ---- looking at a run's jobs (`thresher batches RUN_DIR`) -----------------------------------------


def run_jobs(run_dir: str | os.PathLike[str], *, refresh: bool = True, cancel: bool = False) -> list[dict[str, Any]]:
    """Every batch job of a run, one dict each (step, job, mode, status, requests, completed, failed, cost_usd).

    refresh: ask the server for the status of jobs not collected yet (the key comes from the environment variable
    the ledger names). cancel: ask it to cancel them; a re-run then collects what they answered, and the rest of
    their requests fail or go online as on_batch_error says."""
    rows = []
    for step, ledger in ledgers(run_dir):
        for rec in list(ledger.records.values()):
            if rec.abandoned:
                continue
            status, counts, note = rec.status, dict(rec.counts), ""
            if rec.batch_id and not rec.collected and rec.mode == "openai" and (refresh or cancel):
                api = BatchApi(rec.base_url, os.environ.get(rec.api_key_env), None, RetryPolicy(2, 0.2, 2.0), 30.0)
                try:
                    path = f"/batches/{rec.batch_id}" + ("/cancel" if cancel else "")
                    job = api.json("POST" if cancel else "GET", path)
                    status, counts = str(job.get("status")), dict(job.get("request_counts") or counts)
                    ledger.write({"event": "status", "file_id": rec.file_id, "status": status, "counts": counts})
                except BackendError as e:
                    note = f"server not asked: {e}"
            elif rec.batch_id and not rec.collected and rec.mode == "vllm-file":
                status = "output ready" if rec.output and Path(rec.output).is_file() else "waiting for its output file"
            rows.append({"step": step, "job": rec.batch_id or f"(upload {rec.file_id}, job not recorded)",
                         "mode": rec.mode, "status": status, "requests": rec.lines, "completed": counts.get("completed"),
                         "failed": counts.get("failed"), "collected": rec.collected,
                         "cost_usd": round(rec.cost_usd, 6) if rec.collected else None, "note": note})  # fmt: skip
    return rows
