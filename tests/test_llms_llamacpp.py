"""The bundled SmolLM2 model: in-process through LlamaCpp, and behind `thresher serve` (the OpenAI-compatible
server that decodes in batches) driven by OpenAICompatible (chat, JSON mode, n>1, logprobs, concurrency)."""

from __future__ import annotations

import itertools
import json
import urllib.request

import pytest
from pydantic import BaseModel

from thresher.llms import LlamaCpp, OpenAICompatible, make_backend, smollm2_gguf
from thresher.llms.cpu_threads import usable_cores

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


class Person(BaseModel):
    name: str
    age: int


def test_bundled_model_is_found_without_download() -> None:
    p = smollm2_gguf()
    assert p.suffix == ".gguf" and p.stat().st_size > 50_000_000


def test_llamacpp_chat_cache_and_json() -> None:
    b = make_backend(None)
    assert isinstance(b, LlamaCpp)
    convs = [[{"role": "user", "content": "Name one colour."}], [{"role": "user", "content": "Say hello."}]]
    out = b.chat(convs, max_tokens=6, temperature=0)
    assert all(o.ok and o.text for o in out)
    assert b.usage.requests == 2 and b.usage.completion_tokens > 0
    again = LlamaCpp().chat(convs, max_tokens=6, temperature=0)
    assert [o.text for o in again] == [o.text for o in out] and all(o.cached == 1 for o in again)
    js = b.chat(
        [[{"role": "user", "content": "Give a person as JSON with a name and an age."}]],
        response_format=Person,
        max_tokens=40,
        temperature=0,
    )
    assert js[0].ok, js[0].error
    assert isinstance(js[0].parsed[0], Person)  # type: ignore[index]
    comp = b.complete(["The sky is"], max_tokens=4, temperature=0)
    assert comp[0].ok and comp[0].text is not None
    assert b.identity()["model"] == smollm2_gguf().name and len(b.identity()["digest"]) == 24


def test_llamacpp_prompt_too_long_is_a_row_error() -> None:
    b = LlamaCpp(n_ctx=64, cache=False)
    out = b.chat(
        [[{"role": "user", "content": "word " * 200}], [{"role": "user", "content": "Hi"}]], max_tokens=3, temperature=0
    )
    assert not out[0].ok and "LlamaCpp failed" in (out[0].error or "")
    assert out[1].ok


def test_llama_server_chat_json_n_and_concurrency(llama_server: str) -> None:
    b = OpenAICompatible(model="smollm2", base_url=llama_server, max_concurrency=8, retry_base_delay=0.05)
    convs = [[{"role": "user", "content": f"Write the number {i} in words, please {i}."}] for i in range(8)]
    out = b.chat(convs, max_tokens=5, temperature=0)
    assert all(o.ok and o.text for o in out), [o.error for o in out]
    assert b.usage.requests == 8 and b.usage.prompt_tokens > 0
    with urllib.request.urlopen(llama_server.removesuffix("/v1") + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["peak_sequences"] > 1  # the 8 requests in flight were decoded together
    assert 1 <= health["threads"] <= usable_cores()  # chosen by measured speed (cpu_threads.ThreadTuner)
    # JSON: the server takes OpenAI's json_schema form and turns the schema into a grammar
    js = b.chat(
        [[{"role": "user", "content": "A person as JSON: name and age."}]],
        response_format=Person,
        max_tokens=40,
        temperature=0,
    )
    assert js[0].ok, js[0].error
    assert isinstance(js[0].parsed[0], Person)  # type: ignore[index]
    assert b._mode_now == "schema"
    many = b.chat([[{"role": "user", "content": "Pick a fruit."}]], n=2, seed=1, temperature=1.0, max_tokens=4)
    assert many[0].ok and len(many[0].texts) == 2 and all(many[0].texts)
    lp = b.chat([[{"role": "user", "content": "Rate it from 1 to 6."}]], max_tokens=2, temperature=0, logprobs=True,
                top_logprobs=5)  # fmt: skip
    first = lp[0].logprobs[0][0]  # type: ignore[index]
    assert len(first["top_logprobs"]) == 5 and first["token"] == first["top_logprobs"][0]["token"]
    assert all(a["logprob"] >= b["logprob"] for a, b in itertools.pairwise(first["top_logprobs"]))
    b.close()
