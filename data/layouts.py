"""Layouts: how alpaca, ShareGPT, OpenAI messages, prompt/completion and Self-Instruct rows map to the record.

Reading works column by column over a `Frame` (the file's fields as Python lists or Arrow columns): each canonical
column is checked in one pass, and a row that breaks a rule is marked bad with the field and the reason, so the
reader can fail, skip or quarantine it. Conversation layouts walk each row's turn list, since that is their nature.

Mapping between a conversation and the record (written by `thresher.data.messages.row_messages`, which Respond and
the trainer share): a system turn first when `system` has text, then `history` as (user, assistant) pairs, then the
last user turn, which is `instruction`, or `instruction + "\n" + input` when `input` is not empty (the join
LLaMA-Factory uses for alpaca rows), then the answer (`output`; the conversation ends on the user turn when `output`
is null). Because the join alone cannot be undone, a conversation row written from a record with an input also
carries the input as a top-level `input` key; the reader splits the last user turn at it. Likewise an empty or
whitespace-only `system`, which gives no system turn, is kept as a top-level `system` key. Every conversion is a
lossless round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from thresher.data.record import CANONICAL_COLUMNS, ID_BYTES, RECORD_SCHEMA
from thresher.data.repair import REPAIR_PRESETS, REPAIRS_COLUMN, Turn, repair_turns
from thresher.errors import ConfigError

#: Layouts the readers and writers know.
LAYOUTS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "prompt_completion", "self_instruct")
_ALIASES = {"openai": "messages", "prompt-completion": "prompt_completion", "self-instruct": "self_instruct"}

#: Layouts LLaMA-Factory reads through dataset_info.json.
LLAMA_FACTORY_LAYOUTS: tuple[str, ...] = ("alpaca", "sharegpt", "messages")

#: Column that keeps the second and later Self-Instruct instances of a task.
EXTRA_INSTANCES = "extra_instances"

_USER_ROLES = frozenset({"human", "user"})
# ShareGPT dumps name the assistant after the product that answered
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "model", "chatgpt", "bing", "bard"})
_SYSTEM_ROLES = frozenset({"system"})
_VALID_ROLES = sorted(_USER_ROLES | _ASSISTANT_ROLES | _SYSTEM_ROLES)
_ROLE_KIND = {
    **dict.fromkeys(_USER_ROLES, "user"),
    **dict.fromkeys(_ASSISTANT_ROLES, "assistant"),
    **dict.fromkeys(_SYSTEM_ROLES, "system"),
}


def _at(key: str, j: int | None) -> str:
    return key if j is None else f"{key}[{j}]"


def _an(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


# Keys each layout turns into canonical fields; everything else in a row is an extra column kept as is.
_CONSUMED: dict[str, frozenset[str]] = {
    "alpaca": frozenset(CANONICAL_COLUMNS),
    "sharegpt": frozenset({"id", "conversations", "system", "input"}),
    "messages": frozenset({"id", "messages", "system", "input"}),
    "prompt_completion": frozenset({"id", "prompt", "completion", "system", "input"}),
    "self_instruct": frozenset({"id", "instruction", "instances", "system", "history", EXTRA_INSTANCES}),
}
_CANONICAL = frozenset(CANONICAL_COLUMNS)
# where each conversation layout keeps its turns
_TURNS_KEY = {"sharegpt": "conversations", "messages": "messages", "prompt_completion": "prompt"}
#: Layouts whose rows are conversations (a list of turns): the ones the reader's repairs apply to.
CONVERSATION_LAYOUTS: tuple[str, ...] = tuple(_TURNS_KEY)


class _Missing:
    """A field absent from a row (as opposed to present and null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def normalize_layout(layout: str) -> str:
    name = _ALIASES.get(layout, layout)
    if name not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)} (alias: openai = messages)")
    return name


def detect_layout(keys: Iterable[str]) -> str | None:
    """The layout a set of top-level keys belongs to, or None when no layout fits."""
    ks = set(keys)
    if "conversations" in ks:
        return "sharegpt"
    if "messages" in ks:
        return "messages"
    if "prompt" in ks and ("completion" in ks or "instruction" not in ks):
        return "prompt_completion"
    if "instruction" in ks and "instances" in ks:
        return "self_instruct"
    if "instruction" in ks:
        return "alpaca"
    return None


def extra_columns(keys: Iterable[str], layout: str) -> list[str]:
    """Keys of a row in `layout` that become extra columns (in the given order).

    Canonical names are never extras: in a layout that does not read them (a top-level `output` beside
    `conversations`), a non-null value makes the row bad rather than silently shadowing the conversation.
    """
    consumed = _CONSUMED[layout]
    return [k for k in keys if k not in consumed and k not in _CANONICAL]



# ---- reading ---------------------------------------------------------------------------------------


