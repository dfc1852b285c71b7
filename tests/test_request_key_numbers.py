"""Request cache keys see numbers as JSON does: 1 and 1.0 are one request (issue 8, part 4)."""

from __future__ import annotations

from thresher.llms.cache import request_key

IDENT = {"kind": "openai", "model": "m"}
MSGS = [{"role": "user", "content": "Say hi"}]


def test_an_integral_float_and_its_int_share_a_key() -> None:
    assert request_key("chat", IDENT, MSGS, {"temperature": 1}) == request_key("chat", IDENT, MSGS, {"temperature": 1.0})
    assert request_key("chat", IDENT, MSGS, {"temperature": 0}) == request_key("chat", IDENT, MSGS, {"temperature": -0.0})
    assert request_key("chat", IDENT, MSGS, {"max_tokens": 16, "extra": {"top_k": [40.0]}}) == request_key(
        "chat", IDENT, MSGS, {"max_tokens": 16.0, "extra": {"top_k": (40,)}}
    )
    assert request_key("chat", IDENT, MSGS, {"temperature": 0.5}) != request_key("chat", IDENT, MSGS, {"temperature": 1})


def test_bools_stay_distinct_from_ints() -> None:
    assert request_key("chat", IDENT, MSGS, {"logprobs": True}) != request_key("chat", IDENT, MSGS, {"logprobs": 1})
    assert request_key("chat", IDENT, MSGS, {"logprobs": False}) != request_key("chat", IDENT, MSGS, {"logprobs": 0.0})


def test_keys_of_requests_already_in_normal_form_do_not_change() -> None:
    # computed before numbers were normalised: existing caches keep answering these requests
    params = {"temperature": 0.7, "max_tokens": 16, "seed": 3, "stop": ["\n"], "schema": None}
    assert request_key("chat", IDENT, MSGS, params) == "8e981006490030bf66fb153e169dfafc"
    assert request_key("chat", IDENT, MSGS, {"temperature": 1, "max_tokens": 16}) == "7f5476af2cea2c4604ca23a2e51bd8b7"
