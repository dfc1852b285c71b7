"""The bundled SmolLM2 model: in-process through LlamaCpp, and behind llama-cpp-python's real OpenAI-compatible
server driven by OpenAICompatible (chat, JSON mode, n>1, concurrency). Answers are kept short: ~28 tokens/s."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from thresher.llms import LlamaCpp, OpenAICompatible, make_backend, smollm2_gguf

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
    b = OpenAICompatible(model="smollm2", base_url=llama_server, max_concurrency=4, retry_base_delay=0.05)
    convs = [[{"role": "user", "content": f"Write the number {i} in words."}] for i in range(8)]
    out = b.chat(convs, max_tokens=5, temperature=0)
    assert all(o.ok and o.text for o in out), [o.error for o in out]
    assert b.usage.requests == 8 and b.usage.prompt_tokens > 0
    # JSON: llama.cpp's server refuses `json_schema` (422); auto mode steps down to its json_object + schema
    js = b.chat(
        [[{"role": "user", "content": "A person as JSON: name and age."}]],
        response_format=Person,
        max_tokens=40,
        temperature=0,
    )
    assert js[0].ok, js[0].error
    assert isinstance(js[0].parsed[0], Person)  # type: ignore[index]
    assert b._mode_now == "object+schema"
    # the server answers one choice whatever n says: the rest are asked for with seed + index
    many = b.chat([[{"role": "user", "content": "Pick a fruit."}]], n=2, seed=1, temperature=1.0, max_tokens=4)
    assert many[0].ok and len(many[0].texts) == 2 and all(many[0].texts)
    b.close()
