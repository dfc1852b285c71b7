"""`OpenAICompatible`: chat and completion requests to any OpenAI-compatible server (OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama), many at a time, with retries, rate limits, structured output and the request cache.

How a call runs: every prompt's samples get a cache key; the cache is read once for all of them; what is missing
becomes jobs on a queue. `max_concurrency` workers take jobs from the queue until it is empty, so exactly that many
requests are in flight from the first prompt to the last (a sliding window, never batch after batch). A job holds
its slot until its answer is committed to the cache, so a `kill -9` can lose at most `max_concurrency` answers.
A failed request is retried (see `limits.RetryPolicy`); once out of retries it marks its own prompt with an error
and every other prompt goes on. `n` samples are asked for in one request; a server that returns fewer (llama.cpp
ignores `n`) is asked again for the rest, with `seed + index` so seeded samples differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from thresher.errors import BackendError, ConfigError
from thresher.llms import budget
from thresher.llms._aio import LoopThread
from thresher.llms.base import Completion, Conversation, Usage, check_gen_params
from thresher.llms.cache import RequestCache, request_key, resolve_cache
from thresher.llms.http import TRANSPORTS, Transport, TransportFault, dumps, loads
from thresher.llms.limits import RETRYABLE_STATUS, RateLimiter, RetryPolicy, estimate_tokens, retry_after_seconds
from thresher.llms.served_logprobs import PromptLogprobs
from thresher.llms.structured import Schema, check_mode, next_mode, reask_message, schema_instruction

DEFAULT_BASE_URL = "https://api.openai.com/v1"
log = logging.getLogger("thresher.llms")
#: statuses that no retry can fix and that would fail every request alike: stop the call instead of marking rows
FATAL_STATUS = {401: "the API key was refused", 403: "access denied", 404: "no such endpoint or model"}


class _Failed(Exception):
    """A request that ran out of retries or cannot succeed; becomes its prompt's error."""


class _RejectedFormat(Exception):
    """The server refused the response_format form we sent (HTTP 400/422)."""


def _error_message(content: bytes) -> str:
    try:
        data = loads(content)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data))
            if isinstance(err, dict):
                err = err.get("message", err)
            return " ".join(str(err).split())[:300]
    except ValueError:
        pass
    return " ".join(content[:300].decode("utf-8", "replace").split()) or "(empty body)"


