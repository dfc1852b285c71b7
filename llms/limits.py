"""Rate limits and retries for remote backends.

`RateLimiter` holds two token buckets, requests per minute and tokens per minute, each refilling continuously and
holding at most `burst_seconds` of allowance (1 s by default: providers enforce per-minute limits over shorter
windows, so a full minute's burst at start would itself draw 429s). A request takes one request token and its *estimated* tokens (prompt
characters / 4 + the completion budget) before it is sent; when the answer reports real usage the difference is
given back or charged. A 429 with Retry-After pauses every new request, not just the one that was refused: the
server has said the whole key is over its limit.

`RetryPolicy` says which failures are worth another try (429, 408, 409, 425, 5xx, timeouts, dropped connections,
bodies cut short or not JSON) and how long to wait: exponential backoff with jitter (a random 50–100 % of
`base * 2**attempt`, capped), or what the server asked for in `retry-after-ms` / `Retry-After`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from thresher.errors import ConfigError

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a response asks us to wait, from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    """How many times to retry a failed request and how long to wait before each try."""

    max_retries: int = 6
    base_delay: float = 0.5  # seconds before the first retry (times a random 0.5–1)
    max_delay: float = 30.0  # cap of the exponential backoff
    max_retry_after: float = 600.0  # never wait longer than this, whatever the server says

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError("retry delays must be >= 0")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        backoff = min(self.max_delay, self.base_delay * 2**attempt) * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            # the server knows when it will have room; a little jitter keeps retries from arriving together
            return min(self.max_retry_after, retry_after * (1.0 + 0.1 * random.random()))
        return backoff


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets shared by every request of a backend (asyncio)."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, burst_seconds: float = 1.0) -> None:
        for name, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0 or None (no limit), got {v}")
        self.rpm, self.tpm = rpm, tpm
        self._req_cap = max(1.0, rpm * burst_seconds / 60.0) if rpm else 0.0
        self._tok_cap = max(1.0, tpm * burst_seconds / 60.0) if tpm else 0.0
        self._req = self._req_cap
        self._tok = self._tok_cap
        self._last = time.monotonic()
        self._paused_until = 0.0
        self._lock: asyncio.Lock | None = None

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _refill(self, now: float) -> None:
        dt = now - self._last
        self._last = now
        if self.rpm:
            self._req = min(self._req_cap, self._req + dt * self.rpm / 60.0)
        if self.tpm:
            self._tok = min(self._tok_cap, self._tok + dt * self.tpm / 60.0)

    def pause(self, seconds: float) -> None:
        """Hold every new request for `seconds` (a 429 told us the key is over its limit)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request and `tokens` tokens are available, then take them."""
        now = time.monotonic()
        if now < self._paused_until:
            await asyncio.sleep(self._paused_until - now)
        if not self.active:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        # one waiter at a time takes from the buckets, so requests leave in arrival order
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._refill(now)
                # a request larger than the bucket would never fit: let it go once the bucket is full
                need_tok = min(float(tokens), self._tok_cap) if self.tpm else 0.0
                wait = 0.0
                if self.rpm and self._req < 1.0:
                    wait = max(wait, (1.0 - self._req) * 60.0 / self.rpm)
                if self.tpm and self._tok < need_tok:
                    wait = max(wait, (need_tok - self._tok) * 60.0 / self.tpm)
                if wait <= 0:
                    if self.rpm:
                        self._req -= 1.0
                    if self.tpm:
                        self._tok -= need_tok
                    return
                await asyncio.sleep(wait)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once a response reports what a request really used."""
        if self.tpm:
            self._tok = min(self._tok_cap, self._tok + estimated - actual)


def estimate_tokens(chars: int, max_tokens: int | None, n: int = 1) -> int:
    """A pessimistic token count before sending: ~4 characters per prompt token plus the completion budget."""
    return chars // 4 + 1 + (max_tokens if max_tokens is not None else 256) * max(1, n)
