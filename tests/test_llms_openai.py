"""OpenAICompatible against the fault-injecting server: window, retries, per-row errors, cache, n, structured
output, rate limits, transports, and a 2,000-request run with 20 % faults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from thresher.errors import BackendError, ConfigError
from thresher.llms import OpenAICompatible, RateLimiter
from thresher.llms.limits import RetryPolicy, retry_after_seconds
from thresher.llms.testing import FaultServer

pytestmark = pytest.mark.usefixtures("isolated_cache")


def backend(server: FaultServer, **kw: object) -> OpenAICompatible:
    kw.setdefault("retry_base_delay", 0.01)
    kw.setdefault("retry_max_delay", 0.05)
    return OpenAICompatible(model="fake-model", base_url=server.base_url, **kw)  # type: ignore[arg-type]


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_usage_and_cost(fault: FaultServer) -> None:
    b = backend(fault, prices={"prompt": 1.0, "completion": 2.0})
    out = b.chat([conv("alpha beta"), conv("gamma")], max_tokens=50)
    assert [o.text for o in out] == ["reply to: alpha beta", "reply to: gamma"]
    assert all(o.ok and o.finish_reasons == ["stop"] for o in out)
    assert out[0].prompt_tokens == 2 and out[0].completion_tokens == 4
    assert b.usage.requests == 2 and b.usage.prompt_tokens == 3 and b.usage.completion_tokens == 7
    assert b.usage.cost_usd == pytest.approx((3 * 1.0 + 7 * 2.0) / 1e6)
    comp = b.complete(["once upon"], max_tokens=3)
    assert comp[0].text == "reply to: once" and comp[0].finish_reasons == ["length"]
    b.close()


def test_sliding_window_keeps_max_concurrency_in_flight(fault: FaultServer) -> None:
    fault.configure(latency=0.1)
    b = backend(fault, max_concurrency=16, cache=False)
    t0 = time.perf_counter()
    out = b.chat([conv(f"q{i}") for i in range(160)], max_tokens=8)
    wall = time.perf_counter() - t0
    assert all(o.ok for o in out)
    st = fault.stats()
    assert st["peak_in_flight"] == 16  # never more than the window, and the window was filled
    assert st["total"] == 160
    # batch-after-batch would also take 10 x 0.1 s here; the bound catches a window that drains between batches
    assert wall < 160 / 16 * 0.1 * 1.6
    b.close()


def test_cache_answers_repeats_and_keys_on_sampling(fault: FaultServer, isolated_cache: Path) -> None:
    b = backend(fault)
    convs = [conv(f"c{i}") for i in range(20)]
    first = b.chat(convs, max_tokens=8, temperature=0.5)
    assert fault.stats()["total"] == 20
    again = backend(fault).chat(convs, max_tokens=8, temperature=0.5)  # a new backend: the cache is on disk
    assert [o.text for o in again] == [o.text for o in first]
    assert all(o.cached == 1 for o in again)
    assert fault.stats()["total"] == 20
    backend(fault).chat(convs[:5], max_tokens=8, temperature=0.9)  # another temperature: another request
    assert fault.stats()["total"] == 25
    assert isolated_cache.exists()
    nocache = backend(fault, cache=False)
    nocache.chat(convs[:3], max_tokens=8, temperature=0.5)
    assert fault.stats()["total"] == 28


def test_n_samples_extend_from_cache_and_seeds(fault: FaultServer) -> None:
    b = backend(fault)
    out = b.chat([conv("poem")], n=3, max_tokens=20)
    assert len(set(out[0].texts)) == 3 and fault.stats()["total"] == 1
    out5 = backend(fault).chat([conv("poem")], n=5, max_tokens=20)
    assert out5[0].texts[:3] == out[0].texts and out5[0].cached == 3
    last = fault.stats()["bodies"][-1]
    assert last["n"] == 2  # only the two missing samples were asked for
    # a server that ignores n (llama.cpp) is asked again for the rest, with seed + sample index
    fault.configure(ignore_n=True)
    fault.reset()
    seeded = backend(fault).chat([conv("seeded")], n=3, seed=7, max_tokens=20)
    assert seeded[0].ok and len(set(seeded[0].texts)) == 3
    assert sorted(bd.get("seed") for bd in fault.stats()["bodies"]) == [7, 8, 9]


@pytest.mark.parametrize("kind", ["429", "500", "drop", "truncate", "invalid_json", "hang"])
def test_each_fault_is_retried(fault: FaultServer, kind: str) -> None:
    fault.configure(retry_after=0, retry_after_ms=5)
    b = backend(fault, timeout=0.5)
    prompt = f"recover [[{kind}x2]]"
    out = b.chat([conv(prompt), conv("bystander")], max_tokens=30)
    assert out[0].ok, out[0].error
    assert out[0].text == f"reply to: {prompt}"
    assert fault.stats()["per_prompt"][prompt] == 3
    assert b.usage.retries == 2 and b.usage.requests == 4


def test_retry_after_is_honoured(fault: FaultServer) -> None:
    fault.configure(retry_after=0, retry_after_ms=400)
    b = backend(fault, retry_base_delay=0.001)
    t0 = time.perf_counter()
    out = b.chat([conv("wait [[429x1]]")], max_tokens=5)
    assert out[0].ok and time.perf_counter() - t0 >= 0.4
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    assert RetryPolicy(base_delay=1.0, max_delay=4.0).delay(10) <= 4.0


def test_failed_rows_carry_errors_and_others_go_on(fault: FaultServer) -> None:
    b = backend(fault, max_retries=3)
    out = b.chat([conv("fine 1"), conv("doomed [[fail]]"), conv("bad [[400]]"), conv("fine 2")], max_tokens=10)
    assert [o.ok for o in out] == [True, False, False, True]
    assert "HTTP 500" in (out[1].error or "") and "gave up after 4 attempts" in (out[1].error or "")
    assert "prompt 1" in (out[1].error or "")
    assert "HTTP 400" in (out[2].error or "") and "not retried" in (out[2].error or "")
    per = fault.stats()["per_prompt"]
    assert per["doomed [[fail]]"] == 4 and per["bad [[400]]"] == 1
    assert b.usage.errors == 2


def test_refused_key_stops_the_call(fault: FaultServer) -> None:
    with pytest.raises(BackendError, match="HTTP 401"):
        backend(fault).chat([conv("who am i [[401]]")] + [conv(f"x{i}") for i in range(5)], max_tokens=5)


class Verdict(BaseModel):
    answer: str
    score: int


def test_structured_output_validates_and_reasks(fault: FaultServer) -> None:
    b = backend(fault)
    out = b.chat([conv("judge this"), conv("judge [[badjson]]")], response_format=Verdict, max_tokens=50)
    assert all(o.ok for o in out), [o.error for o in out]
    assert isinstance(out[0].parsed[0], Verdict) and out[0].parsed[0].answer.startswith("reply to")  # type: ignore[index]
    assert b.usage.reasks == 1
    sent = fault.stats()["bodies"]
    assert sent[0]["response_format"]["type"] == "json_schema"
    assert any(m["role"] == "assistant" for m in sent[-1]["messages"])  # the re-ask carries the bad reply
    strict = backend(fault, max_reasks=0).chat([conv("judge again [[badjson]]")], response_format=Verdict)
    assert not strict[0].ok and "not valid for schema" in (strict[0].error or "")
    # resumed from the cache: the bad first reply and the re-ask's answer both come back without requests
    fault.reset()
    again = backend(fault).chat([conv("judge [[badjson]]")], response_format=Verdict, max_tokens=50)
    assert again[0].ok and fault.stats()["total"] == 0


def test_json_mode_auto_falls_back(fault: FaultServer) -> None:
    fault.configure(reject_json_schema=True)
    b = backend(fault)
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    out = b.chat([conv(f"label {i}") for i in range(4)], response_format=schema, max_tokens=30)
    assert all(o.ok for o in out) and out[0].parsed[0]["label"].startswith("reply")  # type: ignore[index]
    assert b._mode_now == "object+schema"
    with pytest.raises(ConfigError):
        backend(fault, json_mode="yaml")


def test_rate_limit_paces_requests(fault: FaultServer) -> None:
    b = backend(fault, rpm=1200, cache=False)  # 20 per second, a one-second burst
    t0 = time.perf_counter()
    out = b.chat([conv(f"r{i}") for i in range(40)], max_tokens=3)
    assert all(o.ok for o in out)
    assert time.perf_counter() - t0 >= 0.85

    async def tokens() -> float:
        lim = RateLimiter(tpm=12000)  # 200 tokens/s, a one-second burst
        t = time.perf_counter()
        for _ in range(3):
            await lim.acquire(100)
        return time.perf_counter() - t

    assert asyncio.run(tokens()) >= 0.45
    with pytest.raises(ConfigError):
        RateLimiter(rpm=0)


@pytest.mark.parametrize("transport", ["httpx", "openai"])
def test_other_transports(fault: FaultServer, transport: str) -> None:
    b = backend(fault, transport=transport, cache=False, timeout=0.5)
    prompts = ["retried [[500x1]]", "plain", "late [[hangx1]]", "cut [[truncatex1]]", "gone [[dropx1]]"]
    out = b.chat([conv(p) for p in prompts], max_tokens=10)
    assert [o.text for o in out] == [f"reply to: {p}" for p in prompts], [o.error for o in out]
    assert b.usage.retries == 4
    b.close()


def test_two_thousand_requests_with_twenty_percent_faults(fault: FaultServer) -> None:
    fault.configure(
        latency=0.02,
        faults={"429": 0.05, "500": 0.05, "drop": 0.03, "truncate": 0.03, "invalid_json": 0.02, "hang": 0.02},
        retry_after=0,
        retry_after_ms=10,
        seed=3,
    )
    b = backend(fault, max_concurrency=64, timeout=1.0, max_retries=4, cache=False)
    prompts = [f"task {i}" + (" [[fail]]" if i % 100 == 7 else "") for i in range(2000)]
    out = b.chat([conv(p) for p in prompts], max_tokens=20)
    assert len(out) == 2000  # no row lost
    ok = [o for o in out if o.ok]
    failed = [o for o in out if not o.ok]
    assert all(o.text == f"reply to: {p}" for p, o in zip(prompts, out, strict=True) if o.ok)
    assert all(o.error for o in failed) and len(ok) + len(failed) == 2000
    doomed = {i for i in range(2000) if i % 100 == 7}
    assert {i for i, o in enumerate(out) if not o.ok} >= doomed
    st = fault.stats()
    assert st["total"] == b.usage.requests  # every request the client counts, the server saw
    assert sum(st["per_prompt"].values()) == st["total"]
    assert b.usage.requests == 2000 + b.usage.retries
    assert all(st["per_prompt"][prompts[i]] == 5 for i in doomed)
    assert sum(v for k, v in st["outcomes"].items() if k != "ok") >= 0.15 * 2000
    assert st["peak_in_flight"] <= 64


def test_proxy_environment_switches_to_the_httpx_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from thresher.llms.openai_compat import _proxied

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    assert _proxied("https://api.example.com/v1")
    assert not _proxied("https://internal.example/v1")
    assert not _proxied("http://127.0.0.1:8000/v1")


def test_auto_transport_is_lean_for_local_http_and_the_sdk_for_https(monkeypatch) -> None:
    import asyncio

    from thresher.llms import OpenAICompatible
    from thresher.llms.http import LeanTransport, OpenAISDKTransport

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-used")

    async def chosen(url: str) -> type:
        backend = OpenAICompatible(model="m", base_url=url, cache=False).load()
        assert backend._client is not None
        transport, _ = backend._client.for_loop()
        kind = type(transport)
        await transport.aclose()
        return kind

    assert asyncio.run(chosen("http://127.0.0.1:8000/v1")) is LeanTransport
    assert asyncio.run(chosen("https://api.example.invalid/v1")) is OpenAISDKTransport
