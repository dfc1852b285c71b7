r"""A fault-injecting OpenAI-compatible HTTP server for tests and benchmarks (127.0.0.1 only).

A real server that misbehaves on purpose beats a mock object: the client under test goes through its whole HTTP
stack. The server speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) on a bare asyncio Protocol, so
one process answers thousands of requests per second and is never the bottleneck of a client benchmark. It runs in
its own process (`FaultServer` starts it and talks to it over HTTP), so its work does not share the client's GIL.

Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `GET /v1/models`, the Files and Batches
endpoints of the Batch API (`thresher.llms.testing_batch`), vLLM's `POST /v1/load_lora_adapter` (an adapter folder is
checked for its adapter_config.json and its name then listed by /v1/models); control:
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

Scripted mode. Unscripted, a chat or completion request gets an echo ("reply to: <prompt>", or a small instance of
the asked JSON schema). `script`, an ordered list of `Rule`s (or their dicts; first match wins), makes every answer
known in advance, so tests of pool growth, elimination and parsing can assert exact outcomes:
- `match` is a regex (`re.search`; inline flags such as `(?s)`, `(?i)`) over the text `role` names: `any` (default)
  every message as a `role: content` line; `user` / `system` / `assistant` that role's messages joined by newlines
  (none: no match); `last_user` the last user message (a re-ask, for instance). A `/v1/completions` request offers
  its raw prompt to `any`, `user` and `last_user`. Embedding requests are never scripted.
- the answer is `reply` (a text) or `json` (a value, sent as JSON text: for response_format requests). Texts, and
  the strings inside `json`, are `re.Match.expand` templates (`\1`, `\g<name>`) unless `template=False`.
- a list of replies gives one per sample, chosen by `pick`: `sample` (default) sample s gets `replies[s % len]`,
  where s = the request's seed (0 when unset) + the choice index, which is the sample index OpenAICompatible asks
  for when its seed is 0 or unset (it sends seed + s for sample s); `hash` by a hash of (server seed, conversation,
  s); `cycle` the k-th reply the rule gives the same conversation is `replies[k % len]` (so among identical
  conversations, arrival order decides). Entries may be dicts `{"text" | "json", "finish_reason", "logprobs"}`.
- `finish_reason` (e.g. "length") is sent with the text whole; unset, a reply longer than `max_tokens` words is cut
  there with "length", else "stop". `usage` ({prompt_tokens, completion_tokens}) replaces the counted tokens.
- when a request asks for logprobs, each choice carries `logprobs`: the rule's (OpenAI's chat form, a list of
  `{token, logprob, top_logprobs}` with `top_logprobs` a list of `{token, logprob}` or a `{token: logprob}` dict,
  cut to the request's `top_logprobs`), or one 0.0 entry per word; /v1/completions gets the legacy form.
- vLLM's `prompt_logprobs` (a /v1/completions request that asks for them, its prompt given as token ids) are answered
  from the `prompt_logprobs` setting: a list of `{"ids", "logprobs"}` (the log-probability of each token after the
  ones before it, the first None); a prompt that is the start of an entry's ids gets that entry's values, any other
  a 501. Scripts and the echo never answer those requests.
- a request no rule matches gets `unmatched`: "error" (default: HTTP 501 "no script rule matched", which clients
  neither retry nor take for a refused response_format, so only that row fails) or "echo".
Faults come first: a `[[500x1]]` marker still fails the first attempt and the retry gets the scripted answer.
`stats()["script"]` has per rule name (default: its `match`) the requests it answered (`hits`) and the choices
(`samples`), and the count of `unmatched` requests; `reset()` zeroes them, as does a new script.

    script = [
        Rule(match=r"classification task\?", reply="No", name="is_clf"),
        Rule(match=r"(?m)^8\. ", reply=["9. Name a fruit.\n10. Name a tool.", "9. Add two numbers."]),
        Rule(match=r"Rewrite: (.*)", role="last_user", reply=r"\1, in three steps"),
        Rule(match="Rate", reply="Score: 4", logprobs=[{"token": "Score", "logprob": 0.0},
             {"token": ":", "logprob": 0.0}, {"token": " 4", "logprob": -0.3, "top_logprobs": {" 4": -0.3, " 5": -1.4}}]),
        Rule(match="Tag", json={"tags": ["math"]}),
    ]
    with FaultServer(script=script) as server:  # or server.configure(script=script, unmatched="echo")
        ...
        assert server.stats()["script"]["hits"]["is_clf"] == 20
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
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
    script: list[dict[str, Any]] = field(default_factory=list)  # scripted answers: `Rule.to_dict()`s, first match wins
    unmatched: str = "error"  # what a request no rule matches gets when there is a script: "error" (501) or "echo"
    # vLLM's prompt_logprobs: token sequences with the log-probability of each token after the ones before it
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    # the Batch API (`thresher.llms.testing_batch`): status polls until a job finishes, how it ends, upload limits
    batch_polls: int = 1
    batch_outcome: str = "completed"
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    # vLLM's runtime LoRA loading (`POST /v1/load_lora_adapter`): False answers 404, as a vLLM started without
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING does
    lora_updating: bool = True


ROLES = ("any", "user", "last_user", "system", "assistant")
PICKS = ("sample", "hash", "cycle")
UNMATCHED = ("error", "echo")
_REPLY_KEYS = ("text", "json", "finish_reason", "logprobs")
_USAGE_KEYS = ("prompt_tokens", "completion_tokens")


@dataclass
class Rule:
    """One scripted answer (see the module docstring): when `match` finds the `role` text, answer `reply` or `json`.

    `reply` is a text or a list of replies (texts or `{"text" | "json", "finish_reason", "logprobs"}` dicts) of which
    `pick` ("sample", "hash", "cycle") chooses one per sample. `name` (default: `match`) keys the rule's stats.
    """

    match: str
    reply: str | list[str | dict[str, Any]] | None = None
    json: Any = None  # a JSON value to answer with instead of `reply` (a JSON `null` needs the dict form)
    role: str = "any"
    pick: str = "sample"
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    usage: dict[str, int] | None = None
    template: bool = True
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The rule as the server takes it: `match` and every field that differs from its default."""
        out: dict[str, Any] = {"match": self.match}
        for f in dataclass_fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value
        return out


