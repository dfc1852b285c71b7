"""A fault-injecting OpenAI-compatible HTTP server for tests and benchmarks (127.0.0.1 only).

A real server that misbehaves on purpose beats a mock object: the client under test goes through its whole HTTP
stack. The server speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) on a bare asyncio Protocol, so
one process answers thousands of requests per second and is never the bottleneck of a client benchmark. It runs in
its own process (`FaultServer` starts it and talks to it over HTTP), so its work does not share the client's GIL.

Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `GET /v1/models`; control:
`GET /stats` (requests per prompt, per outcome, peak in-flight), `POST /reset`, `POST /config`.

Faults are drawn per request from a hash of (seed, prompt, attempt number), so a run is reproducible whatever the
order requests arrive in. Kinds: `429` (with Retry-After), `500`, `hang` (never answers), `drop` (closes the
connection without a reply), `truncate` (promises more bytes than it sends, then closes), `invalid_json` (a 200
whose body is not JSON). Markers in a prompt force behaviour: `[[fail]]` always a 500; `[[500x2]]` (any kind, any
count) that fault on the first 2 attempts, then an answer; `[[400]]` / `[[401]]` that status every time;
`[[badjson]]` prose instead of JSON in JSON mode until the conversation holds an assistant turn (a re-ask).
`ignore_n` answers one choice whatever `n` asks (as llama.cpp's server does); `reject_json_schema` refuses
`response_format` of type json_schema with a 400 (as servers without structured outputs do).

    with FaultServer(latency=0.2) as server:
        backend = OpenAICompatible(base_url=server.base_url, model="fake")
        ...
        server.stats()["total"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_KINDS = ("429", "500", "hang", "drop", "truncate", "invalid_json")


@dataclass
class FaultConfig:
    """How the server behaves. Every field can be changed at run time with `FaultServer.configure`."""

    latency: float = 0.0  # seconds before each answer
    latency_jitter: float = 0.0  # uniform extra seconds in [0, jitter)
    faults: dict[str, float] = field(default_factory=dict)  # kind -> probability per request
    retry_after: float = 1.0  # the Retry-After header of a 429, seconds
    retry_after_ms: float | None = None  # also send `retry-after-ms` (as OpenAI does) when set
    hang_seconds: float = 3600.0  # how long a hung request stays silent before the server closes it
    seed: int = 0
    embedding_dim: int = 16
    model: str = "fake-model"
    ignore_n: bool = False
    reject_json_schema: bool = False


def _prompt_of(body: dict[str, Any]) -> str:
    """The text requests are counted under: the first user message, the prompt, or the first embedding input."""
    if "messages" in body:
        for m in body["messages"]:
            if m.get("role") == "user":
                c = m.get("content")
                return c if isinstance(c, str) else json.dumps(c)
        return ""
    p = body.get("prompt", body.get("input", ""))
    if isinstance(p, list):
        return str(p[0]) if p else ""
    return str(p)


def _instance(schema: dict[str, Any], text: str, defs: dict[str, Any]) -> Any:
    """A small value that satisfies a JSON schema (enough for the schemas tests use)."""
    if "$ref" in schema:
        return _instance(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), text, defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return _instance(schema[key][0], text, defs)
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if t == "string":
        return text
    if t == "integer":
        return len(text.split())
    if t == "number":
        return float(len(text.split()))
    if t == "boolean":
        return True
    if t == "null":
        return None
    if t == "array":
        return [_instance(schema.get("items", {"type": "string"}), text, defs)]
    props = schema.get("properties", {})
    return {k: _instance(v, text, defs) for k, v in props.items()}


class _State:
    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.per_prompt: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.total = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.connections = 0
        self.authorization: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []  # the last few request bodies, for tests to inspect

    def reset(self) -> None:
        self.per_prompt.clear()
        self.outcomes.clear()
        self.authorization.clear()
        self.bodies.clear()
        self.total = 0
        self.peak_in_flight = self.in_flight
        self.connections = 0

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "per_prompt": dict(self.per_prompt),
            "outcomes": dict(self.outcomes),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "connections": self.connections,
            "authorization": dict(self.authorization),
            "bodies": self.bodies[-20:],
            "config": asdict(self.config),
        }

    def draw_fault(self, prompt: str, attempt: int) -> str | None:
        faults = self.config.faults
        if not faults:
            return None
        digest = hashlib.blake2b(f"{self.config.seed}\0{prompt}\0{attempt}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += faults.get(kind, 0.0)
            if u < acc:
                return kind
        return None


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
_FORCED = re.compile(r"\[\[(429|500|hang|drop|truncate|invalid_json)x(\d+)\]\]")


def _response(
    status: int, body: bytes, extra_headers: dict[str, str] | None = None, length: int | None = None
) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json"]
    head.append(f"content-length: {len(body) if length is None else length}")
    for k, v in (extra_headers or {}).items():
        head.append(f"{k}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending: list[asyncio.TimerHandle] = []
        self.busy = 0  # requests of this connection counted in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        for h in self.pending:
            h.cancel()
        self.pending.clear()
        self.state.in_flight -= self.busy
        self.busy = 0
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + n:
                return
            body = bytes(self.buf[end + 4 : end + 4 + n])
            del self.buf[: end + 4 + n]
            self.handle(method, path, body, headers.get("connection", "").lower() == "close", headers)

    # ---- dispatch -------------------------------------------------------------------------------

    def send(self, data: bytes, close: bool = False) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()

    def finish(self, data: bytes | None, close: bool = False, abort: bool = False) -> None:
        self.state.in_flight -= 1
        self.busy -= 1
        if self.transport is None:
            return
        if abort:
            self.transport.abort()
            return
        if data is not None:
            self.send(data, close)

    def later(self, delay: float, data: bytes | None, close: bool = False, abort: bool = False) -> None:
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            if holder and holder[0] in self.pending:
                self.pending.remove(holder[0])
            self.finish(data, close, abort)

        h = loop.call_later(delay, fire)
        holder.append(h)
        self.pending.append(h)

    def handle(self, method: str, path: str, raw: bytes, close: bool, headers: dict[str, str]) -> None:
        st = self.state
        if path == "/stats":
            self.send(_response(200, json.dumps(st.stats()).encode()), close)
            return
        if path == "/reset":
            st.reset()
            self.send(_response(200, b"{}"), close)
            return
        if path == "/config":
            update = json.loads(raw or b"{}")
            for k, v in update.items():
                setattr(st.config, k, v)
            self.send(_response(200, json.dumps(asdict(st.config)).encode()), close)
            return
        if path.rstrip("/") in ("/v1/models", "/models"):
            body = {"object": "list", "data": [{"id": st.config.model, "object": "model", "owned_by": "thresher"}]}
            self.send(_response(200, json.dumps(body).encode()), close)
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.send(_response(400, b'{"error": {"message": "request body is not JSON"}}'), close)
            return
        prompt = _prompt_of(body)
        st.total += 1
        st.per_prompt[prompt] += 1
        st.authorization[headers.get("authorization", "")] += 1
        st.bodies.append(body)
        del st.bodies[:-20]
        attempt = st.per_prompt[prompt]
        st.in_flight += 1
        self.busy += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        cfg = st.config
        delay = cfg.latency + (random.random() * cfg.latency_jitter if cfg.latency_jitter else 0.0)
        fault = st.draw_fault(prompt, attempt)
        forced = _FORCED.search(prompt)
        if "[[fail]]" in prompt:
            fault = "500"
        elif forced:
            fault = forced.group(1) if attempt <= int(forced.group(2)) else None
        rf = body.get("response_format") or {}
        if fault is None and cfg.reject_json_schema and rf.get("type") == "json_schema":
            fault = "400"
        elif fault is None and ("[[400]]" in prompt or "[[401]]" in prompt):
            fault = "400" if "[[400]]" in prompt else "401"
        st.outcomes[fault or "ok"] += 1
        if fault in ("400", "401"):
            err = b'{"error": {"message": "refused (injected)", "type": "invalid_request_error"}}'
            self.later(delay, _response(int(fault), err), close)
        elif fault == "429":
            hdr = {"retry-after": f"{math.ceil(cfg.retry_after) if cfg.retry_after >= 1 else cfg.retry_after:g}"}
            if cfg.retry_after_ms is not None:
                hdr["retry-after-ms"] = f"{cfg.retry_after_ms:g}"
            err = b'{"error": {"message": "rate limit reached (injected)", "type": "rate_limit"}}'
            self.later(delay, _response(429, err, hdr), close)
        elif fault == "500":
            self.later(delay, _response(500, b'{"error": {"message": "server error (injected)"}}'), close)
        elif fault == "hang":
            self.later(cfg.hang_seconds, None, close=True)
        elif fault == "drop":
            self.later(delay, None, abort=True)
        elif fault == "truncate":
            full = json.dumps(self.answer(path, body, prompt)).encode()
            self.later(delay, _response(200, full[: len(full) // 2], length=len(full)), close=True)
        elif fault == "invalid_json":
            self.later(delay, _response(200, b'{"id": "x", "choices": [{"message": '), close)
        else:
            out = self.answer(path, body, prompt)
            status = 404 if "error" in out else 200
            self.later(delay, _response(status, json.dumps(out).encode()), close)

    # ---- answers --------------------------------------------------------------------------------

    def answer(self, path: str, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        cfg = self.state.config
        p = path.rstrip("/")
        if p.endswith("/embeddings"):
            inputs = body.get("input", [])
            inputs = [inputs] if isinstance(inputs, str) else inputs
            data = []
            for i, text in enumerate(inputs):
                rng = random.Random(hashlib.blake2b(str(text).encode(), digest_size=8).digest())
                data.append(
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": [rng.gauss(0, 1) for _ in range(cfg.embedding_dim)],
                    }
                )
            toks = sum(len(str(t).split()) for t in inputs)
            return {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": toks, "total_tokens": toks},
            }
        chat = p.endswith("/chat/completions")
        if not chat and not p.endswith("/completions"):
            return {"error": {"message": f"no route {path}"}}
        n = 1 if cfg.ignore_n else int(body.get("n") or 1)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 10_000
        seed = body.get("seed")
        rf = body.get("response_format") or {}
        schema = None
        if rf.get("type") == "json_schema":
            schema = rf.get("json_schema", {}).get("schema", {})
        elif rf.get("type") == "json_object":
            schema = rf.get("schema", {"type": "object", "properties": {"answer": {"type": "string"}}})
        had_assistant = chat and any(m.get("role") == "assistant" for m in body.get("messages", []))
        choices = []
        completion_tokens = 0
        for i in range(n):
            words = f"reply to: {prompt}".split()
            if seed is not None:
                words.append(f"(seed {seed})")
            if n > 1:
                words.append(f"[choice {i}]")
            finish = "stop"
            if len(words) > max_tokens:
                words, finish = words[:max_tokens], "length"
            text = " ".join(words)
            if schema is not None:
                if "[[badjson]]" in prompt and not had_assistant:
                    text = "Here is what you asked for, though not as JSON."
                else:
                    text = json.dumps(_instance(schema, text, schema.get("$defs", {})))
            completion_tokens += len(text.split())
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish})
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
        return {
            "id": f"fake-{self.state.total}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", cfg.model),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


async def serve(config: FaultConfig, port: int = 0, ready: Any = None) -> None:
    """Serve until cancelled; `ready(port)` is called once the socket listens."""
    state = _State(config)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(state), "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    async with server:
        await server.serve_forever()


class FaultServer:
    """Runs the fault-injecting server in a child process; a context manager.

    `base_url` is ready for `OpenAICompatible(base_url=...)`; `stats()`, `reset()` and `configure(**fields)` talk to
    the running server.
    """

    def __init__(self, **config: Any) -> None:
        self.config = FaultConfig(**config)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> FaultServer:
        env = dict(os.environ)
        # the child must find this thresher even when run from a checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), *sys.path] if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thresher.llms.testing", "--config", json.dumps(asdict(self.config))],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"fault server did not start (said {line!r})")
        self.port = int(line.split()[1])
        while time.monotonic() < deadline:
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("fault server did not answer /stats in time")

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

    def reset(self) -> None:
        self._call("/reset", {})

    def configure(self, **fields: Any) -> None:
        unknown = set(fields) - set(asdict(self.config))
        if unknown:
            raise ValueError(f"unknown fault server settings {sorted(unknown)}; valid: {sorted(asdict(self.config))}")
        for k, v in fields.items():
            setattr(self.config, k, v)
        self._call("/config", fields)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fault-injecting OpenAI-compatible server (127.0.0.1 only)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--config", default="{}", help="FaultConfig fields as JSON")
    args = ap.parse_args(argv)
    config = FaultConfig(**json.loads(args.config))

    def ready(port: int) -> None:
        print(f"port {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.port, ready))


if __name__ == "__main__":
    main()