def resolve_base_url(base_url: str | None) -> str:
    """The endpoint: the argument, else $OPENAI_BASE_URL, else OpenAI's API."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(url: str, api_key: str | None, api_key_env: str, who: str) -> str | None:
    """The key for `url`: the argument, else the environment variable. Only OpenAI's own API is known to need one;
    self-hosted servers (vLLM, llama.cpp) usually take none, so a missing key is an error there alone."""
    key = api_key or os.environ.get(api_key_env) or None
    if key is None and urlparse(url).hostname == "api.openai.com":
        raise ConfigError(f"{who}: no API key for {url}: set ${api_key_env} or pass api_key")
    return key


def _proxied(url: str) -> bool:
    """Whether the environment routes `url` through a proxy (HTTP(S)_PROXY without a NO_PROXY match)."""
    u = urlparse(url)
    proxies = urllib.request.getproxies()
    if not proxies.get(u.scheme) and not proxies.get("all"):
        return False
    return not urllib.request.proxy_bypass(u.hostname or "")


class RemoteClient:
    """What every request to an OpenAI-compatible server shares: transport, slots, limits, retries, usage.

    Not a public class: `OpenAICompatible` and `OpenAIEmbeddings` hold one.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        max_concurrency: int,
        rpm: float | None,
        tpm: float | None,
        timeout: float,
        policy: RetryPolicy,
        transport: str,
        headers: Mapping[str, str] | None,
        usage: Usage,
        name: str,
    ) -> None:
        if transport != "auto" and transport not in TRANSPORTS:
            raise ConfigError(f"transport must be 'auto' or one of {sorted(TRANSPORTS)}, got {transport!r}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.policy = policy
        self.limiter = RateLimiter(rpm, tpm)
        self.transport_kind = transport
        self.headers = dict(headers or {})
        self.usage = usage
        self.loop_thread = LoopThread(f"thresher-{name}")
        self._per_loop: dict[int, tuple[Transport, asyncio.Semaphore]] = {}

    def __repr__(self) -> str:
        return f"RemoteClient({self.base_url!r})"

    def for_loop(self) -> tuple[Transport, asyncio.Semaphore]:
        """The transport and concurrency slots of the running loop (clients cannot cross event loops)."""
        loop = asyncio.get_running_loop()
        got = self._per_loop.get(id(loop))
        if got is None:
            kind = self.transport_kind
            extra: dict[str, Any] = {}
            if kind == "auto":
                # Plain-HTTP servers (vLLM, SGLang, llama.cpp next to the job) are where client CPU per request
                # limits throughput: the lean transport. Hosted HTTPS APIs go through the openai SDK, whose TLS,
                # HTTP/2 and proxy handling is the one users already trust; there the network dwarfs client cost.
                kind = "lean" if self.base_url.startswith("http://") else "openai"
            if kind == "lean" and _proxied(self.base_url):  # the lean transport speaks no proxy protocol
                kind, extra = "httpx", {"trust_env": True}
            cls = TRANSPORTS[kind]
            transport = cls(
                self.base_url,
                api_key=self._key,
                timeout=self.timeout,
                max_connections=self.max_concurrency,
                headers=self.headers,
                **extra,
            )
            got = (transport, asyncio.Semaphore(self.max_concurrency))
            self._per_loop[id(loop)] = got
        return got

    async def send(self, transport: Transport, path: str, body: dict[str, Any], est_tokens: int) -> dict[str, Any]:
        """POST with retries; the decoded JSON answer, or `_Failed` / `_RejectedFormat` / BackendError (fatal)."""
        policy, limiter, usage = self.policy, self.limiter, self.usage
        attempt = 0
        while True:
            await limiter.acquire(est_tokens)
            usage.requests += 1
            retry_after: float | None = None
            try:
                status, headers, content = await transport.post(path, body)
            except TransportFault as e:
                problem = str(e)
            else:
                if status == 200:
                    try:
                        data = loads(content)
                    except ValueError:
                        data = None
                    if isinstance(data, dict):
                        return data
                    problem = f"HTTP 200 but the body is not a JSON object ({len(content)} bytes: {content[:60]!r})"
                else:
                    msg = _error_message(content)
                    # a server without this form of structured output says so with 400/422 (llama.cpp's server
                    # answers its validation errors with a 500 naming the field)
                    if "response_format" in body and (
                        status in (400, 422) or (status == 500 and "response_format" in msg)
                    ):
                        raise _RejectedFormat(f"HTTP {status}: {msg}")
                    if status in FATAL_STATUS:
                        raise BackendError(
                            f"POST {self.base_url}{path}: HTTP {status} ({FATAL_STATUS[status]}): {msg}. "
                            "Every request would fail alike, so the call stops here; check base_url, model and the "
                            "API key (its environment variable)."
                        )
                    if status not in RETRYABLE_STATUS:
                        raise _Failed(f"HTTP {status}: {msg} (not retried: the request itself was refused)")
                    problem = f"HTTP {status}: {msg}"
                    retry_after = retry_after_seconds(headers)
                    if status == 429:
                        limiter.pause(retry_after if retry_after is not None else policy.delay(attempt))
            if attempt >= policy.max_retries:
                raise _Failed(f"{problem} (gave up after {attempt + 1} attempts)")
            usage.retries += 1
            wait = policy.delay(attempt, retry_after)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "POST %s%s: %s; retry %d/%d in %.2f s",
                    self.base_url,
                    path,
                    problem,
                    attempt + 1,
                    policy.max_retries,
                    wait,
                )
            await asyncio.sleep(wait)
            attempt += 1

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        got = self._per_loop.pop(id(loop), None)
        if got is not None:
            await got[0].aclose()

    def close(self) -> None:
        if self.loop_thread._loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop_thread.run(self.aclose())
        self.loop_thread.stop()
        self._per_loop.clear()


@dataclass
class _Row:
    messages: list[dict[str, Any]] | None  # chat
    prompt: str | None  # completions
    keys: list[str]
    result: Completion