@dataclass
class Problem:
    """Why one record cannot be read: the field (a dotted path where useful) and what is wrong."""

    field: str | None
    reason: str
    truncated: bool = False
    #: repairs that would read this record (a conversation that breaks the turn rules); empty when none would
    repair: tuple[str, ...] = ()


@dataclass
class Frame:
    """A file's records as columns: Python lists (MISSING where a row lacks the key) or Arrow columns.

    `bad` holds rows already known to be unreadable (malformed JSON, a non-object line); their cells are MISSING.
    `from_text` says nested values arrive as JSON text (CSV cells).
    """

    n: int
    columns: dict[str, list[Any] | pa.ChunkedArray | pa.Array]
    bad: dict[int, Problem] = field(default_factory=dict)
    from_text: bool = False
    _py: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def values(self, name: str) -> list[Any]:
        col = self.columns.get(name)
        if col is None:
            return [MISSING] * self.n
        if isinstance(col, list):
            return col
        if name not in self._py:
            self._py[name] = col.to_pylist()
        return self._py[name]

    def get(self, name: str) -> list[Any] | None:
        """The column's values, or None when no row has the key."""
        return self.values(name) if name in self.columns else None

    def row(self, i: int) -> dict[str, Any]:
        out = {}
        for name, col in self.columns.items():
            v = col[i] if isinstance(col, list) else col[i].as_py()
            if v is not MISSING:
                out[name] = v
        return out


class _Bad(Exception):
    def __init__(self, field: str | None, reason: str, *, repairable: bool = False) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason
        #: a repair (REPAIRS) may fix this: the reader tries them to say which
        self.repairable = repairable


#: How deep a field's value may nest lists and objects ([] is 1 level, [[1]] 2). Far beyond real records, and
#: within what every road a record takes can carry: Parquet (the run directory's shards) reads back 49 levels of
#: lists at most, orjson writes 254, and Python walks nested values by recursion (1,000 frames).
MAX_NESTING_DEPTH = 32


def nesting_depth(value: Any) -> int:
    """How many levels of lists and objects `value` nests: a scalar 0, [] or {} 1, [[1]] 2 (without recursion)."""
    if not isinstance(value, (list, tuple, dict)):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        for c in v.values() if isinstance(v, dict) else v:
            if isinstance(c, (list, tuple, dict)):
                stack.append((c, d + 1))
    return deepest


def type_depth(t: pa.DataType) -> int:
    """`nesting_depth` of the values an Arrow type can hold at most (lists, structs and maps are a level each)."""
    deepest = 0
    stack = [(t, 0)]
    while stack:
        t, d = stack.pop()
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            stack.append((t.value_type, d + 1))
        elif pa.types.is_struct(t):
            stack.extend((t.field(k).type, d + 1) for k in range(t.num_fields))
        elif pa.types.is_map(t):
            stack.extend(((t.key_type, d + 1), (t.item_type, d + 1)))
        deepest = max(deepest, d)
    return deepest


def too_deep(depth: int) -> str:
    """The reason a value nested `depth` levels is a bad record."""
    return f"nested {depth:,} levels deep (lists and objects); a value may nest at most {MAX_NESTING_DEPTH} levels"


