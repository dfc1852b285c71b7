"""`TaskClassifier`: a chat model names the task kind of each instruction, one kind of the task taxonomy per row.

The prompt (our `classify` template, or `classify_few_shot` with solved examples) lists every kind of the taxonomy
as `- name: description`, asks for `{"task": "<kind>"}`, and ends with the request. Everything before the request
(the list, the reply format, the examples) is the same for every row, so a server that reuses a cached prompt prefix
(llama.cpp does) processes only each row's own tokens: on 2 CPU cores ~60 instead of ~1,200 per row.

Where the backend takes structured output (`structured=True`, the default), the JSON schema sent names the kinds as
an enum, so a server that turns schemas into grammars (llama.cpp, vLLM, SGLang, OpenAI's strict mode) can only
answer one of them. Validation is deliberately lenient: a reply is never re-asked for naming no kind, because an
unconstrained model's reply is interpreted here instead. The answer is the JSON's `task`, or, when the reply is not
JSON, its text; it is matched to a kind by name (case, spaces, hyphens and quotes ignored), else the first kind name
it mentions is taken; an answer that names no kind becomes `default`. Columns: `task` (always a kind of the
taxonomy) and `task_raw` (the model's answer as given, clipped to 200 characters), so `task_raw != task` shows
rows whose answer was read from prose or fell back to `default`. Metrics count rows per kind, answers off the list
and answers read from text.

Few-shot examples (`examples=`: a JSON / JSONL file or a list of `{instruction, task}`) must name kinds of the
taxonomy; `n_shots` of them are drawn once per step (seeded by `seed`, spread over as many kinds as possible), so
every row sees the same examples. The fingerprint holds the content of the taxonomy, the prompts and the drawn
examples, never the paths they were read from.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from thresher.data.messages import user_text
from thresher.errors import ConfigError
from thresher.llms.structured import Schema, parse_json
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt, check_overrides, load_prompt, prompts_digest
from thresher.pipelines.step import RowStep
from thresher.rewriters.taxonomy import DEFAULT_KIND, Extension, Taxonomy, load_taxonomy

PACKAGE, METHOD = "rewriters", "classifier"
PROMPT_NAMES = ("classify", "classify_few_shot", "example")
FILLS = {
    "classify": {"kinds", "instruction"},
    "classify_few_shot": {"kinds", "examples", "instruction"},
    "example": {"instruction", "task"},
}
RAW_CHARS = 200
_SEPARATORS = re.compile(r"[\s\-]+")
_STRIP = " \t\r\n\"'`*.,:;!?()[]{}<>“”‘’「」『』。，：；！？（）"


class ChoiceSchema(Schema):
    """A schema whose enum constrains the server but whose validation accepts any reply: the parsed JSON, or the
    reply's text when it is not JSON. The classifier maps what was said to a kind, so nothing is re-asked."""

    def validate(self, text: str | None) -> Any:
        if text is None:
            raise ValueError("the reply is empty")
        try:
            return parse_json(text)
        except ValueError:
            return text


def choice_schema(kinds: Sequence[str]) -> ChoiceSchema:
    return ChoiceSchema(
        {
            "title": "task_kind",
            "type": "object",
            "properties": {"task": {"type": "string", "enum": list(kinds)}},
            "required": ["task"],
        },
        "task_kind",
    )


