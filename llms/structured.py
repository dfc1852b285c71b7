"""Structured output: a schema the answer must follow, how to ask for it, and how to check it.

A schema is a pydantic model class (validated with pydantic) or a JSON-schema dict (validated with `jsonschema`
when it is installed, else checked for valid JSON with the required keys). Servers differ in how they take a
schema, so `json_mode` says which request form to use:

- `schema`: `response_format={"type": "json_schema", ...}` (OpenAI, vLLM, SGLang)
- `object+schema`: `{"type": "json_object", "schema": ...}` (llama.cpp's server, which turns it into a grammar)
- `object`: `{"type": "json_object"}` (JSON, but any JSON)
- `off`: no response_format; the schema is described in the prompt
- `auto`: start with `schema` and step down the list when a server rejects the form (HTTP 400/422)

Whatever the form, every reply is parsed and validated; a reply that fails is sent back with the error and asked
again, up to `max_reasks` times.
"""

from __future__ import annotations

import json
import re
from typing import Any

from thresher.errors import ConfigError

JSON_MODES = ("auto", "schema", "object+schema", "object", "off")
_FALLBACK = {"auto": "schema", "schema": "object+schema", "object+schema": "object", "object": "off"}
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class Schema:
    """A JSON schema with a validator; build with `Schema.of(pydantic_class_or_dict)`."""

    def __init__(self, json_schema: dict[str, Any], name: str, model: Any = None) -> None:
        self.json_schema, self.name, self.model = json_schema, name, model

    @classmethod
    def of(cls, spec: Any) -> Schema:
        if isinstance(spec, Schema):
            return spec
        if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
            return cls(spec.model_json_schema(), spec.__name__, spec)
        if isinstance(spec, dict):
            if spec.get("type") == "json_schema" and "json_schema" in spec:  # an OpenAI response_format
                inner = spec["json_schema"]
                return cls(inner.get("schema", {}), inner.get("name", "answer"))
            return cls(spec, str(spec.get("title", "answer")))
        raise ConfigError(
            f"response_format must be a pydantic model class or a JSON schema dict, got {type(spec).__name__}"
        )

    def key(self) -> Any:
        """What identifies the schema in a cache key."""
        return self.json_schema

    def response_format(self, mode: str) -> dict[str, Any] | None:
        name = re.sub(r"[^a-zA-Z0-9_-]", "_", self.name)[:64] or "answer"
        if mode == "schema":
            return {"type": "json_schema", "json_schema": {"name": name, "schema": self.json_schema, "strict": False}}
        if mode == "object+schema":
            return {"type": "json_object", "schema": self.json_schema}
        if mode == "object":
            return {"type": "json_object"}
        return None

    def describe(self) -> str:
        return json.dumps(self.json_schema, ensure_ascii=False)

    def validate(self, text: str | None) -> Any:
        """The parsed, validated value of a reply; raises ValueError saying what is wrong."""
        if text is None:
            raise ValueError("the reply is empty")
        value = parse_json(text)
        if self.model is not None:
            from pydantic import ValidationError

            try:
                return self.model.model_validate(value)
            except ValidationError as e:
                raise ValueError(_short(str(e))) from e
        try:
            import jsonschema
        except ImportError:
            required = self.json_schema.get("required", [])
            if required and (not isinstance(value, dict) or any(k not in value for k in required)):
                raise ValueError(f"the JSON must be an object with the keys {required}") from None
            return value
        try:
            jsonschema.validate(value, self.json_schema)
        except jsonschema.ValidationError as e:
            raise ValueError(_short(e.message)) from e
        return value


def parse_json(text: str) -> Any:
    """JSON from a model reply: the whole text, a fenced block, or the outermost {...} / [...] span."""
    s = text.strip()
    try:
        return json.loads(s)
    except ValueError:
        pass
    m = _FENCE.search(s)
    if m:
        try:
            return json.loads(m.group(1))
        except ValueError:
            pass
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = s.find(open_), s.rfind(close)
        if 0 <= i < j:
            try:
                return json.loads(s[i : j + 1])
            except ValueError:
                pass
    raise ValueError("the reply is not JSON")


def next_mode(mode: str) -> str | None:
    """The request form to try after a server rejected `mode` (None when there is nothing simpler)."""
    return _FALLBACK.get(mode)


def check_mode(mode: str) -> None:
    if mode not in JSON_MODES:
        raise ConfigError(f"json_mode must be one of {list(JSON_MODES)}, got {mode!r}")


def reask_message(error: str, schema: Schema) -> dict[str, str]:
    """The follow-up user turn after a reply that did not validate (our own words)."""
    return {
        "role": "user",
        "content": (
            f"That reply cannot be used: {error}. Answer again with a single JSON value that follows this schema, "
            f"and nothing else (no prose, no code fences):\n{schema.describe()}"
        ),
    }


def schema_instruction(schema: Schema) -> str:
    """Appended to the last user turn when the server gets no response_format (json_mode='off')."""
    return f"\n\nReply with a single JSON value that follows this schema, and nothing else:\n{schema.describe()}"


def _short(msg: str, limit: int = 400) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