def describe(value: Any) -> str:
    """A short description of a wrong value for error messages: its JSON kind and a clipped repr."""
    if value is MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_clip(value)!r})"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:6]}"
    return f"a {type(value).__name__}"


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _parse_text(value: Any, field: str) -> Any:
    """CSV cells hold nested values as JSON text."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise _Bad(field, f"expected JSON text (a CSV cell holding a list), found {_clip(value)!r}: {e}") from None
    return value


def _text_messages(value: str) -> Any:
    """A CSV prompt/completion cell: a JSON list of messages (conversational) or plain text (kept as is)."""
    if not value.lstrip().startswith("["):
        return value
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed) else value


class _Reader:
    """Turns one Frame in one layout into canonical columns plus extras, collecting bad rows."""

    def __init__(
        self, frame: Frame, layout: str, max_field_chars: int | None, repairs: frozenset[str] = frozenset()
    ) -> None:
        self.frame, self.layout, self.max = frame, layout, max_field_chars
        self.repairs = repairs
        #: rows read with repairs: the repairs each needed
        self.repaired: dict[int, tuple[str, ...]] = {}
        self.n = frame.n
        self.bad: dict[int, Problem] = dict(frame.bad)
        self.cols: dict[str, list[Any]] = {c: [None] * self.n for c in CANONICAL_COLUMNS}
        self.dropped_message_keys: set[str] = set()
        self.extra_instances: list[Any] | None = None
        # canonical columns that are the source's Arrow column unchanged: the table reuses them, no rebuild
        self.arrow: dict[str, pa.ChunkedArray | pa.Array] = {}

    def _keep_arrow(self, name: str) -> None:
        col = self.frame.columns.get(name)
        if col is not None and not isinstance(col, list) and col.type == RECORD_SCHEMA.field(name).type:
            self.arrow[name] = col

    def mark(self, i: int, field: str | None, reason: str, repair: tuple[str, ...] = ()) -> None:
        if i not in self.bad:
            self.bad[i] = Problem(field, reason, repair=repair)

    def too_long(self, s: str) -> bool:
        return self.max is not None and len(s) > self.max

    def long_reason(self, s: str) -> str:
        return f"{len(s):,} characters, over max_field_chars={self.max:,}"

    # ---- canonical string columns, one pass each --------------------------------------------------

    def _clean_strs(self, values: list[Any]) -> bool:
        """True when every value is a string within max_field_chars (the usual case): no per-row look needed."""
        if not all(type(v) is str for v in values):
            return False
        return self.max is None or not values or max(map(len, values)) <= self.max

    def instruction(self, values: list[Any]) -> None:
        if self._clean_strs(values):
            for i, v in enumerate(values):
                if not v or v.isspace():
                    self.mark(i, "instruction", "is empty: every record needs an instruction")
            self.cols["instruction"] = values
            self._keep_arrow("instruction")
            return
        out, bad = self.cols["instruction"], self.bad
        for i, v in enumerate(values):
            if i in bad:
                continue
            if type(v) is str:
                if not v.strip():
                    self.mark(i, "instruction", "is empty: every record needs an instruction")
                elif self.too_long(v):
                    self.mark(i, "instruction", self.long_reason(v))
                else:
                    out[i] = v
            elif v is MISSING or v is None:
                self.mark(i, "instruction", f"missing or null (the {self.layout} layout needs an instruction)")
            else:
                self.mark(i, "instruction", f"expected a string, found {describe(v)}")

    def optional_str(self, name: str, values: list[Any] | None, *, null_as: str | None) -> None:
        """input (missing/null = ""), output and system (missing = null). values None: the column is absent."""
        if values is None:
            self.cols[name] = [null_as] * self.n
            return
        if self._clean_strs(values):
            self.cols[name] = values
            self._keep_arrow(name)
            return
        out, bad = self.cols[name], self.bad
        for i, v in enumerate(values):
            if i in bad:
                continue
            if type(v) is str:
                if self.too_long(v):
                    self.mark(i, name, self.long_reason(v))
                else:
                    out[i] = v
            elif v is None or v is MISSING:
                out[i] = null_as
            else:
                self.mark(i, name, f"expected a string or null, found {describe(v)}")

    def history(self, values: list[Any] | None) -> None:
        out = self.cols["history"]
        if values is None:
            for i in range(self.n):
                out[i] = []
            return
        n_bad = len(self.bad)
        has_null = False
        for i, v in enumerate(values):
            if i in self.bad:
                continue
            if v is None or v is MISSING:
                out[i] = []
                has_null = True
                continue
            try:
                if self.frame.from_text:
                    v = _parse_text(v, "history")
                out[i] = self._pairs(v)
            except _Bad as e:
                self.mark(i, e.field, e.reason)
        if not has_null and len(self.bad) == n_bad:
            self._keep_arrow("history")

    def _pairs(self, v: Any) -> list[list[str]]:
        if not isinstance(v, (list, tuple)):
            raise _Bad("history", f"expected a list of [user, assistant] pairs, found {describe(v)}")
        pairs = []
        for j, p in enumerate(v):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise _Bad(f"history[{j}]", f"expected a [user, assistant] pair of strings, found {describe(p)}")
            for k, s in enumerate(p):
                if type(s) is not str:
                    raise _Bad(f"history[{j}][{k}]", f"expected a string, found {describe(s)}")
                if self.too_long(s):
                    raise _Bad(f"history[{j}][{k}]", self.long_reason(s))
            pairs.append([p[0], p[1]])
        return pairs

    def ids(self, values: list[Any] | None) -> None:
        if values is None:
            self.cols["id"] = [None] * self.n
            return
        if all(type(v) is str and v for v in values):
            self.cols["id"] = list(values)
            self._keep_arrow("id")
            return
        out = self.cols["id"]
        for i, v in enumerate(values):
            if i in self.bad:
                continue
            if type(v) is str and v:
                out[i] = v
            elif type(v) is int:  # integer ids are common in the wild; the record keeps them as text
                out[i] = str(v)
            elif v is None or v is MISSING or v == "":
                out[i] = None  # filled with the content hash once the row is known good
            else:
                self.mark(i, "id", f"expected a string or an integer, found {describe(v)}")

    def fill_ids(self) -> None:
        """Content ids for rows without one; the same bytes as `record_id`, inlined because it runs per row."""
        c = self.cols
        ids, ins, inp, out, sys_, hist = (c[k] for k in CANONICAL_COLUMNS)
        dumps, blake2b = orjson.dumps, hashlib.blake2b
        if not self.bad and all(v is None for v in ids):
            try:
                c["id"] = [
                    blake2b(dumps(t), digest_size=ID_BYTES).hexdigest()
                    for t in zip(ins, inp, out, sys_, hist, strict=True)
                ]
                return
            except TypeError:
                pass  # a row with unpaired surrogates: find it below
        for i in range(self.n):
            if ids[i] is None and i not in self.bad:
                try:
                    ids[i] = blake2b(
                        dumps((ins[i], inp[i], out[i], sys_[i], hist[i])), digest_size=ID_BYTES
                    ).hexdigest()
                except TypeError:  # orjson refuses unpaired surrogates: text that did not come from valid UTF-8
                    self.mark(i, None, "holds text with unpaired surrogates (not valid Unicode)")

    # ---- layouts -------------------------------------------------------------------------------------

    def read(self) -> None:
        f = self.frame
        if self.layout == "alpaca":
            self.instruction(f.values("instruction"))
            self.optional_str("input", f.get("input"), null_as="")
            self.optional_str("output", f.get("output"), null_as=None)
            self.optional_str("system", f.get("system"), null_as=None)
            self.history(f.get("history"))
        elif self.layout == "self_instruct":
            self.instruction(f.values("instruction"))
            self.optional_str("system", f.get("system"), null_as=None)
            self.history(f.get("history"))
            self._instances(f.values("instances"), f.values(EXTRA_INSTANCES))
        else:
            self._conversations()
        self._stray_canonical()
        self.ids(f.get("id"))
        self.fill_ids()

    def _stray_canonical(self) -> None:
        """Canonical keys this layout does not read must be empty: a value there would be lost or ambiguous."""
        source = _TURNS_KEY.get(self.layout, "instances")
        for name in CANONICAL_COLUMNS:
            if name in _CONSUMED[self.layout] or name not in self.frame.columns:
                continue
            for i, v in enumerate(self.frame.values(name)):
                if v is not None and v is not MISSING and v != "" and v != [] and i not in self.bad:
                    self.mark(
                        i,
                        name,
                        f"a top-level {name!r} does not fit the {self.layout} layout, which takes it from "
                        f"{source!r}; pass the layout that reads {name!r} (e.g. layout='alpaca') to keep it",
                    )

    def _instances(self, values: list[Any], given_extra: list[Any]) -> None:
        c_in, c_out = self.cols["input"], self.cols["output"]
        extra: list[Any] = [None] * self.n
        for i, v in enumerate(values):
            if i in self.bad:
                continue
            try:
                if self.frame.from_text:
                    v = _parse_text(v, "instances")
                if v is None or v is MISSING:
                    v = []
                if not isinstance(v, list):
                    raise _Bad("instances", f"expected a list of {{input, output}} objects, found {describe(v)}")
                more = given_extra[i]
                if self.frame.from_text:
                    more = _parse_text(more, EXTRA_INSTANCES)
                if more is not None and more is not MISSING:
                    if not isinstance(more, list):
                        raise _Bad(EXTRA_INSTANCES, f"expected a list of instances, found {describe(more)}")
                    v = v + more
                checked = []
                for j, inst in enumerate(v):
                    if not isinstance(inst, dict):
                        raise _Bad(f"instances[{j}]", f"expected an {{input, output}} object, found {describe(inst)}")
                    a, b = inst.get("input", ""), inst.get("output")
                    if a is None:
                        a = ""
                    for key, s in (("input", a), ("output", b)):
                        if s is not None and type(s) is not str:
                            raise _Bad(f"instances[{j}].{key}", f"expected a string, found {describe(s)}")
                        if s is not None and self.too_long(s):
                            raise _Bad(f"instances[{j}].{key}", self.long_reason(s))
                    checked.append({"input": a, "output": b})
                if checked:
                    c_in[i], c_out[i] = checked[0]["input"], checked[0]["output"]
                else:
                    c_in[i], c_out[i] = "", None
                extra[i] = checked[1:] or None
            except _Bad as e:
                self.mark(i, e.field, e.reason)
        if any(e is not None for j, e in enumerate(extra) if j not in self.bad):
            self.extra_instances = extra

    def _conversations(self) -> None:
        f = self.frame
        key = _TURNS_KEY[self.layout]
        turns_col = f.values(key)
        completion_col = f.values("completion") if self.layout == "prompt_completion" else None
        system_col, input_col = f.values("system"), f.values("input")
        cols = self.cols
        safe = frozenset(REPAIR_PRESETS["safe"])
        for i in range(self.n):
            if i in self.bad:
                continue
            done: list[str] = []
            row = (turns_col[i], None if completion_col is None else completion_col[i], system_col[i], input_col[i])
            try:
                values = self._conversation(*row, done)
            except _Bad as e:
                fix: tuple[str, ...] = ()
                if e.repairable and not safe <= self.repairs:
                    # say which repairs would read it: the same row again with the safe ones on as well
                    asked, self.repairs = self.repairs, self.repairs | safe
                    trial: list[str] = []
                    try:
                        self._conversation(*row, trial)
                        fix = tuple(r for r in trial if r not in asked)
                    except _Bad:
                        pass
                    finally:
                        self.repairs = asked
                reason = e.reason
                if fix:
                    names = ", ".join(fix)
                    reason += (
                        f"; adding {names} to repair would read it"
                        if self.repairs
                        else f"; repair='safe' would read it (it needs {names})"
                    )
                self.mark(i, e.field, reason, fix)
                continue
            cols["instruction"][i], cols["input"][i], cols["output"][i], cols["system"][i], cols["history"][i] = values
            if done:
                self.repaired[i] = tuple(done)

    def _conversation(
        self, turns: Any, completion: Any, top_system: Any, inp: Any, done: list[str]
    ) -> tuple[str, str, str | None, str | None, list[list[str]]]:
        """(instruction, input, output, system, history) of one conversation row; the repairs made go in `done`."""
        layout = self.layout
        key = _TURNS_KEY[layout]
        if self.frame.from_text and isinstance(turns, str):
            turns = _parse_text(turns, key) if key != "prompt" else _text_messages(turns)
        if turns is MISSING or turns is None:
            raise _Bad(key, f"missing required field (the {layout} layout needs {key!r})")
        if layout == "prompt_completion":
            system, history, last_user, output = self._prompt_completion(turns, completion, done)
        else:
            system, history, last_user, output = self._walk(turns, key, done)
        if top_system is not MISSING and top_system is not None:
            if type(top_system) is not str:
                raise _Bad("system", f"expected a string or null, found {describe(top_system)}")
            if system is not None and system != top_system:
                raise _Bad("system", "differs from the system turn of the conversation; keep one of them")
            system = top_system
        if inp is MISSING or inp is None or inp == "":
            instruction, inp = last_user, ""
        elif type(inp) is not str:
            raise _Bad("input", f"expected a string, found {describe(inp)}")
        elif last_user.endswith("\n" + inp):
            instruction = last_user[: len(last_user) - len(inp) - 1]
        else:
            raise _Bad(
                "input",
                "does not match the end of the last user turn (a top-level 'input' next to a conversation "
                "is the tail of that turn, after a newline)",
            )
        if not instruction.strip():
            raise _Bad(key, "the last user turn is empty: every record needs an instruction", repairable=True)
        for name, s in (("instruction", instruction), ("input", inp), ("system", system)):
            if s is not None and self.too_long(s):
                raise _Bad(name, self.long_reason(s))
        return instruction, inp, output, system, history

    def _prompt_completion(
        self, prompt: Any, completion: Any, done: list[str]
    ) -> tuple[str | None, list[list[str]], str, str | None]:
        if self.frame.from_text and isinstance(completion, str):
            completion = _text_messages(completion)
        if type(prompt) is str:  # TRL's plain-text prompt/completion
            if self.too_long(prompt):
                raise _Bad("prompt", self.long_reason(prompt))
            system, last_user = None, prompt
            history: list[list[str]] = []
        else:
            system, history, last_user, out = self._walk(prompt, "prompt", done, prompt_only=True)
            if out is not None:
                raise _Bad("prompt", "must end with a user turn; the answer belongs in 'completion'")
        if completion is MISSING or completion is None:
            return system, history, last_user, None
        if type(completion) is str:
            if self.too_long(completion):
                raise _Bad("completion", self.long_reason(completion))
            return system, history, last_user, completion
        if not isinstance(completion, list):
            raise _Bad("completion", f"expected a string or a list of messages, found {describe(completion)}")
        if not completion:
            return system, history, last_user, None
        if len(completion) != 1:
            raise _Bad("completion", f"expected one assistant message, found {len(completion)} messages")
        role, content = self._message(completion[0], "completion", 0)
        if role != "assistant":
            raise _Bad("completion[0]", f"expected an assistant message, found role {role!r}")
        return system, history, last_user, content

    def _message(self, m: Any, key: str, j: int | None = None, *, empty_ok: bool = False) -> tuple[str, str | None]:
        """(user|assistant|system, content) of message `key[j]`; names the message in errors.

        empty_ok: a missing or null content comes back as None (drop_empty_turns drops it) instead of an error.
        """
        if type(m) is dict:
            # look at values, not keys: Arrow gives a message every key any message of the column has (as null)
            if m.get("from") is not None or ("from" in m and "role" not in m):
                role_key, content_key = "from", "value"
            elif "role" in m:
                role_key, content_key = "role", "content"
            else:
                raise _Bad(_at(key, j), f"a message needs 'from'/'value' or 'role'/'content' keys; found {sorted(m)}")
        else:
            raise _Bad(_at(key, j), f"expected a message object, found {describe(m)}")
        role, content = m[role_key], m.get(content_key, MISSING)
        kind = _ROLE_KIND.get(role) if type(role) is str else None
        if kind is None:
            raise _Bad(
                f"{_at(key, j)}.{role_key}", f"unsupported role {role!r}; valid roles: {', '.join(_VALID_ROLES)}"
            )
        if type(content) is not str:
            empty = content is None or content is MISSING
            if empty and empty_ok:
                return kind, None
            raise _Bad(
                f"{_at(key, j)}.{content_key}", f"expected a string, found {describe(content)}", repairable=empty
            )
        if self.max is not None and len(content) > self.max:
            raise _Bad(f"{_at(key, j)}.{content_key}", self.long_reason(content))
        if len(m) > 2:
            self.dropped_message_keys.update(
                k for k, v in m.items() if k not in (role_key, content_key) and v is not None
            )
        return kind, content

    def _walk(
        self, turns: Any, key: str, done: list[str], *, prompt_only: bool = False
    ) -> tuple[str | None, list[list[str]], str, str | None]:
        """(system, history, last user turn, answer or None) of a conversation, with the reader's repairs made
        (see thresher.data.repair); the names of those that changed something are appended to `done`."""
        if not isinstance(turns, list):
            raise _Bad(key, f"expected a list of messages, found {describe(turns)}")
        empty_ok = "drop_empty_turns" in self.repairs
        parsed: list[Turn] = [(j, *self._message(m, key, j, empty_ok=empty_ok)) for j, m in enumerate(turns)]
        if self.repairs:
            parsed, made = repair_turns(parsed, self.repairs, prompt_only=prompt_only)
            done.extend(made)
            if "merge_same_role" in made and self.max is not None:
                for j, _, content in parsed:
                    if content is not None and len(content) > self.max:
                        raise _Bad(_at(key, j), f"merged with the turns after it: {self.long_reason(content)}")
        system = None
        start = 0
        if parsed and parsed[0][1] == "system":
            system, start = parsed[0][2], 1
        users: list[str] = []
        answers: list[str] = []
        for n, (j, role, content) in enumerate(parsed[start:]):
            want = "user" if n % 2 == 0 else "assistant"
            if role != want:
                rk = "from" if turns[j].get("from") is not None else "role"
                where = "only first" if role == "system" else f"expected {_an(want)} turn here (turns alternate)"
                raise _Bad(f"{key}[{j}].{rk}", f"found {_an(role)} turn; {where}", repairable=role != "system")
            # content is None only for an empty turn, which drop_empty_turns has dropped by now
            (users if role == "user" else answers).append(content or "")
        if not users:
            raise _Bad(key, "has no user turn")
        if len(users) == len(answers):
            return system, [[u, a] for u, a in zip(users[:-1], answers[:-1], strict=True)], users[-1], answers[-1]
        return system, [[u, a] for u, a in zip(users[:-1], answers, strict=True)], users[-1], None

    # ---- extras -------------------------------------------------------------------------------------

    def extras(self) -> dict[str, list[Any] | pa.ChunkedArray | pa.Array]:
        f = self.frame
        out: dict[str, list[Any] | pa.ChunkedArray | pa.Array] = {}
        names = extra_columns(f.columns, self.layout)
        for name in names:
            col = f.columns[name]
            if not isinstance(col, list) and type_depth(col.type) > MAX_NESTING_DEPTH:
                col = col.to_pylist()  # rebuilt from the rows kept, it gets a type only as deep as they are
            if isinstance(col, list):
                values = [None if v is MISSING else v for v in col]
                if f.from_text:
                    values = _infer_text_column(values)
                self._check_long_list(name, values)
                self._check_depth(name, values)
                out[name] = values
            else:
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    self._check_long_arrow(name, col)
                out[name] = col
        if self.extra_instances is not None:
            out[EXTRA_INSTANCES] = self.extra_instances
        if self.repairs and self.layout in CONVERSATION_LAYOUTS:
            out[REPAIRS_COLUMN] = self._repairs_column(out.get(REPAIRS_COLUMN))
        return out

    def _repairs_column(self, given: list[Any] | pa.ChunkedArray | pa.Array | None) -> list[list[str]]:
        """Each row's repairs: those a file read before (re-reading a repaired file) and then this read's."""
        before = [None] * self.n if given is None else given if isinstance(given, list) else given.to_pylist()
        out: list[list[str]] = []
        for i, prior in enumerate(before):  # (a CSV column of JSON lists is parsed already: _infer_text_column)
            if prior is None or prior is MISSING:
                prior = []
            elif not (isinstance(prior, list) and all(type(r) is str for r in prior)):
                self.mark(i, REPAIRS_COLUMN, f"expected a list of repair names, found {describe(prior)}")
                prior = []
            out.append([*prior, *self.repaired.get(i, ())])
        return out

    def _check_long_list(self, name: str, values: list[Any]) -> None:
        if self.max is None:
            return
        for i, v in enumerate(values):
            if type(v) is str and len(v) > self.max and i not in self.bad:
                self.mark(i, name, self.long_reason(v))

    def _check_depth(self, name: str, values: list[Any]) -> None:
        for i, v in enumerate(values):
            if isinstance(v, (list, dict)) and i not in self.bad:
                depth = nesting_depth(v)
                if depth > MAX_NESTING_DEPTH:
                    self.mark(i, name, too_deep(depth))

    def _check_long_arrow(self, name: str, col: pa.ChunkedArray | pa.Array) -> None:
        if self.max is None or not len(col):
            return
        lengths = pc.utf8_length(col)
        peak = pc.max(lengths).as_py()
        if peak is None or peak <= self.max:
            return
        over = pc.greater(lengths, self.max)
        for i in pc.indices_nonzero(pc.fill_null(over, False)).to_pylist():
            if i not in self.bad:
                self.mark(i, name, f"{lengths[i].as_py():,} characters, over max_field_chars={self.max:,}")


def _infer_text_column(values: list[Any]) -> list[Any]:
    """A CSV extra column comes back typed when every value reads as one JSON kind other than text."""
    parsed: list[Any] = []
    kind: type | None = None
    for v in values:
        if v is None:
            parsed.append(None)
            continue
        if not isinstance(v, str) or not v:
            return values
        try:
            p = orjson.loads(v)
        except orjson.JSONDecodeError:
            return values
        k: type = float if type(p) is int else type(p)  # ints and floats mix as numbers
        if p is None or k is str or (kind is not None and k is not kind):
            return values
        kind = k
        parsed.append(p)
    return parsed


@dataclass
class CanonicalColumns:
    """Canonical columns (Python lists over all rows; bad rows hold junk) plus extras, and the bad rows."""

    columns: dict[str, list[Any]]
    extras: dict[str, list[Any] | pa.ChunkedArray | pa.Array]
    bad: dict[int, Problem]
    dropped_message_keys: set[str]
    #: canonical columns to take from the source as they are (same values as in `columns`)
    arrow: dict[str, pa.ChunkedArray | pa.Array] = field(default_factory=dict)
    #: rows read with repairs (bad rows among them too): the repairs each needed
    repaired: dict[int, tuple[str, ...]] = field(default_factory=dict)


def to_canonical(
    frame: Frame, layout: str, max_field_chars: int | None, repairs: frozenset[str] = frozenset()
) -> CanonicalColumns:
    """The frame's rows as canonical columns; `repairs` (see thresher.data.repair) fix conversations on the way."""
    r = _Reader(frame, layout, max_field_chars, repairs)
    r.read()
    extras = r.extras()
    return CanonicalColumns(r.cols, extras, r.bad, r.dropped_message_keys, r.arrow, r.repaired)


