r"""The test server's scripted mode, through OpenAICompatible (and the openai SDK once): rule order and roles, regex
templates, per-sample replies, cut-off replies, logprobs, JSON replies, order independence under concurrency, the
unmatched fallback, per-rule stats, and faults on top of a script."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from pydantic import BaseModel

from thresher.llms import OpenAICompatible
from thresher.llms.testing import FaultServer, Rule, check_script

pytestmark = pytest.mark.usefixtures("isolated_cache")


def backend(server: FaultServer, **kw: object) -> OpenAICompatible:
    kw.setdefault("retry_base_delay", 0.01)
    kw.setdefault("retry_max_delay", 0.05)
    kw.setdefault("cache", False)
    return OpenAICompatible(model="fake-model", base_url=server.base_url, **kw)  # type: ignore[arg-type]


def conv(text: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": text}]


def test_first_matching_rule_wins_and_role_chooses_the_text(fault: FaultServer) -> None:
    fault.configure(
        script=[
            Rule(match=r"classification task\?", reply="Yes", name="clf"),
            Rule(match=r"pirate", role="system", reply="Arr"),
            Rule(match=r"^again$", role="last_user", reply="second try"),
            Rule(match=r"task", reply="generic"),
            {"match": "", "reply": "anything else", "name": "rest"},
        ]
    )
    out = backend(fault).chat(
        [
            conv("Is this a classification task?"),  # rules 0 and 3 match: the first wins
            conv("Write a task"),
            conv("hello", system="You are a pirate"),
            conv("a pirate says hello"),  # 'pirate' is in the user turn, not the system one
            [*conv("first"), {"role": "assistant", "content": "x"}, {"role": "user", "content": "again"}],
            conv("again and again"),  # not the whole last user message
        ]
    )
    assert [c.text for c in out] == ["Yes", "generic", "Arr", "anything else", "second try", "anything else"]
    assert fault.stats()["script"]["hits"] == {
        "clf": 1,
        "pirate": 1,
        "^again$": 1,
        "task": 1,
        "rest": 2,
    }


def test_templates_use_the_regex_groups(fault: FaultServer) -> None:
    fault.configure(
        script=[
            Rule(match=r"Rewrite the task: (?P<task>.*)", reply=r"\g<task>, in three steps"),
            Rule(match=r"Tag: (\w+) (\w+)", json={"tags": [r"\1", r"\2"], "n": 2}),
            Rule(match=r"literal (\w+)", reply=r"kept \1 as written", template=False),
            Rule(match=r"broken (\w+)", reply=r"\2 does not exist"),
        ]
    )
    out = backend(fault, max_retries=0).chat(
        [conv("Rewrite the task: sort a list"), conv("Tag: math algebra"), conv("literal x"), conv("broken y")]
    )
    assert out[0].text == "sort a list, in three steps"
    assert json.loads(out[1].text or "") == {"tags": ["math", "algebra"], "n": 2}
    assert out[2].text == r"kept \1 as written"
    assert out[3].error is not None and "template does not fit" in out[3].error


def test_list_replies_give_one_per_sample(fault: FaultServer) -> None:
    replies = ["9. Name a fruit.", "9. Add two numbers.", "9. Sort a list."]
    fault.configure(
        script=[
            Rule(match="^user: continue", reply=replies),
            Rule(match="^user: hashed", reply=replies, pick="hash"),
            Rule(match="^user: cycled", reply=replies, pick="cycle"),
        ]
    )
    b = backend(fault)
    assert b.chat([conv("continue")], n=4)[0].texts == [*replies, replies[0]]
    assert fault.stats()["script"]["samples"]["^user: continue"] == 4
    # seed s asks for samples s, s+1, ...; a server that ignores n is asked again with seed+1, +2 (as the client does)
    assert b.chat([conv("continue")], n=2, seed=1)[0].texts == replies[1:]
    fault.configure(ignore_n=True)
    assert b.chat([conv("continue")], n=4, seed=0)[0].texts == [*replies, replies[0]]
    fault.configure(ignore_n=False)

    hashed = b.chat([conv("hashed")], n=8)[0].texts
    assert set(hashed) <= set(replies) and len(set(hashed)) > 1
    assert b.chat([conv("hashed")], n=8)[0].texts == hashed  # a function of (conversation, sample, server seed)

    cycled = [b.chat([conv("cycled")])[0].text for _ in range(4)]  # the k-th answer to the same conversation
    assert cycled == [*replies, replies[0]]
    assert b.chat([conv("cycled")], n=2)[0].texts == replies[1:]
    fault.reset()  # zeroes the cycle too
    assert b.chat([conv("cycled")])[0].text == replies[0]


def test_finish_reason_length_and_cut_off_replies(fault: FaultServer) -> None:
    fault.configure(
        script=[
            Rule(match="forced", reply="9. A task that stops in the", finish_reason="length"),
            Rule(match="long", reply="9. Name a fruit.\n10. Add two numbers."),
            Rule(match="mixed", reply=["whole", {"text": "cut", "finish_reason": "length"}]),
        ]
    )
    b = backend(fault)
    forced = b.chat([conv("forced")])[0]
    assert (forced.text, forced.finish_reasons) == ("9. A task that stops in the", ["length"])
    cut = b.chat([conv("long")], max_tokens=5)[0]
    assert (cut.text, cut.finish_reasons) == ("9. Name a fruit.\n10.", ["length"])  # the line break stays
    whole = b.chat([conv("long")], max_tokens=50)[0]
    assert (whole.text, whole.finish_reasons) == ("9. Name a fruit.\n10. Add two numbers.", ["stop"])
    mixed = b.chat([conv("mixed")], n=2)[0]
    assert (mixed.texts, mixed.finish_reasons) == (["whole", "cut"], ["stop", "length"])


JUDGE_LOGPROBS = [
    {"token": "Score", "logprob": -0.01},
    {"token": ":", "logprob": 0.0},
    {"token": " 4", "logprob": -0.4, "top_logprobs": {" 4": -0.4, " 5": -1.2, " 3": -2.5}},
]


def test_logprobs_are_returned_and_parsed_by_the_client(fault: FaultServer) -> None:
    fault.configure(
        script=[
            Rule(match="Rate", reply="Score: 4", logprobs=JUDGE_LOGPROBS, name="judge"),
            Rule(match="plain", reply="two words"),
        ]
    )
    b = backend(fault)
    got = b.chat([conv("Rate this answer")], logprobs=True, top_logprobs=2)[0]
    assert got.text == "Score: 4" and got.logprobs is not None
    content = got.logprobs[0]
    assert [e["token"] for e in content] == ["Score", ":", " 4"]
    assert content[0]["logprob"] == -0.01 and content[0]["top_logprobs"] == []
    tops = content[2]["top_logprobs"]
    assert [(t["token"], t["logprob"]) for t in tops] == [(" 4", -0.4), (" 5", -1.2)]  # cut to top_logprobs=2
    weights = {int(t["token"]): math.exp(t["logprob"]) for t in tops}
    expected = sum(k * w for k, w in weights.items()) / sum(weights.values())
    assert expected == pytest.approx((4 * math.exp(-0.4) + 5 * math.exp(-1.2)) / (math.exp(-0.4) + math.exp(-1.2)))

    # no logprobs asked: none sent; a rule without scripted logprobs: one 0.0 entry per word
    assert b.chat([conv("Rate this answer")])[0].logprobs is None
    auto = b.chat([conv("plain")], logprobs=True, top_logprobs=1)[0].logprobs
    assert auto is not None
    word = [{"token": t, "logprob": 0.0, "bytes": list(t.encode())} for t in ("two", " words")]
    assert auto[0] == [{**w, "top_logprobs": [w]} for w in word]

    # /v1/completions: the raw prompt is matched and the legacy logprobs form comes back
    done = b.complete(["Rate: the text"], logprobs=True, top_logprobs=3)[0]
    assert done.text == "Score: 4" and done.logprobs is not None
    legacy = done.logprobs[0]
    assert legacy["tokens"] == ["Score", ":", " 4"] and legacy["token_logprobs"] == [-0.01, 0.0, -0.4]
    assert legacy["top_logprobs"][2] == {" 4": -0.4, " 5": -1.2, " 3": -2.5}


class Tags(BaseModel):
    tags: list[str]
    domain: str


def test_json_replies_validate_against_a_response_format(fault: FaultServer) -> None:
    fault.configure(
        script=[
            # the re-ask is the last user turn: answer it properly
            Rule(match="cannot be used", role="last_user", json={"tags": ["fixed"], "domain": "x"}, name="reask"),
            Rule(match=r"Tag this: (\w+)", json={"tags": [r"\1", "code"], "domain": "programming"}, name="tag"),
            Rule(match=r"Tag badly", reply='{"tags": "not a list"}', name="bad"),
        ]
    )
    b = backend(fault)
    out = b.chat([conv("Tag this: python"), conv("Tag badly")], response_format=Tags)
    assert out[0].parsed == [Tags(tags=["python", "code"], domain="programming")]
    assert out[1].parsed == [Tags(tags=["fixed"], domain="x")]  # invalid, re-asked, valid
    assert fault.stats()["script"]["hits"] == {"reask": 1, "tag": 1, "bad": 1}
    assert b.usage.reasks == 1


def test_answers_do_not_depend_on_the_order_requests_arrive_in(fault: FaultServer) -> None:
    fault.configure(
        latency_jitter=0.03,
        script=[
            Rule(match=r"^user: item (\d+)$", reply=[r"A\1", r"B\1", r"C\1", r"D\1"], pick="hash"),
            Rule(match=r"^user: sample (\d+)$", reply=[r"first \1", r"second \1"]),
        ],
    )
    prompts = [f"item {i}" for i in range(150)] + [f"sample {i}" for i in range(50)]

    def run(order: list[str], concurrency: int) -> dict[str, list[str | None]]:
        out = backend(fault, max_concurrency=concurrency).chat([conv(p) for p in order], n=2)
        assert all(c.ok for c in out)
        return {p: c.texts for p, c in zip(order, out, strict=True)}

    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    first = run(prompts, 64)
    assert run(shuffled, 7) == first == run(prompts[::-1], 200)
    assert first["sample 3"] == ["first 3", "second 3"]
    assert {t[0] for p, texts in first.items() if p.startswith("item") for t in texts if t} == set("ABCD")
    assert all(t and t[1:] == p.split()[1] for p, texts in first.items() if p.startswith("item") for t in texts)
    assert fault.stats()["script"]["samples"] == {r"^user: item (\d+)$": 900, r"^user: sample (\d+)$": 300}


def test_unmatched_requests_fail_alone_or_get_the_echo(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match="^user: known$", reply="scripted")])
    b = backend(fault)
    out = b.chat([conv("known"), conv("unknown prompt")])
    assert out[0].text == "scripted"
    assert out[1].error is not None and "no script rule matched" in out[1].error and "HTTP 501" in out[1].error
    st = fault.stats()
    assert st["per_prompt"]["unknown prompt"] == 1  # not retried
    assert st["script"]["unmatched"] == 1
    fault.configure(unmatched="echo")
    assert b.chat([conv("unknown prompt")])[0].text == "reply to: unknown prompt"
    assert fault.stats()["script"]["unmatched"] == 2
    fault.configure(script=[])  # no script: everything gets the echo, whatever `unmatched` says
    fault.configure(unmatched="error")
    assert b.chat([conv("known")])[0].text == "reply to: known"


def test_stats_count_requests_and_samples_per_rule(fault: FaultServer) -> None:
    fault.configure(
        script=[
            Rule(match="classification task", reply="No", name="is_clf"),
            Rule(match="^user: 1\\.", reply="9. A new task.", name="grow"),
        ]
    )
    b = backend(fault)
    b.chat([conv(f"Task {i}: is this a classification task?") for i in range(5)])
    b.chat([conv(f"1. seed {i}") for i in range(3)], n=2)
    script = fault.stats()["script"]
    assert script == {"hits": {"is_clf": 5, "grow": 3}, "samples": {"is_clf": 5, "grow": 6}, "unmatched": 0}
    fault.reset()
    assert fault.stats()["script"]["hits"] == {"is_clf": 0, "grow": 0}
    fault.configure(script=[Rule(match="x", reply="y")])  # a new script starts from zero, under its own names
    assert fault.stats()["script"] == {"hits": {"x": 0}, "samples": {"x": 0}, "unmatched": 0}


def test_faults_come_first_then_the_scripted_answer(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match=r"Rate (\w+)", reply=r"Score: 4 for \1", name="judge")])
    b = backend(fault, max_retries=8, timeout=0.5)
    out = b.chat([conv("Rate this [[500x1]]")])[0]
    assert out.text == "Score: 4 for this"
    st = fault.stats()
    assert st["per_prompt"]["Rate this [[500x1]]"] == 2 and st["outcomes"] == {"500": 1, "ok": 1}
    assert st["script"]["hits"]["judge"] == 1  # the failed attempt got no scripted answer

    fault.reset()
    fault.configure(faults={"500": 0.15, "truncate": 0.1, "drop": 0.05})
    many = b.chat([conv(f"Rate r{i}") for i in range(60)], max_tokens=50)
    assert [c.text for c in many] == [f"Score: 4 for r{i}" for i in range(60)]
    st = fault.stats()
    assert st["total"] > 60 and st["script"]["hits"]["judge"] == 60  # truncated answers are not counted


def test_bad_rules_fail_in_the_test_process(fault: FaultServer) -> None:
    bad: list[tuple[object, str]] = [
        ({"match": "(", "reply": "x"}, "not a valid regex"),
        ({"match": "a", "reply": "x", "role": "tool"}, "role 'tool' is not one of"),
        ({"match": "a", "reply": "x", "pick": "random"}, "pick 'random' is not one of"),
        ({"match": "a"}, "exactly one of 'reply'"),
        ({"match": "a", "reply": "x", "json": {}}, "exactly one of 'reply'"),
        ({"match": "a", "reply": []}, "empty list"),
        ({"match": "a", "reply": [3]}, "reply[0] must be a text or a dict"),
        ({"match": "a", "reply": "x", "colour": "red"}, "unknown fields ['colour']"),
        ({"match": "a", "reply": "x", "logprobs": [{"token": "x"}]}, "needs a string 'token' and a 'logprob'"),
        ({"match": "a", "reply": "x", "usage": {"tokens": 3}}, "usage must map"),
    ]
    for rule, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_script([rule])
    with pytest.raises(ValueError, match="rules 0 and 1 share the name 'a'"):
        check_script([Rule(match="a", reply="x"), Rule(match="b", reply="y", name="a")])
    with pytest.raises(ValueError, match="script rule 0"):
        fault.configure(script=[{"match": "("}])
    with pytest.raises(ValueError, match="unmatched 'ignore'"):
        fault.configure(unmatched="ignore")
    with pytest.raises(ValueError, match="not a valid regex"):
        FaultServer(script=[Rule(match="[", reply="x")])
    lp = [{"token": "x", "logprob": -1, "top_logprobs": {"x": -1}}]
    rule = Rule(match="a", reply=["x", "y"], pick="cycle", logprobs=lp)
    assert rule.to_dict() == {"match": "a", "reply": ["x", "y"], "pick": "cycle", "logprobs": lp}  # defaults left out
    top = [{"token": "x", "logprob": -1.0}]
    assert check_script([rule])[0]["logprobs"] == [{"token": "x", "logprob": -1.0, "top_logprobs": top}]


def test_the_openai_sdk_reads_scripted_answers(fault: FaultServer) -> None:
    openai = pytest.importorskip("openai")
    fault.configure(
        script=[
            Rule(match="Rate", reply=["Score: 4", "Score: 5"], logprobs=JUDGE_LOGPROBS),
            Rule(match="Tag", json={"tags": ["a"]}, finish_reason="stop"),
        ]
    )
    client = openai.OpenAI(base_url=fault.base_url, api_key="not-needed", max_retries=0)
    got = client.chat.completions.create(
        model="fake-model", messages=conv("Rate this"), n=2, logprobs=True, top_logprobs=3
    )
    assert [c.message.content for c in got.choices] == ["Score: 4", "Score: 5"]
    assert [c.finish_reason for c in got.choices] == ["stop", "stop"]
    content = got.choices[0].logprobs.content
    assert [t.token for t in content[2].top_logprobs] == [" 4", " 5", " 3"]
    assert content[2].top_logprobs[1].logprob == -1.2
    tagged = client.chat.completions.create(
        model="fake-model", messages=conv("Tag it"), response_format={"type": "json_object"}
    )
    assert json.loads(tagged.choices[0].message.content or "") == {"tags": ["a"]}