def match_kind(answer: str, kinds: Sequence[str]) -> str | None:
    """The kind `answer` names: the whole answer as a kind name (case, spaces, hyphens, quotes ignored), else the
    kind name mentioned first in it (the longest of names starting at one place); None when it names none."""
    known = set(kinds)
    norm = _SEPARATORS.sub("_", answer.strip(_STRIP).lower())
    if norm in known:
        return norm
    text = answer.lower()
    best: tuple[int, int, str] | None = None
    for kind in kinds:
        words = r"[\s_\-]+".join(re.escape(w) for w in kind.split("_"))
        m = re.search(rf"(?<![a-z0-9_]){words}(?![a-z0-9_])", text)
        if m and (best is None or (m.start(), -len(kind)) < best[:2]):
            best = (m.start(), -len(kind), kind)
    return best[2] if best else None


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class TaskClassifier(ModelStep, RowStep):
    """Name each row's task kind (column `task`) with a chat model (see the module docstring).

    backend: the chat model (a spec dict, a backend object, or None for the embedded llama.cpp model).
    language: "en" or "zh": the shipped taxonomy and prompts. taxonomy: a taxonomy file replacing the shipped one;
    extend: files or mappings adding or changing kinds (see `thresher.rewriters.taxonomy`).
    examples: few-shot examples, a JSON / JSONL file or a list of {instruction, task}; n_shots: how many of them
    to show (None: all given; 0: none). structured: send the kinds as a JSON-schema enum (False: the reply is only
    parsed). prompts: {"classify" | "classify_few_shot" | "example": file} to replace templates. max_chars: the
    request (instruction and input) is clipped to this many characters; max_example_chars: each example's too.
    """

    inputs = ("instruction",)
    outputs = ("task", "task_raw")
    VERSION = "1"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        language: str = "en",
        taxonomy: str | os.PathLike[str] | None = None,
        extend: Extension | Sequence[Extension] | None = None,
        examples: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
        n_shots: int | None = None,
        structured: bool = True,
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_chars: int = 1500,
        max_example_chars: int = 300,
        max_tokens: int = 32,
        temperature: float | None = 0.0,
        seed: int | None = None,
        api_key: str | None = secret(),
        batch_size: int = runtime(256),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.language = language
        self.taxonomy = taxonomy
        self.extend = extend
        self.examples = examples
        self.n_shots = n_shots
        self.structured = structured
        self.prompts = prompts
        self.max_chars = max_chars
        self.max_example_chars = max_example_chars
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- configuration ----------------------------------------------------------------------------

    def check(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        for key in ("max_chars", "max_example_chars", "max_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
        n = self.n_shots
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"{name}: n_shots must be a non-negative integer or None (all examples), got {n!r}")
        if n and self.examples is None:
            raise ConfigError(f"{name}: n_shots={n} but no examples were given (examples=a file or a list)")
        if not isinstance(self.structured, bool):
            raise ConfigError(f"{name}: structured must be true or false, got {self.structured!r}")
        self._templates()
        self._shots(self._taxonomy())
        super().check()

    def _taxonomy(self) -> Taxonomy:
        return load_taxonomy(self.language, self.taxonomy, extend=self.extend)

    def _templates(self) -> dict[str, Prompt]:
        check_overrides(METHOD, self.prompts, PROMPT_NAMES)
        out = {n: load_prompt(PACKAGE, METHOD, n, self.language, self.prompts) for n in PROMPT_NAMES}
        for n, t in out.items():
            if t.placeholders != FILLS[n]:
                raise ConfigError(f"{type(self).__name__}: prompt {t.path} has placeholders {sorted(t.placeholders)}; "
                                  f"the {n!r} template takes exactly {sorted(FILLS[n])}")  # fmt: skip
        return out

    def _read_examples(self) -> tuple[str, list[Any]]:
        """(how errors name the source, the raw example records)."""
        if self.examples is None:
            return "examples", []
        if not isinstance(self.examples, (str, os.PathLike)):
            if isinstance(self.examples, Mapping) or not isinstance(self.examples, Sequence):
                raise ConfigError(f"{type(self).__name__}: examples must be a file or a list of {{instruction, task}}, "
                                  f"got {type(self.examples).__name__}")  # fmt: skip
            return "examples", list(self.examples)
        path = Path(self.examples).expanduser()
        if not path.is_file():
            raise ConfigError(f"{type(self).__name__}: examples file {os.fspath(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"examples {path}, line {line_no}: not valid JSON ({e.msg})") from None
            return str(path), records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"examples {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(data, list):
            raise ConfigError(f"examples {path}: expected a JSON list of {{instruction, task}}, got {type(data).__name__}")
        return str(path), data

    def _shots(self, taxonomy: Taxonomy) -> list[tuple[str, str]]:
        """The (instruction, kind) examples every prompt shows: all given, or `n_shots` drawn over the kinds."""
        where, records = self._read_examples()
        pairs: list[tuple[str, str]] = []
        for i, r in enumerate(records):
            at = f"{type(self).__name__}: {where}, row {i}"
            if not isinstance(r, Mapping):
                raise ConfigError(f"{at}: expected an object with 'instruction' and 'task', got {type(r).__name__}")
            instruction, kind = r.get("instruction"), r.get("task")
            if not isinstance(instruction, str) or not instruction.strip():
                raise ConfigError(f"{at}, field 'instruction': expected a non-empty string, got {instruction!r}")
            if not isinstance(kind, str) or kind not in taxonomy:
                raise ConfigError(f"{at}, field 'task': {kind!r} is not a kind of the taxonomy; valid: {taxonomy.kinds}")
            pairs.append((instruction, kind))
        n = len(pairs) if self.n_shots is None else self.n_shots
        if n >= len(pairs):
            return pairs
        # one example of each kind in turn (kinds and examples in a seeded order) until n are drawn
        rng = self.rng("shots")
        by_kind: dict[str, list[tuple[str, str]]] = {}
        for p in pairs:
            by_kind.setdefault(p[1], []).append(p)
        groups = list(by_kind.values())
        for g in groups:
            rng.shuffle(g)
        rng.shuffle(groups)
        drawn: list[tuple[str, str]] = []
        while len(drawn) < n:
            for g in groups:
                if g and len(drawn) < n:
                    drawn.append(g.pop())
        rng.shuffle(drawn)
        return drawn

    def semantic_params(self) -> dict[str, Any]:
        # files and example lists count by their content (fingerprint_extra), not by where they lie; the examples
        # shown (drawn, clipped) are there too, so n_shots=0 and no examples are one step
        params = super().semantic_params()
        for key in ("prompts", "taxonomy", "extend", "examples", "n_shots", "max_example_chars"):
            params.pop(key, None)
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        taxonomy = self._taxonomy()
        shots = self._shots(taxonomy)
        names = ("classify_few_shot", "example") if shots else ("classify",)
        return {
            "prompts": prompts_digest(PACKAGE, METHOD, names, self.language, self.prompts),
            "taxonomy": taxonomy.digest(),
            "shots": [[clip(i, self.max_example_chars), k] for i, k in shots],
        }

    # ---- lifecycle ----------------------------------------------------------------------------------

    def load(self) -> None:
        if getattr(self, "taxonomy_", None) is None:
            taxonomy = self._taxonomy()
            templates = self._templates()
            shots = self._shots(taxonomy)
            kinds = "\n".join(f"- {k.name}: {k.description}" for k in taxonomy)
            examples = "\n\n".join(
                templates["example"].render(instruction=clip(i, self.max_example_chars), task=k) for i, k in shots
            )
            self.prompt_ = templates["classify_few_shot"] if shots else templates["classify"]
            self.fills_ = {"kinds": kinds, "examples": examples} if shots else {"kinds": kinds}
            self.shots_ = shots
            self.taxonomy_: Taxonomy | None = taxonomy
        super().load()

    def unload(self) -> None:
        super().unload()
        self.taxonomy_ = None

    def begin(self) -> None:
        super().begin()
        self._zero()

    def _zero(self) -> None:
        self.lock_ = threading.Lock()
        self.counts_: Counter[str] = Counter()
        self.kinds_: Counter[str] = Counter()

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        if getattr(self, "kinds_", None) is not None:
            out["tasks"] = dict(self.kinds_.most_common())
            out["answers"] = {"off_list": 0, "from_text": 0, **dict(self.counts_)}
        return out

    # ---- the rows -----------------------------------------------------------------------------------

    def interpret(self, value: Any, text: str | None) -> tuple[str, str, bool, bool]:
        """(kind, the answer as given, whether it names a kind, whether it came from the reply's text rather than its
        JSON) for one reply (`value`: what the schema parsed, if any)."""
        assert self.taxonomy_ is not None
        if value is None and text is not None:  # no schema was sent: the reply may still be JSON
            value = ChoiceSchema({}, "task_kind").validate(text)
        if isinstance(value, Mapping) and isinstance(value.get("task"), str):
            raw, from_text = value["task"], False
        else:
            raw, from_text = (text if text is not None else "" if value is None else str(value)), True
        kind = match_kind(raw, self.taxonomy_.kinds)
        return (kind or DEFAULT_KIND), clip(raw.strip(), RAW_CHARS), kind is not None, from_text

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        self.load()
        assert self.taxonomy_ is not None
        if getattr(self, "kinds_", None) is None:  # driven directly, without the engine's begin()
            self._zero()
        n = batch.num_rows
        cols = batch.column_names
        instr = batch.column("instruction").to_pylist()
        inp = batch.column("input").to_pylist() if "input" in cols else [None] * n
        ids = batch.column("id").to_pylist() if "id" in cols else None
        tasks: list[str | None] = [None] * n
        raws: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        todo, convs = [], []
        for i in range(n):
            request = user_text(instr[i], inp[i])
            if not request.strip():
                errors[i] = f"{self.row_name(ids, i)}: field 'instruction' is empty; there is nothing to classify"
                continue
            content = self.prompt_.render(instruction=clip(request, self.max_chars), **self.fills_)
            convs.append([{"role": "user", "content": content}])
            todo.append(i)
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.structured:
            params["response_format"] = choice_schema(self.taxonomy_.kinds)
        for k in ("temperature", "seed"):
            if getattr(self, k) is not None:
                params[k] = getattr(self, k)
        results = self.model().chat(convs, **params) if convs else []
        counts: Counter[str] = Counter()
        for i, res in zip(todo, results, strict=True):
            if res.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {res.error}"
                continue
            value = res.parsed[0] if res.parsed else None
            kind, raw, named, from_text = self.interpret(value, res.text)
            if not named:
                counts["off_list"] += 1
            if from_text:
                counts["from_text"] += 1
            tasks[i], raws[i] = kind, raw
        with self.lock_:
            self.counts_.update(counts)
            self.kinds_.update(t for t in tasks if t is not None)
        return {"task": pa.array(tasks, type=pa.string()), "task_raw": pa.array(raws, type=pa.string()), "error": errors}