def first_type_conflict(values: Sequence[Any]) -> int | None:
    """Index of the first value Arrow cannot store in one column with the values before it (None: all fit)."""
    try:
        pa.array(values)
        return None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    lo, hi = 1, len(values)  # invariant: values[:lo] fits, values[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pa.array(values[:mid])
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            hi = mid
    return hi - 1


class TypeConflict(Exception):
    """Extra column values whose type clashes with the rest of the column: {row: reason} for each of them."""

    def __init__(self, rows: dict[int, str], column: str) -> None:
        super().__init__(next(iter(rows.values())))
        self.rows, self.column = rows, column


def _kind(value: Any) -> str:
    """The JSON kind of a value, as Arrow sees it: ints and floats share a column, strings and numbers do not."""
    if isinstance(value, bool):
        return "booleans"
    if isinstance(value, (int, float)):
        return "numbers"
    if isinstance(value, str):
        return "strings"
    if isinstance(value, (list, tuple)):
        return "lists"
    if isinstance(value, dict):
        return "objects"
    return type(value).__name__


def _type_conflict(name: str, vals: Sequence[Any], keep: Sequence[int], bad_at: int) -> TypeConflict:
    """The rows to blame for a column Arrow cannot store: those whose kind differs from most of the column's.

    Blaming the first value that does not fit with the ones before it would, when the odd one out comes first
    (one string score before a thousand numbers), mark every other row bad and keep the odd one.
    """
    kinds: dict[str, list[int]] = {}
    for j, v in enumerate(vals):
        if v is not None:
            kinds.setdefault(_kind(v), []).append(j)
    if len(kinds) > 1:
        # most rows win; on a tie, the kind seen first
        major = max(kinds, key=lambda k: (len(kinds[k]), -kinds[k][0]))
        like = describe(vals[kinds[major][0]])
        return TypeConflict(
            {
                keep[j]: f"holds {describe(vals[j])}, which does not fit in one column with the other values "
                f"(most are {major}, like {like})"
                for k, rows in kinds.items()
                if k != major
                for j in rows
            },
            name,
        )
    # one kind, but nested values that clash (a list of numbers beside a list of strings): blame the first
    first = next((v for v in vals if v is not None), None)
    return TypeConflict(
        {
            keep[bad_at]: f"holds {describe(vals[bad_at])}, which does not fit in one column with the earlier values "
            f"(like {describe(first)})"
        },
        name,
    )


