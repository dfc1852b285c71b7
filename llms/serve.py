"""`thresher serve`: the embedded llama.cpp model behind an OpenAI-compatible HTTP API, decoding in batches.

llama-cpp-python's own server answers one request at a time, however many are in flight. This one hands every
request to the `LlamaCpp` backend's batched decoder, so 8 clients (or one client with `max_concurrency=8`) share the
decode steps. Several processes (a pipeline, its tests, a notebook) can then share one loaded model.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`. Chat takes messages, max_tokens
(or max_completion_tokens), temperature, top_p, stop, seed, n, logprobs with top_logprobs, logit_bias,
presence_penalty and frequency_penalty as OpenAI defines them, llama.cpp's top_k, min_p, typical_p and
repeat_penalty, and structured output as `{"type": "json_schema", "json_schema": {"schema": ...}}` or llama.cpp's
`{"type": "json_object", "schema": ...}` (a grammar constrains the tokens). Streaming is refused with a 400, as is
any malformed body, with a message that names the field. Sampling defaults are OpenAI's (temperature 1, top_p 1);
top_k 40 and min_p 0.05 are llama.cpp's. Nothing is cached here: clients cache (thresher's request cache).

    thresher serve --port 8080                 # then OPENAI_BASE_URL=http://127.0.0.1:8080/v1
    python -m thresher.llms.serve --port 8080  # the same without the CLI
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

from thresher.llms.llamacpp import LlamaCpp
from thresher.llms.llamacpp_batch import SeqRequest, SeqResult, TokenLogprob
from thresher.llms.local import GenItem
from thresher.llms.structured import Schema

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "logit_bias")  # fmt: skip
_GENERIC_JSON: dict[str, Any] = {"type": "object"}


class BadRequest(Exception):
    """A request the server refuses, with the field at fault (HTTP 400)."""


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _content(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
        raise BadRequest(f"messages[{i}] needs 'role' and 'content'")
    c = m["content"]
    if isinstance(c, list):  # OpenAI content parts: the text ones
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    if c is None:
        c = ""
    if not isinstance(c, str):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
    return {"role": m["role"], "content": c}


class ServedModel:
    """Turns OpenAI request bodies into decoder requests and decoder results into OpenAI responses."""

    def __init__(self, backend: LlamaCpp, name: str) -> None:
        self.backend, self.name = backend, name
        self.requests = 0
        self._lock = threading.Lock()

    def sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's defaults
        t = _number(body, "temperature", 0.0, 2.0)
        if t is not None:
            s["temperature"] = t
        for key, lo, hi in (("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0), ("typical_p", 0.0, 1.0),
                            ("repeat_penalty", 0.0, 10.0), ("presence_penalty", -2.0, 2.0),
                            ("frequency_penalty", -2.0, 2.0)):  # fmt: skip
            v = _number(body, key, lo, hi)
            if v is not None:
                s[key] = v
        k = _integer(body, "top_k", 0, 1_000_000)
        if k is not None:
            s["top_k"] = k
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        if mt is not None:
            if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
                raise BadRequest(f"'max_tokens' must be a positive integer, got {mt!r}")
            s["max_tokens"] = mt
        else:
            s["max_tokens"] = -1  # until a stop or the end of the context, as OpenAI does
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > 16:
                raise BadRequest("'stop' must be a string or a list of up to 16 strings")
            s["stop"] = stop
        lb = body.get("logit_bias")
        if lb is not None:
            try:
                s["logit_bias"] = {int(tok): float(b) for tok, b in dict(lb).items()}
            except (TypeError, ValueError):
                raise BadRequest("'logit_bias' must map token ids to numbers") from None
        return s

    def _requests(self, body: dict[str, Any], messages: list[dict[str, Any]] | None, prompt: str | None,
                  top: int | None) -> list[SeqRequest]:  # fmt: skip
        if body.get("stream"):
            raise BadRequest("'stream' is not supported by this server; send stream=false")
        n = _integer(body, "n", 1, 128) or 1
        seed = _integer(body, "seed", -(2**63), 2**63 - 1)
        base = self.sampling(body)
        schema = self._schema(body.get("response_format")) if messages is not None else None
        reqs = []
        for i in range(n):
            smp = dict(base)
            if seed is not None:
                smp["seed"] = seed + i  # the n choices differ, and each is reproducible
            it = GenItem(messages, prompt, smp, schema)
            try:
                req = self.backend._seq_request(it, top)
            except Exception as e:
                raise BadRequest(str(e)) from e
            if req is None:
                raise BadRequest(f"chat format {self.backend.model_.chat_format!r} has no batched renderer")
            reqs.append(req)
        return reqs

    @staticmethod
    def _schema(rf: Any) -> Schema | None:
        if rf is None:
            return None
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise BadRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'")
        if rf["type"] == "text":
            return None
        if rf["type"] == "json_schema":
            inner = rf.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object")
            return Schema(inner["schema"], str(inner.get("name") or "response"))
        sch = rf.get("schema")
        if sch is not None and not isinstance(sch, dict):
            raise BadRequest("'response_format.schema' must be a JSON schema object")
        return Schema(sch or _GENERIC_JSON, "response")

    def _run(self, reqs: list[SeqRequest]) -> list[SeqResult]:
        decoder = self.backend._batched()
        assert decoder is not None
        futs: list[Future[SeqResult]] = [decoder.submit(r) for r in reqs]
        with self._lock:
            self.requests += 1
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except ValueError as e:  # a prompt longer than the context: the client's to fix
                raise BadRequest(str(e)) from e
        return out

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list")
        messages = [_content(m, i) for i, m in enumerate(msgs)]
        top = None
        if body.get("logprobs"):
            top = _integer(body, "top_logprobs", 0, 20) or 0
        results = self._run(self._requests(body, messages, None, top))
        choices = []
        for i, r in enumerate(results):
            lp = {"content": [_chat_logprob(t) for t in r.logprobs]} if r.logprobs is not None else None
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason, "logprobs": lp})  # fmt: skip
        return self._response("chat.completion", "chatcmpl", choices, results[0].prompt_tokens, results)

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompt' must be a string or a non-empty list of strings")
        if body.get("echo"):
            raise BadRequest("'echo' is not supported by this server")
        top = _integer(body, "logprobs", 0, 20)
        choices: list[dict[str, Any]] = []
        results: list[SeqResult] = []
        prompt_tokens = 0
        for p in prompts:
            rs = self._run(self._requests(body, None, p, top))
            prompt_tokens += rs[0].prompt_tokens
            for r in rs:
                lp = None
                if r.logprobs is not None:
                    lp = {"tokens": [t.token for t in r.logprobs], "token_logprobs": [t.logprob for t in r.logprobs],
                          "top_logprobs": [dict(t.top) for t in r.logprobs]}  # fmt: skip
                choices.append({"index": len(choices), "text": r.text, "finish_reason": r.finish_reason, "logprobs": lp})
                results.append(r)
        return self._response("text_completion", "cmpl", choices, prompt_tokens, results)

    def _response(self, obj: str, prefix: str, choices: list[dict[str, Any]], prompt_tokens: int,
                  results: list[SeqResult]) -> dict[str, Any]:  # fmt: skip
        completion = sum(r.completion_tokens for r in results)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        }


def _chat_logprob(t: TokenLogprob) -> dict[str, Any]:
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.token.encode("utf-8")),
        "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode("utf-8"))} for a, lp in t.top],
    }


def make_server(backend: LlamaCpp, host: str = "127.0.0.1", port: int = 8080, name: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call `serve_forever`) for `backend`, loaded and with its decoder made."""
    if backend.n_parallel < 2:
        raise ValueError("thresher serve needs n_parallel >= 2 (batched decoding)")
    backend.load()
    backend._batched()
    model = ServedModel(backend, name or backend.identity()["model"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line a request is noise at 100 req/s
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, msg: str, kind: str) -> None:
            self._send(status, {"error": {"message": msg, "type": kind, "param": None, "code": None}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                                            "owned_by": "thresher"}]})  # fmt: skip
            elif self.path.rstrip("/") in ("/health", "/v1/health"):
                dec = backend._decoder
                self._send(200, {"status": "ok", "requests": model.requests,
                                 "decode_steps": dec.steps if dec else 0,
                                 "peak_sequences": dec.peak_live if dec else 0,
                                 "reused_prompt_tokens": dec.reused_tokens if dec else 0,
                                 "threads": dec.threads if dec else None})  # fmt: skip
            else:
                self._error(404, f"no route {self.path}", "not_found_error")

        def do_POST(self) -> None:
            route = self.path.rstrip("/").removeprefix("/v1")
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if route == "/chat/completions":
                    self._send(200, model.chat(body))
                elif route == "/completions":
                    self._send(200, model.completion(body))
                else:
                    self._error(404, f"no route {self.path}", "not_found_error")
            except json.JSONDecodeError as e:
                self._error(400, f"the body is not JSON: {e}", "invalid_request_error")
            except BadRequest as e:
                self._error(400, str(e), "invalid_request_error")
            except Exception as e:  # the server stays up; the client sees why
                self._error(500, f"{type(e).__name__}: {e}", "server_error")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