_RULE_KEYS = tuple(f.name for f in dataclass_fields(Rule))


def _check_logprobs(where: str, entries: Any) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise ValueError(f"{where}: logprobs must be a list of {{token, logprob, top_logprobs}}, got {entries!r}")
    out = []
    for j, e in enumerate(entries):
        if not isinstance(e, Mapping) or not isinstance(e.get("token"), str) or "logprob" not in e:
            raise ValueError(f"{where}: logprobs[{j}] needs a string 'token' and a 'logprob', got {e!r}")
        tops = e.get("top_logprobs") or []
        if isinstance(tops, Mapping):
            tops = [{"token": t, "logprob": lp} for t, lp in tops.items()]
        try:
            top_list = [{"token": str(t["token"]), "logprob": float(t["logprob"])} for t in tops]
            out.append({"token": e["token"], "logprob": float(e["logprob"]), "top_logprobs": top_list})
        except (TypeError, KeyError, ValueError):
            raise ValueError(
                f"{where}: logprobs[{j}] has a bad logprob or top_logprobs (a list of {{token, logprob}} or a "
                f"{{token: logprob}} dict), got {e!r}"
            ) from None
    return out


def check_script(script: Any) -> list[dict[str, Any]]:
    """The rules as plain JSON-able dicts, checked, so a bad rule fails in the test's process and names its index."""
    if isinstance(script, (str, bytes, Mapping)) or not isinstance(script, Sequence):
        raise ValueError(f"script: expected a list of rules (Rule or dict), got {type(script).__name__}")
    out: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    for i, r in enumerate(script):
        if isinstance(r, Rule):
            d = r.to_dict()
        elif isinstance(r, Mapping):
            d = dict(r)
        else:
            raise ValueError(f"script rule {i}: expected a Rule or a dict, got {type(r).__name__}")
        where = f"script rule {i}"
        unknown = set(d) - set(_RULE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}; valid: {list(_RULE_KEYS)}")
        if not isinstance(d.get("match"), str):
            raise ValueError(f"{where}: 'match' must be a regex string, got {d.get('match')!r}")
        try:
            re.compile(d["match"])
        except re.error as e:
            raise ValueError(f"{where}: 'match' {d['match']!r} is not a valid regex: {e}") from None
        where = f"script rule {i} ({d['match']!r})"
        for key, valid in (("role", ROLES), ("pick", PICKS)):
            if key in d and d[key] not in valid:
                raise ValueError(f"{where}: {key} {d[key]!r} is not one of {list(valid)}")
        has_reply, has_json = d.get("reply") is not None, "json" in d
        if has_reply == has_json:
            raise ValueError(f"{where}: give exactly one of 'reply' (text or list of replies) or 'json'")
        if has_reply:
            replies = list(d["reply"]) if isinstance(d["reply"], list) else [d["reply"]]
            if not replies:
                raise ValueError(f"{where}: 'reply' is an empty list")
            for j, item in enumerate(replies):
                if isinstance(item, str):
                    continue
                if (
                    not isinstance(item, Mapping)
                    or set(item) - set(_REPLY_KEYS)
                    or ("text" in item) == ("json" in item)
                ):
                    raise ValueError(
                        f"{where}: reply[{j}] must be a text or a dict with one of 'text'/'json' and optional "
                        f"'finish_reason', 'logprobs'; got {item!r}"
                    )
                if "text" in item and not isinstance(item["text"], str):
                    raise ValueError(f"{where}: reply[{j}]['text'] must be a string, got {item['text']!r}")
                if item.get("logprobs") is not None:
                    replies[j] = {**item, "logprobs": _check_logprobs(f"{where}: reply[{j}]", item["logprobs"])}
            d["reply"] = replies if isinstance(d["reply"], list) else replies[0]
        if d.get("finish_reason") is not None and not isinstance(d["finish_reason"], str):
            raise ValueError(f"{where}: finish_reason must be a string such as 'stop' or 'length'")
        if d.get("logprobs") is not None:
            d["logprobs"] = _check_logprobs(where, d["logprobs"])
        usage = d.get("usage")
        if usage is not None and (
            not isinstance(usage, Mapping)
            or set(usage) - set(_USAGE_KEYS)
            or not all(isinstance(v, int) for v in usage.values())
        ):
            raise ValueError(f"{where}: usage must map {list(_USAGE_KEYS)} to integers, got {usage!r}")
        if not isinstance(d.get("template", True), bool):
            raise ValueError(f"{where}: template must be True or False")
        name = d.get("name") or d["match"]
        if not isinstance(name, str):
            raise ValueError(f"{where}: name must be a string, got {name!r}")
        if name in names:
            raise ValueError(f"script rules {names[name]} and {i} share the name {name!r}; give one a distinct 'name'")
        names[name] = i
        try:
            out.append(json.loads(json.dumps(d)))  # it must cross to the server process as JSON
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: not JSON-serializable ({e})") from None
    return out