def build_table(canon: CanonicalColumns, keep: Sequence[int]) -> pa.Table:
    """The Arrow table of the kept rows: canonical columns first (RECORD_SCHEMA types), extras after.

    Raises TypeConflict naming the extra values Arrow cannot store with the rest of their column; the caller marks
    those rows bad and builds again without them.
    """
    n = len(canon.columns["id"])
    full = len(keep) == n
    arrays: list[pa.Array | pa.ChunkedArray] = []
    idx = None if full else pa.array(keep, type=pa.int64())
    for f in RECORD_SCHEMA:
        if f.name in canon.arrow:
            col = canon.arrow[f.name]
            arrays.append(col if idx is None else col.take(idx))
            continue
        vals = canon.columns[f.name]
        arrays.append(pa.array(vals if full else [vals[i] for i in keep], type=f.type))
    names = list(CANONICAL_COLUMNS)
    for name, col in canon.extras.items():
        if isinstance(col, list):
            vals = col if full else [col[i] for i in keep]
            bad_at = first_type_conflict(vals)
            if bad_at is not None:
                raise _type_conflict(name, vals, keep, bad_at)
            arrays.append(pa.array(vals))
        else:
            arrays.append(col if idx is None else col.take(idx))
        names.append(name)
    return pa.table(arrays, names=names)