@click.command("serve")
@click.option("--model", default=None, help="A .gguf file (default: the bundled SmolLM2-135M-Instruct).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--name", default=None, help="The model id clients send and /v1/models lists (default: the file name).")
@click.option("--n-ctx", type=int, default=2048, show_default=True, help="Context window of each sequence.")
@click.option("--n-parallel", type=int, default=None, help="Sequences decoded together (default: LlamaCpp's).")
@click.option("--threads", type=int, default=None, help="CPU threads for decoding (default: LlamaCpp's).")
@click.option("--threads-batch", type=int, default=None, help="CPU threads for batches of tokens.")
def serve_command(model: str | None, host: str, port: int, name: str | None, n_ctx: int, n_parallel: int | None,
                  threads: int | None, threads_batch: int | None) -> None:  # fmt: skip
    """Serve the embedded llama.cpp model over an OpenAI-compatible API, decoding requests in batches."""
    kw: dict[str, Any] = {"model_path": model, "n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads_batch,
                          "cache": False}  # fmt: skip
    if n_parallel is not None:
        kw["n_parallel"] = n_parallel
    backend = LlamaCpp(**kw)
    server = make_server(backend, host, port, name)
    address = f"http://{host}:{server.server_address[1]}/v1"
    click.echo(f"thresher serve: {address}, model {backend.identity()['model']}, {backend.n_parallel} sequences at once")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        backend.close()


if __name__ == "__main__":
    serve_command()