def check_prompt_logprobs(table: Any) -> list[dict[str, Any]]:
    """The prompt_logprobs table as plain dicts: each `{"ids": [token ids], "logprobs": [None, lp1, lp2, ...]}`."""
    if isinstance(table, (str, bytes, Mapping)) or not isinstance(table, Sequence):
        raise ValueError(f"prompt_logprobs: expected a list of {{ids, logprobs}}, got {type(table).__name__}")
    out = []
    for i, entry in enumerate(table):
        ids = entry.get("ids") if isinstance(entry, Mapping) else None
        lps = entry.get("logprobs") if isinstance(entry, Mapping) else None
        if (
            not isinstance(ids, list)
            or not isinstance(lps, list)
            or len(ids) != len(lps)
            or not all(isinstance(t, int) for t in ids)
            or not all(v is None or isinstance(v, (int, float)) for v in lps)
        ):
            raise ValueError(
                f"prompt_logprobs[{i}]: needs 'ids' (token ids) and 'logprobs' (as many numbers, the first may be "
                f"None), got {entry!r}"
            )
        out.append({"ids": list(ids), "logprobs": [None if v is None else float(v) for v in lps]})
    return out


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with `script` and `prompt_logprobs` checked and made plain; `unmatched` checked."""
    out = dict(settings)
    if "prompt_logprobs" in out:
        out["prompt_logprobs"] = check_prompt_logprobs(out["prompt_logprobs"] or [])
    if "script" in out:
        out["script"] = check_script(out["script"] if out["script"] is not None else [])
    if "unmatched" in out and out["unmatched"] not in UNMATCHED:
        raise ValueError(f"unmatched {out['unmatched']!r} is not one of {list(UNMATCHED)}")
    from thresher.llms.testing_batch import OUTCOMES

    if "batch_outcome" in out and out["batch_outcome"] not in OUTCOMES:
        raise ValueError(f"batch_outcome {out['batch_outcome']!r} is not one of {list(OUTCOMES)}")
    return out


@dataclass
class _Rule:
    """A checked rule, compiled, as the server uses it."""

    name: str
    regex: re.Pattern[str]
    role: str
    pick: str
    replies: list[dict[str, Any]]  # each {"text"} or {"json"}, with optional "finish_reason", "logprobs"
    finish_reason: str | None
    logprobs: list[dict[str, Any]] | None
    usage: dict[str, int] | None
    template: bool

    @classmethod
    def of(cls, d: dict[str, Any]) -> _Rule:
        if "json" in d:
            replies = [{"json": d["json"]}]
        else:
            raw = d["reply"] if isinstance(d["reply"], list) else [d["reply"]]
            replies = [{"text": r} if isinstance(r, str) else dict(r) for r in raw]
        return cls(
            name=d.get("name") or d["match"],
            regex=re.compile(d["match"]),
            role=d.get("role", "any"),
            pick=d.get("pick", "sample"),
            replies=replies,
            finish_reason=d.get("finish_reason"),
            logprobs=d.get("logprobs"),
            usage=d.get("usage"),
            template=d.get("template", True),
        )


def _content(m: Mapping[str, Any]) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else json.dumps(c)


def _role_text(body: dict[str, Any], chat: bool, role: str) -> str | None:
    """The text a rule of `role` searches; None when the request has none (the rule cannot match)."""
    if not chat:
        p = body.get("prompt", "")
        p = (p[0] if p else "") if isinstance(p, list) else p
        return str(p) if role in ("any", "user", "last_user") else None
    msgs = [m for m in body.get("messages", []) if isinstance(m, Mapping)]
    if role == "any":
        return "\n".join(f"{m.get('role')}: {_content(m)}" for m in msgs)
    if role == "last_user":
        users = [_content(m) for m in msgs if m.get("role") == "user"]
        return users[-1] if users else None
    parts = [_content(m) for m in msgs if m.get("role") == role]
    return "\n".join(parts) if parts else None


def _expand(value: Any, m: re.Match[str]) -> Any:
    """`value` with every string in it expanded as a template of the match."""
    if isinstance(value, str):
        return m.expand(value)
    if isinstance(value, list):
        return [_expand(v, m) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, m) for k, v in value.items()}
    return value


def _cut(text: str, max_tokens: int) -> str | None:
    """`text` cut after its `max_tokens`-th word, or None when it is not longer than that."""
    ends = [w.end() for w in re.finditer(r"\S+", text)]
    return text[: ends[max_tokens - 1]] if len(ends) > max_tokens else None


def _chat_logprobs(entries: list[dict[str, Any]] | None, text: str, k: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` for a choice: the scripted entries, or one 0.0 entry per word of `text`."""
    if entries is None:
        entries = [
            {"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]}
            for t in re.findall(r"\s*\S+", text)
        ]

    def tok(t: dict[str, Any]) -> dict[str, Any]:
        return {"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}

    return {"content": [{**tok(e), "top_logprobs": [tok(t) for t in e["top_logprobs"][:k]]} for e in entries]}


def _legacy_logprobs(chat_form: dict[str, Any]) -> dict[str, Any]:
    """The /v1/completions form of the same log-probabilities."""
    content = chat_form["content"]
    offsets, pos = [], 0
    for e in content:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in content],
        "text_offset": offsets,
    }


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
        if p and all(isinstance(t, int) for t in p):  # one prompt given as token ids
            return json.dumps(p)
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
        self.rules: list[_Rule] = []
        self.hits: Counter[str] = Counter()  # rule name -> requests it answered
        self.samples: Counter[str] = Counter()  # rule name -> choices it gave
        self.unmatched = 0
        self.given: Counter[tuple[int, str]] = Counter()  # (rule index, conversation) -> replies given (pick="cycle")
        self.routes: Counter[str] = Counter()  # "METHOD /path" (ids as :id) -> HTTP requests, control ones aside
        from thresher.llms.testing_batch import BatchDesk

        self.desk = BatchDesk(config)  # files and batch jobs: they outlive reset()
        self.loras: dict[str, str] = {}  # LoRA adapters loaded at run time: name -> path (they outlive reset())
        self.set_script(config.script)

    def set_script(self, script: list[Any]) -> None:
        self.config.script = check_script(script)
        self.rules = [_Rule.of(d) for d in self.config.script]
        self.clear_script_counts()

    def clear_script_counts(self) -> None:
        self.hits.clear()
        self.samples.clear()
        self.given.clear()
        self.unmatched = 0

    def find_rule(self, body: dict[str, Any], chat: bool) -> tuple[int, _Rule, re.Match[str]] | None:
        texts: dict[str, str | None] = {}
        for i, rule in enumerate(self.rules):
            if rule.role not in texts:
                texts[rule.role] = _role_text(body, chat, rule.role)
            text = texts[rule.role]
            m = rule.regex.search(text) if text is not None else None
            if m is not None:
                return i, rule, m
        return None

    def pick(self, index: int, rule: _Rule, conversation: str, sample: int, deliver: bool) -> dict[str, Any]:
        """The reply `rule` gives sample `sample` of `conversation` (see `pick` in the module docstring)."""
        k = len(rule.replies)
        if k == 1:
            i = 0
        elif rule.pick == "sample":
            i = sample % k
        elif rule.pick == "hash":
            key = f"{self.config.seed}\0{conversation}\0{sample}".encode()
            i = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % k
        else:
            i = self.given[(index, conversation)] % k
        if deliver:
            self.given[(index, conversation)] += 1
        return rule.replies[i]

    def reset(self) -> None:
        self.clear_script_counts()
        self.per_prompt.clear()
        self.outcomes.clear()
        self.authorization.clear()
        self.bodies.clear()
        self.routes.clear()
        self.desk.lines_answered = 0
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
            "routes": dict(self.routes),
            "http_calls": sum(self.routes.values()),
            "batch_lines": self.desk.lines_answered,
            "loras": dict(self.loras),
            "config": asdict(self.config),
            "script": {
                "hits": {r.name: self.hits[r.name] for r in self.rules},
                "samples": {r.name: self.samples[r.name] for r in self.rules},
                "unmatched": self.unmatched,
            },
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
            try:
                update = check_settings(json.loads(raw or b"{}"))
            except ValueError as e:
                self.send(_response(400, json.dumps({"error": {"message": str(e)}}).encode()), close)
                return
            for k, v in update.items():
                if k == "script":
                    st.set_script(v)
                else:
                    setattr(st.config, k, v)
            self.send(_response(200, json.dumps(asdict(st.config)).encode()), close)
            return
        st.routes[f"{method} {re.sub(r'/(file|batch)[-_][^/?]+', '/:id', path.split('?')[0])}"] += 1
        if re.match(r"(/v1)?/(files|batches)(/|\?|$)", path):
            status, payload = st.desk.handle(method, path, raw, headers, self.batch_line)
            self.send(_response(status, payload), close)
            return
        if path.rstrip("/") in ("/v1/load_lora_adapter", "/load_lora_adapter") and method == "POST":
            status, text = self.load_lora(raw)
            self.send(_response(status, text.encode()), close)
            return
        if path.rstrip("/") in ("/v1/models", "/models"):
            ids = [st.config.model, *st.loras]
            body = {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "thresher"} for i in ids]}
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
            full = json.dumps(self.answer(path, body, prompt, deliver=False)[1]).encode()
            self.later(delay, _response(200, full[: len(full) // 2], length=len(full)), close=True)
        elif fault == "invalid_json":
            self.later(delay, _response(200, b'{"id": "x", "choices": [{"message": '), close)
        else:
            status, out = self.answer(path, body, prompt)
            self.later(delay, _response(status, json.dumps(out).encode()), close)

    # ---- answers --------------------------------------------------------------------------------

    def load_lora(self, raw: bytes) -> tuple[int, str]:
        """vLLM's runtime LoRA loading: (status, body) for a {lora_name, lora_path} request."""
        st = self.state
        if not st.config.lora_updating:
            return 404, json.dumps({"detail": "Not Found"})
        try:
            body = json.loads(raw or b"{}")
            name, where = str(body["lora_name"]), str(body["lora_path"])
        except (ValueError, KeyError, TypeError):
            return 400, json.dumps({"error": {"message": "lora_name and lora_path are required"}})
        if name in st.loras:
            return 400, json.dumps({"error": {"message": f"The LoRA adapter {name!r} is already loaded."}})
        if not Path(where, "adapter_config.json").is_file():
            return 400, json.dumps({"error": {"message": f"no adapter_config.json under {where}"}})
        st.loras[name] = where
        return 200, f"Success: LoRA adapter {name!r} loaded."

    def batch_line(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A batch job's line, answered as an online request would be (`[[fail]]`: 500, `[[400]]`: 400)."""
        prompt = _prompt_of(body)
        if "[[fail]]" in prompt or "[[400]]" in prompt:
            status = 500 if "[[fail]]" in prompt else 400
            return status, {"error": {"message": f"HTTP {status} (injected in a batch line)", "type": "injected"}}
        return self.answer(url, body, prompt)

    def answer(self, path: str, body: dict[str, Any], prompt: str, deliver: bool = True) -> tuple[int, dict[str, Any]]:
        """Status and body for a request that drew no fault; `deliver=False` (an answer cut by a fault) counts nothing."""
        st = self.state
        cfg = st.config
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
            return 200, {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": toks, "total_tokens": toks},
            }
        chat = p.endswith("/chat/completions")
        if not chat and not p.endswith("/completions"):
            return 404, {"error": {"message": f"no route {path}"}}
        if not chat and body.get("prompt_logprobs") is not None:
            return self.prompt_logprobs(body)
        n = 1 if cfg.ignore_n else int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 10_000)
        found = st.find_rule(body, chat) if st.rules else None
        conversation = _role_text(body, chat, "any") or ""
        if found is None and st.rules:
            if deliver:
                st.unmatched += 1
            if cfg.unmatched == "error":
                msg = f"no script rule matched (of {len(st.rules)}; unmatched='error'); the request: {conversation[:300]!r}"
                return 501, {"error": {"message": msg, "type": "no_script_rule"}}
        lp_asked = body.get("logprobs")
        top_k = body.get("top_logprobs")
        if top_k is None and not chat and isinstance(lp_asked, int) and not isinstance(lp_asked, bool):
            top_k = lp_asked  # the legacy completions API names the count `logprobs`
        choices = []
        completion_tokens = 0
        for i in range(n):
            scripted: list[dict[str, Any]] | None = None
            if found is None:
                text, finish = self.echo(body, prompt, chat, i, n, max_tokens)
            else:
                index, rule, m = found
                item = st.pick(index, rule, conversation, int(body.get("seed") or 0) + i, deliver)
                try:
                    if "json" in item:
                        text = json.dumps(_expand(item["json"], m) if rule.template else item["json"])
                    else:
                        text = m.expand(item["text"]) if rule.template else item["text"]
                except (re.error, IndexError) as e:
                    msg = f"script rule {index} ({rule.name!r}): a reply template does not fit its match: {e}"
                    return 501, {"error": {"message": msg, "type": "bad_script_rule"}}
                forced = item.get("finish_reason") or rule.finish_reason
                if forced is None:
                    cut = _cut(text, max_tokens)
                    text, finish = (text, "stop") if cut is None else (cut, "length")
                else:
                    finish = str(forced)
                scripted = item["logprobs"] if item.get("logprobs") is not None else rule.logprobs
            completion_tokens += len(text.split())
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text, "finish_reason": finish}
            if lp_asked:
                lp = _chat_logprobs(scripted, text, int(top_k or 0))
                choice["logprobs"] = lp if chat else _legacy_logprobs(lp)
            choices.append(choice)
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
        if found is not None:
            rule = found[1]
            if deliver:
                st.hits[rule.name] += 1
                st.samples[rule.name] += n
            if rule.usage:
                prompt_tokens = rule.usage.get("prompt_tokens", prompt_tokens)
                completion_tokens = rule.usage.get("completion_tokens", completion_tokens)
        return 200, {
            "id": f"fake-{st.total}",
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

    def prompt_logprobs(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """vLLM's answer to a completions request with `prompt_logprobs`: per prompt token (None for the first), its
        own log-probability and a top-ranked alternative, from the `prompt_logprobs` table entry whose ids begin with
        the prompt's (a causal model's log-probabilities of a prefix are those of the longer sequence)."""
        ids = body.get("prompt")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            return 400, {"error": {"message": "this server scores prompt_logprobs of token-id prompts only"}}
        found = next((e for e in self.state.config.prompt_logprobs if e["ids"][: len(ids)] == ids), None)
        if found is None:
            msg = f"no prompt_logprobs in the table for this token sequence ({len(ids)} tokens: {ids[:8]}...)"
            return 501, {"error": {"message": msg, "type": "no_prompt_logprobs"}}
        plp: list[dict[str, Any] | None] = [None]
        for t, lp in zip(ids[1:], found["logprobs"][1 : len(ids)], strict=True):
            other = 0 if t != 0 else 1  # vLLM lists the prompt token beside the top-k others
            plp.append({str(t): {"logprob": lp, "rank": 2, "decoded_token": ""},
                        str(other): {"logprob": -0.01, "rank": 1, "decoded_token": ""}})  # fmt: skip
        choice = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None, "prompt_logprobs": plp}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        return 200, {"id": f"fake-{self.state.total}", "object": "text_completion", "created": int(time.time()),
                     "model": body.get("model"), "choices": [choice], "usage": usage}  # fmt: skip

    @staticmethod
    def echo(body: dict[str, Any], prompt: str, chat: bool, i: int, n: int, max_tokens: int) -> tuple[str, str]:
        """The unscripted answer to choice `i`: "reply to: <prompt>", or an instance of the asked JSON schema."""
        seed = body.get("seed")
        rf = body.get("response_format") or {}
        schema = None
        if rf.get("type") == "json_schema":
            schema = rf.get("json_schema", {}).get("schema", {})
        elif rf.get("type") == "json_object":
            schema = rf.get("schema", {"type": "object", "properties": {"answer": {"type": "string"}}})
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
            had_assistant = chat and any(m.get("role") == "assistant" for m in body.get("messages", []))
            if "[[badjson]]" in prompt and not had_assistant:
                text = "Here is what you asked for, though not as JSON."
            else:
                text = json.dumps(_instance(schema, text, schema.get("$defs", {})))
        return text, finish


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
    the running server. Settings are `FaultConfig`'s fields; `script` takes `Rule`s or their dicts, checked here.
    """

    def __init__(self, **config: Any) -> None:
        self.config = FaultConfig(**check_settings(config))
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
        fields = check_settings(fields)
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