# ---- writing -----------------------------------------------------------------------------------------


_MSG_SHAREGPT = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
_MSG_OPENAI = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_INSTANCES = pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))


def layout_columns(table: pa.Table, layout: str) -> dict[str, pa.Array | pa.ChunkedArray]:
    """The columns a canonical table becomes in `layout` (extra columns not included)."""
    layout = normalize_layout(layout)
    if layout == "alpaca":
        return {c: table.column(c) for c in CANONICAL_COLUMNS}
    ins, inp, out, sys_, hist = (table.column(c).to_pylist() for c in CANONICAL_COLUMNS[1:])
    n = table.num_rows
    cols: dict[str, pa.Array | pa.ChunkedArray] = {"id": table.column("id")}
    any_input = any(inp)
    if layout == "self_instruct":
        cols["instruction"] = table.column("instruction")
        inst = []
        extra = table.column(EXTRA_INSTANCES).to_pylist() if EXTRA_INSTANCES in table.column_names else [None] * n
        for i in range(n):
            first = [] if out[i] is None and not inp[i] else [{"input": inp[i], "output": out[i]}]
            inst.append(first + list(extra[i] or []))
        cols["instances"] = pa.array(inst, type=_INSTANCES)
        if any(s is not None for s in sys_):
            cols["system"] = table.column("system")
        if any(hist):
            cols["history"] = table.column("history")
        return cols
    from thresher.data.messages import row_messages, system_text

    # The turns are thresher.data.messages.row_messages, the mapping Respond and the trainer use too. ShareGPT keeps
    # the system in its top-level column (LLaMA-Factory's `system` mapping) instead of a turn.
    sharegpt = layout == "sharegpt"
    role_k, content_k = ("from", "value") if sharegpt else ("role", "content")
    roles = {"user": "human", "assistant": "gpt"} if sharegpt else {r: r for r in ("system", "user", "assistant")}
    convs: list[list[dict[str, str]]] = []
    completions: list[list[dict[str, str]] | None] = []
    for i in range(n):
        messages = row_messages(ins[i], inp[i], None if sharegpt else sys_[i], hist[i], output=out[i])
        turns = [{role_k: roles[m["role"]], content_k: m["content"]} for m in messages]
        answer = turns.pop() if out[i] is not None else None
        if layout == "prompt_completion":
            completions.append(None if answer is None else [answer])
        elif answer is not None:
            turns.append(answer)
        convs.append(turns)
    if sharegpt:
        cols["conversations"] = pa.array(convs, type=_MSG_SHAREGPT)
        cols["system"] = table.column("system")
    else:
        cols["messages" if layout == "messages" else "prompt"] = pa.array(convs, type=_MSG_OPENAI)
        if layout == "prompt_completion":
            cols["completion"] = pa.array(completions, type=_MSG_OPENAI)
        # A system with no system message (empty or whitespace) is kept as a top-level key, as `input` is, so the
        # record reads back as it was; the writers drop the key where it is null.
        if any(s is not None and system_text(s) is None for s in sys_):
            kept = [s if s is not None and system_text(s) is None else None for s in sys_]
            cols["system"] = pa.array(kept, type=pa.string())
    if any_input:
        cols["input"] = table.column("input")
    return cols