class OpenAICompatible(PromptLogprobs):
    """Chat / completion backend for any OpenAI-compatible HTTP server.

    Configured only through its constructor (stored under the same names); the HTTP client starts on first use.

    - model, base_url: what to ask and where (`$OPENAI_BASE_URL`, else api.openai.com).
    - api_key / api_key_env: the key, or the environment variable holding it (read at first use, never stored in
      caches, logs or outputs). A server on localhost needs none.
    - max_concurrency: requests in flight at once, across the whole call. rpm / tpm: request and token rate limits.
    - timeout, max_retries, retry_base_delay, retry_max_delay: see `limits.RetryPolicy`.
    - json_mode, max_reasks: structured output (see `structured`).
    - prices: USD per million tokens, `{"prompt": 0.15, "completion": 0.6}`, for `usage.cost_usd`.
    - max_cost_usd: stop sending once this spec (base URL + model) has spent this much in the run (needs `prices`;
      see `thresher.llms.budget`): the call raises `BudgetExceeded` after the requests in flight have finished.
    - cache: True (default file), False, a path or a RequestCache. cache_namespace: extra key part, e.g. to tell
      apart two servers that serve different weights under one model name.
    - transport: "auto" (default: "lean" for http:// servers, "openai" for https:// APIs), "lean" (asyncio
      HTTP/1.1, least CPU per request), "httpx" (httpx2 client: proxies) or "openai" (the openai SDK's client).
    - tokenizer, max_length: for `logprobs` / `next_token_logprobs` / `score_answers` against a vLLM server
      (`served_logprobs`): the served model's tokenizer (a local directory or a hub id in the local cache;
      default: `model`) and the longest sequence in tokens.
    """

    kind = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        json_mode: str = "auto",
        max_reasks: int = 2,
        prices: Mapping[str, float] | None = None,
        max_cost_usd: float | None = None,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        cache_namespace: str | None = None,
        transport: str = "auto",
        headers: Mapping[str, str] | None = None,
        progress: bool = False,
        tokenizer: str | None = None,
        max_length: int = 4096,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = rpm, tpm
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_base_delay, self.retry_max_delay = retry_base_delay, retry_max_delay
        self.json_mode = json_mode
        self.max_reasks = max_reasks
        self.prices = prices
        self.max_cost_usd = max_cost_usd
        self.cache = cache
        self.cache_namespace = cache_namespace
        self.transport = transport
        self.headers = headers
        self.progress = progress
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.tokenizer_: Any = None
        self.usage = Usage()
        self._client: RemoteClient | None = None
        self._cache: RequestCache | None = None
        self._mode_now = "schema" if json_mode == "auto" else json_mode
        self.check()

    # ---- configuration --------------------------------------------------------------------------

    def check(self) -> None:
        """Validate parameters (cheap; no network)."""
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("OpenAICompatible: model must be a non-empty string (the name the server knows)")
        check_mode(self.json_mode)
        if self.max_reasks < 0:
            raise ConfigError(f"OpenAICompatible: max_reasks must be >= 0, got {self.max_reasks}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"OpenAICompatible: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.prices is not None:
            bad = set(self.prices) - {"prompt", "completion"}
            if bad:
                raise ConfigError(
                    f"OpenAICompatible: prices keys must be 'prompt' and 'completion' (USD per 1M tokens), got {sorted(bad)}"
                )
        if self.max_cost_usd is not None:
            if isinstance(self.max_cost_usd, bool) or not isinstance(self.max_cost_usd, (int, float)) or self.max_cost_usd <= 0:
                raise ConfigError(f"OpenAICompatible: max_cost_usd must be a positive number, got {self.max_cost_usd!r}")
            if not self.prices:
                raise ConfigError(
                    "OpenAICompatible: max_cost_usd needs prices ({prompt: ..., completion: ...} in USD per 1M tokens): "
                    "without them nothing is counted"
                )
        if self.transport != "auto" and self.transport not in TRANSPORTS:
            raise ConfigError(
                f"OpenAICompatible: transport must be 'auto' or one of {sorted(TRANSPORTS)}, got {self.transport!r}"
            )
        if self.headers and any(k.lower() in ("authorization", "api-key", "x-api-key") for k in self.headers):
            raise ConfigError(
                "OpenAICompatible: do not put credentials in headers (they would be stored with the configuration); "
                "use api_key or the environment variable named by api_key_env"
            )
        RetryPolicy(self.max_retries, self.retry_base_delay, self.retry_max_delay)
        RateLimiter(self.rpm, self.tpm)

    @property
    def resolved_base_url(self) -> str:
        return resolve_base_url(self.base_url)

    def _api_key(self) -> str | None:
        return resolve_api_key(self.resolved_base_url, self.api_key, self.api_key_env, "OpenAICompatible")

    def budget_key(self) -> tuple[str, str]:
        """What `max_cost_usd` counts together across the steps of a run: one server, one model."""
        return (self.resolved_base_url, self.model)

    def over_budget(self) -> bool:
        return self.max_cost_usd is not None and budget.spent(self.budget_key()) >= float(self.max_cost_usd)

    def check_secrets(self) -> None:
        """Raise ConfigError now if a key is needed and absent (call before the first paid request)."""
        self._api_key()

    def identity(self) -> dict[str, Any]:
        """What determines the answers: the model (and a namespace), not where it is served or how fast."""
        ident: dict[str, Any] = {"kind": self.kind, "model": self.model}
        if self.cache_namespace:
            ident["namespace"] = self.cache_namespace
        return ident

    def __thresher_fingerprint__(self) -> dict[str, Any]:
        return self.identity()

    def __repr__(self) -> str:
        return (
            f"OpenAICompatible(model={self.model!r}, base_url={self.resolved_base_url!r}, "
            f"max_concurrency={self.max_concurrency})"
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> OpenAICompatible:
        if self._client is None:
            self._client = RemoteClient(
                base_url=self.resolved_base_url,
                api_key=self._api_key(),
                max_concurrency=self.max_concurrency,
                rpm=self.rpm,
                tpm=self.tpm,
                timeout=self.timeout,
                policy=RetryPolicy(self.max_retries, self.retry_base_delay, self.retry_max_delay),
                transport=self.transport,
                headers=self.headers,
                usage=self.usage,
                name=f"openai:{self.model}",
            )
            self._cache = resolve_cache(self.cache)
        return self

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray / process workers without live clients
        state = dict(self.__dict__)
        # nor keys: a pickle lands in Ray's object store and task arguments; workers read `api_key_env` instead
        state["api_key"] = None
        state["_client"] = None
        state["_cache"] = None
        state["tokenizer_"] = None
        return state

    @property
    def request_cache(self) -> RequestCache | None:
        self.load()
        return self._cache

    # ---- public calls ---------------------------------------------------------------------------

    def chat(self, conversations: Sequence[Conversation], **params: Any) -> list[Completion]:
        """Answer each conversation; see `base.ChatBackend.chat` for the parameters."""
        self.load()
        assert self._client is not None
        return self._client.loop_thread.run(self.achat(conversations, **params))

    def complete(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        """Continue each raw prompt through `/completions`."""
        self.load()
        assert self._client is not None
        return self._client.loop_thread.run(self.acomplete(prompts, **params))

    async def achat(self, conversations: Sequence[Conversation], **params: Any) -> list[Completion]:
        rows = []
        for i, conv in enumerate(conversations):
            if isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence) or not conv:
                raise ConfigError(f"conversation {i}: expected a non-empty list of {{'role', 'content'}} messages")
            msgs = []
            for m in conv:
                if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                    raise ConfigError(f"conversation {i}: every message needs 'role' and 'content', got {m!r}")
                msgs.append(dict(m))
            rows.append(msgs)
        return await self._generate(rows, None, params)

    async def acomplete(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        if params.get("response_format") is not None:
            raise ConfigError("complete(): response_format needs chat(); the completions endpoint takes no schema")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ConfigError(f"prompt {i}: expected a string, got {type(p).__name__}")
        return await self._generate(None, list(prompts), params)

    # ---- the engine -----------------------------------------------------------------------------

    async def _generate(
        self, chats: list[list[dict[str, Any]]] | None, prompts: list[str] | None, params: dict[str, Any]
    ) -> list[Completion]:
        self.load()
        assert self._client is not None
        n: int = params.get("n", 1)
        sampling, extra, schema, key_params = self._request_params(params)
        path = "/chat/completions" if chats is not None else "/completions"
        kind = "chat" if chats is not None else "completion"
        count = len(chats) if chats is not None else len(prompts or [])

        rows: list[_Row] = []
        all_keys: list[str] = []
        for i in range(count):
            what = chats[i] if chats is not None else (prompts or [])[i]
            keys = self._sample_keys(kind, what, key_params, n)
            all_keys += keys
            result = Completion(
                texts=[None] * n,
                finish_reasons=[None] * n,
                parsed=[None] * n if schema else None,
                logprobs=[None] * n if sampling.get("logprobs") else None,
            )
            rows.append(
                _Row(chats[i], None, keys, result) if chats is not None else _Row(None, str(what), keys, result)
            )

        cache = self._cache
        found = cache.get_many(all_keys) if cache is not None else {}
        jobs: deque[tuple[int, list[int]]] = deque()
        reask_jobs: list[tuple[int, int]] = []
        for r, row in enumerate(rows):
            missing = []
            for s, key in enumerate(row.keys):
                hit = found.get(key)
                if hit is None:
                    missing.append(s)
                    continue
                rec = loads(hit)
                self._fill(row.result, s, rec)
                row.result.cached += 1
                self.usage.cache_hits += 1
                if schema is not None:
                    reask_jobs.append((r, s))  # validate (and re-ask if needed) off the read path
            if missing:
                self.usage.cache_misses += len(missing)
                jobs.append((r, missing))

        bar = None
        if self.progress or params.get("progress"):
            from tqdm.auto import tqdm

            todo = sum(len(m) for _, m in jobs) + len(reask_jobs)
            bar = tqdm(total=count * n, initial=count * n - todo, desc=self.model, unit="sample")

        client = self._client
        transport, slots = client.for_loop()

        async def run_job(r: int, samples: list[int]) -> None:
            row = rows[r]
            try:
                got = await self._request(transport, path, row, samples, sampling, extra, schema, kind)
            except _Failed as e:
                row.result.error = self._error_text(r, e, kind)
                got = []
            # a server that returned fewer choices than asked for is asked again for the rest
            rest = samples[len(got) :]
            if rest and row.result.error is None:
                jobs.append((r, rest))
            for s in got:
                await self._validate(transport, path, row, s, sampling, extra, schema, kind, r)
            if bar is not None:
                bar.update(len(got) if row.result.error is None else len(samples))

        active = 0
        stopped = False
        changed = asyncio.Event()

        async def worker() -> None:
            # take jobs until none is queued and none is running (a running one may queue a follow-up)
            nonlocal active, stopped
            while True:
                if (jobs or reask_jobs) and self.over_budget():
                    stopped = True  # send nothing new; what is in flight finishes and reaches the cache
                    return
                if jobs or reask_jobs:
                    active += 1
                    try:
                        async with slots:
                            if reask_jobs:
                                r, s = reask_jobs.pop()
                                await self._validate(transport, path, rows[r], s, sampling, extra, schema, kind, r)
                                if bar is not None:
                                    bar.update(1)
                            elif jobs:
                                await run_job(*jobs.popleft())
                    finally:
                        active -= 1
                        changed.set()
                elif active == 0:
                    return
                else:
                    changed.clear()
                    await changed.wait()

        n_workers = min(self.max_concurrency, len(jobs) + len(reask_jobs))
        tasks = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        if stopped:
            from thresher.errors import BudgetExceeded

            raise BudgetExceeded(
                f"{self.resolved_base_url} (model {self.model!r}): max_cost_usd={self.max_cost_usd} reached "
                f"(${budget.spent(self.budget_key()):.6f} spent in this run); nothing new was sent. Answers so far are "
                "in the request cache and committed batches stay committed: re-run with a larger max_cost_usd to resume"
            )
        out = []
        for r, row in enumerate(rows):
            res = row.result
            if res.error is None and any(t is None for t in res.texts):
                missing = [i for i, t in enumerate(res.texts) if t is None]
                res.error = f"{kind} {r}: no answer for sample(s) {missing}"
            if res.error is not None:
                self.usage.errors += 1
            out.append(res)
        return out

    @staticmethod
    def _request_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Schema | None, dict[str, Any]]:
        """(sampling sent, extra sent, schema, what of them keys the cache) for a call's parameters."""
        check_gen_params(params, "OpenAICompatible")
        schema = Schema.of(params["response_format"]) if params.get("response_format") is not None else None
        sampling: dict[str, Any] = {}
        for k in ("max_tokens", "temperature", "top_p", "stop", "seed"):
            if params.get(k) is not None:
                sampling[k] = params[k]
        if params.get("logprobs"):
            sampling["logprobs"] = True
            if params.get("top_logprobs") is not None:
                sampling["top_logprobs"] = params["top_logprobs"]
        extra = dict(params.get("extra") or {})
        return sampling, extra, schema, {**sampling, **extra, "schema": schema.key() if schema else None}

    def _sample_keys(self, kind: str, what: Any, key_params: Mapping[str, Any], n: int) -> list[str]:
        base = request_key(kind, self.identity(), what, key_params)
        return [hashlib.blake2b(f"{base}:{s}".encode(), digest_size=16).hexdigest() for s in range(n)]

    def cached_texts(self, conversations: Sequence[Conversation], **params: Any) -> list[list[str | None]]:
        """What the request cache holds for these chat requests, per sample (None: not cached). Sends nothing: a
        cost estimate measures answer lengths from it."""
        self.load()
        n: int = params.get("n", 1)
        key_params = self._request_params(params)[3]
        keys = [self._sample_keys("chat", [dict(m) for m in conv], key_params, n) for conv in conversations]
        found = self._cache.get_many([k for ks in keys for k in ks]) if self._cache is not None else {}
        return [[loads(found[k]).get("text") if k in found else None for k in ks] for ks in keys]

    def _error_text(self, r: int, e: Exception, kind: str) -> str:
        return f"{kind} request for prompt {r} to {self.resolved_base_url} (model {self.model!r}): {e}"

    @staticmethod
    def _fill(res: Completion, s: int, rec: Mapping[str, Any]) -> None:
        res.texts[s] = rec.get("text")
        res.finish_reasons[s] = rec.get("finish_reason")
        if res.logprobs is not None:
            res.logprobs[s] = rec.get("logprobs")

    def _body(
        self,
        row: _Row,
        messages: list[dict[str, Any]] | None,
        sampling: dict[str, Any],
        extra: dict[str, Any],
        schema: Schema | None,
        k: int,
        first_sample: int,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        if messages is not None:
            if schema is not None and self._mode_now == "off":
                messages = [
                    *messages[:-1],
                    {**messages[-1], "content": str(messages[-1]["content"]) + schema_instruction(schema)},
                ]
            body["messages"] = messages
        else:
            body["prompt"] = row.prompt
        body.update(sampling)
        body.update(extra)
        if k > 1:
            body["n"] = k
        if "seed" in sampling and first_sample:
            body["seed"] = int(sampling["seed"]) + first_sample
        if schema is not None:
            rf = schema.response_format(self._mode_now)
            if rf is not None:
                body["response_format"] = rf
        return body

    async def _post(
        self,
        transport: Transport,
        path: str,
        row: _Row,
        messages: list[dict[str, Any]] | None,
        sampling: dict[str, Any],
        extra: dict[str, Any],
        schema: Schema | None,
        k: int,
        first_sample: int,
        keys: list[str],
    ) -> dict[str, Any]:
        """One logical request (with the JSON-mode fallback of json_mode='auto'); `keys`: its samples' cache keys."""
        assert self._client is not None
        while True:
            mode = self._mode_now
            body = self._body(row, messages, sampling, extra, schema, k, first_sample)
            est = estimate_tokens(len(str(body.get("messages") or body.get("prompt"))), sampling.get("max_tokens"), k)
            try:
                data = await self._send(transport, path, body, est, keys)
            except _RejectedFormat as e:
                nxt = next_mode(mode) if self.json_mode == "auto" else None
                if nxt is None:
                    raise _Failed(f"{e} (the server refused response_format {body.get('response_format')!r})") from None
                if self._mode_now == mode:
                    log.warning(
                        "%s refused response_format %r (%s); structured output falls back to json_mode=%r",
                        self.resolved_base_url,
                        mode,
                        e,
                        nxt,
                    )
                    self._mode_now = nxt
                continue
            usage = data.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            if self.prices:  # priced per request (cache hits cost nothing), so a budget sees each answer as it lands
                cost = (pt * float(self.prices.get("prompt", 0.0)) + ct * float(self.prices.get("completion", 0.0))) / 1e6
                self.usage.cost_usd += cost
                budget.add(self.budget_key(), cost)
            self._client.limiter.settle(est, pt + ct)
            return data

    async def _send(self, transport: Transport, path: str, body: dict[str, Any], est: int, keys: list[str]) -> dict[str, Any]:
        """Where a request leaves: the server, now (the Batch API mode, `thresher.llms.batch`, queues it instead)."""
        assert self._client is not None
        return await self._client.send(transport, path, body, est)

    async def _request(
        self,
        transport: Transport,
        path: str,
        row: _Row,
        samples: list[int],
        sampling: dict[str, Any],
        extra: dict[str, Any],
        schema: Schema | None,
        kind: str,
    ) -> list[int]:
        """Ask for `samples`; store what came back. Returns the sample indices that got an answer."""
        keys = [row.keys[s] for s in samples]
        data = await self._post(transport, path, row, row.messages, sampling, extra, schema, len(samples), samples[0], keys)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _Failed(f"the answer has no choices: {str(data)[:200]}")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)[: len(samples)]
        res = row.result
        got: list[int] = []
        cache = self._cache
        last = min(len(samples), len(choices))
        for s, c in zip(samples, choices, strict=False):
            if kind == "chat":
                msg = c.get("message") or {}
                text = msg.get("content")
            else:
                text = c.get("text")
            if text is None:
                raise _Failed(f"choice {c.get('index')} has no text (finish_reason={c.get('finish_reason')!r})")
            rec: dict[str, Any] = {"text": text, "finish_reason": c.get("finish_reason")}
            lp = c.get("logprobs")
            if lp is not None and res.logprobs is not None:
                rec["logprobs"] = lp.get("content", lp) if isinstance(lp, dict) else lp
            self._fill(res, s, rec)
            got.append(s)
            if cache is not None:
                value = dumps(rec)
                if len(got) == last:
                    await cache.aput(row.keys[s], value, kind=kind, model=self.model)  # commit before freeing the slot
                else:
                    cache.put(row.keys[s], value, kind=kind, model=self.model)
        res.prompt_tokens += int((data.get("usage") or {}).get("prompt_tokens") or 0)
        res.completion_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
        return got

    async def _validate(
        self,
        transport: Transport,
        path: str,
        row: _Row,
        s: int,
        sampling: dict[str, Any],
        extra: dict[str, Any],
        schema: Schema | None,
        kind: str,
        r: int,
    ) -> None:
        """Parse and validate sample `s` against the schema; re-ask with the error until it passes."""
        if schema is None:
            return
        res = row.result
        assert res.parsed is not None and row.messages is not None
        text = res.texts[s]
        conv = list(row.messages)
        for attempt in range(self.max_reasks + 1):
            try:
                res.parsed[s] = schema.validate(text)
                res.texts[s] = text
                return
            except ValueError as e:
                problem = str(e)
            if attempt == self.max_reasks:
                break
            self.usage.reasks += 1
            conv = [*conv, {"role": "assistant", "content": text or ""}, reask_message(problem, schema)]
            key = request_key("reask", row.keys[s], conv)
            hit = self._cache.get(key) if self._cache is not None else None
            if hit is not None:
                text = loads(hit).get("text")
                continue
            sub = _Row(conv, None, [key], Completion([None], [None]))
            try:
                data = await self._post(transport, path, sub, conv, sampling, extra, schema, 1, s, [key])
            except _Failed as e2:
                res.error = self._error_text(r, e2, kind) + f" (while re-asking sample {s} for valid JSON)"
                res.texts[s] = None
                return
            res.prompt_tokens += int((data.get("usage") or {}).get("prompt_tokens") or 0)
            res.completion_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
            choices = data.get("choices") or [{}]
            text = (choices[0].get("message") or {}).get("content")
            if self._cache is not None and text is not None:
                await self._cache.aput(
                    key,
                    dumps({"text": text, "finish_reason": choices[0].get("finish_reason")}),
                    kind=kind,
                    model=self.model,
                )
        res.error = f"{kind} {r}: sample {s} is not valid for schema {schema.name!r} after {self.max_reasks} re-ask(s): {problem}"
        res.texts[s] = None
