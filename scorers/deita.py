"""`DeitaScorer`: DEITA's complexity and quality scores, and their product, for each row.

Expected scores (`method="expected"`, DEITA's scorer): the model is asked to rate the instruction's complexity, and
the (instruction, answer) pair's quality, from 1 to 6; the score is the expectation over the digits "1"-"6" of the
model's distribution for the first token of its answer (softmax over the six, weighted mean). Two ways to read that
distribution, whichever the backend offers:
- a local model (`Transformers`, default: the bundled SmolLM2-135M on the CPU; DEITA's published scorers by path on
  a GPU): the prompt is rendered with the model's chat template and the six digits are scored as next tokens;
- a served model (any OpenAI-compatible server that returns `top_logprobs`: vLLM, SGLang, llama.cpp, OpenAI): one
  short chat request; the top log-probabilities at the first answer position that holds a digit 1-6.
Multi-turn rows are scored turn by turn (each user turn's complexity, each (user, assistant) pair's quality):
`deita_score` = sum over turns of complexity x quality, `deita_complexity` / `deita_quality` are the means over
turns and `deita_complexity_turns` / `deita_quality_turns` list them.

Ranking (`method="rank"`, DEITA's way of labelling its scorer's data, for backends without log-probabilities): the
variants of one instruction, its Evol-Instruct lineage (rows linked by `parent_id` up to a common root, as
EvolInstruct writes them; at most `max_group` a request, DEITA used 6), are shown together in one request and the
model scores each 1-6 in a JSON reply, once for complexity (instructions) and once for quality (instruction and
answer); a row without relatives is scored alone. Rank mode scores the last turn.

A global step: lineages cross batch boundaries, so it sees the whole table (every request goes through the request
cache, so a resumed run asks only what had no answer). It keeps every row; a row that could not be scored leaves
through `failed` with the reason (the reply quoted). Selection by score with diversity is the selection steps' job.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from thresher.data.messages import history_pairs, user_text
from thresher.errors import BackendError, ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt
from thresher.pipelines.step import GlobalFilter
from thresher.scorers._common import (
    Rows,
    clip,
    expected_from_logprobs,
    load_templates,
    score_of_token,
    templates_digest,
    text_of,
    top_entries,
)

METHOD = "deita"
METHODS = ("expected", "rank")
PROMPT_NAMES = ("complexity", "quality", "rank_complexity", "rank_quality")
SCORES = range(1, 7)
DIGITS = tuple(str(s) for s in SCORES)
_FILLS = {
    "complexity": {"instruction"},
    "quality": {"instruction", "response"},
    "rank_complexity": {"instructions", "count"},
    "rank_quality": {"pairs", "count"},
}
_LABELS = {"en": ("Request", "Answer"), "zh": ("请求", "回答")}


def turns_of(instruction: Any, input_: Any, history: Any, output: Any) -> list[tuple[str, str | None]]:
    """A row's (user, assistant) turns: its history pairs, then the last user turn with `output`."""
    return [*history_pairs(history), (user_text(instruction, input_), None if output is None else text_of(output))]


def lineage_roots(ids: list[Any], parents: list[Any]) -> list[Any]:
    """Each row's lineage root: follow `parent_id` through the table's ids until a parent that is not in the table
    (an input row of EvolInstruct) or no parent. A cycle ends at the row where it closes."""
    parent_of = {i: p for i, p in zip(ids, parents, strict=True) if i is not None}
    roots = []
    for i, p in zip(ids, parents, strict=True):
        seen = {i}
        at = i if p is None else p
        while at in parent_of and parent_of[at] is not None and at not in seen:
            seen.add(at)
            at = parent_of[at]
        roots.append(at)
    return roots


class DeitaScorer(ModelStep, GlobalFilter):
    """DEITA complexity, quality and score columns (see the module docstring).

    backend: the scorer model: a spec dict or backend object; None is the bundled SmolLM2 in transformers for
    `method="expected"` and the embedded llama.cpp model for `method="rank"`. method: "expected" or "rank".
    lineage: the column linking evolved variants to their parent (rank mode). max_group: variants per ranking
    request. top_logprobs: how many a served model is asked for. language: "en" or "zh" (the shipped templates);
    prompts: {template: file} overrides (names: complexity, quality, rank_complexity, rank_quality).
    """

    inputs = ("instruction", "output")
    outputs = ("deita_complexity", "deita_quality", "deita_score")
    VERSION = "1"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        method: str = "expected",
        lineage: str = "parent_id",
        max_group: int = 6,
        top_logprobs: int = 20,
        language: str = "en",
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_tokens: int = 256,
        seed: int | None = None,
        api_key: str | None = secret(),
        batch_size: int = runtime(64),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.method = method
        self.lineage = lineage
        self.max_group = max_group
        self.top_logprobs = top_logprobs
        self.language = language
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- configuration --------------------------------------------------------------------------

    def _spec(self, param: str) -> Any:
        if self.backend is None and param == "backend" and self.method == "expected":
            return {"kind": "transformers"}  # the bundled SmolLM2 scored in transformers: llama.cpp gives no logprobs
        return super()._spec(param)

    def _names(self) -> tuple[str, ...]:
        return ("complexity", "quality") if self.method == "expected" else ("rank_complexity", "rank_quality")

    def _templates(self) -> dict[str, Prompt]:
        fills = {n: _FILLS[n] for n in self._names()}
        return load_templates(type(self).__name__, METHOD, fills, self.language, self.prompts, PROMPT_NAMES)

    def check(self) -> None:
        name = type(self).__name__
        if self.method not in METHODS:
            raise ConfigError(f"{name}: unknown method {self.method!r}; valid: {list(METHODS)}")
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        for key in ("max_group", "max_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not 6 <= self.top_logprobs <= 20:
            raise ConfigError(f"{name}: top_logprobs must be an integer in 6..20 (room for the six digits), got {self.top_logprobs!r}")
        if not isinstance(self.lineage, str) or not self.lineage:
            raise ConfigError(f"{name}: lineage must name a column, got {self.lineage!r}")
        self._templates()
        super().check()
        if self.method == "expected":
            backend = self._build("backend")
            if not self._local(backend) and getattr(backend, "kind", None) != "openai":
                raise ConfigError(
                    f"{name}: method='expected' needs a model's score distribution: a local model with render() and "
                    f"next_token_logprobs() (kind: transformers) or an OpenAI-compatible server that returns "
                    f"top_logprobs (kind: openai); {backend!r} has neither. Use method='rank' for it"
                )

    @staticmethod
    def _local(backend: Any) -> bool:
        return callable(getattr(backend, "next_token_logprobs", None)) and callable(getattr(backend, "render", None))

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"prompts": templates_digest(METHOD, self._names(), self.language, self.prompts)}

    def reads(self) -> tuple[str, ...]:
        return ("instruction", "output") + ((self.lineage,) if self.method == "rank" else ())

    def writes(self) -> tuple[str, ...]:
        turns = ("deita_complexity_turns", "deita_quality_turns") if self.method == "expected" else ()
        return (*self.outputs, *turns)

    # ---- per-run figures ------------------------------------------------------------------------

    def begin(self) -> None:
        super().begin()
        self._zero()

    def _zero(self) -> None:
        self.lock_ = threading.Lock()
        self.figures_: dict[str, Counter[int]] = {"complexity": Counter(), "quality": Counter()}
        self.sums_: Counter[str] = Counter()
        self.failures_: Counter[str] = Counter()

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        if getattr(self, "figures_", None) is None:
            return out
        n = self.sums_["rows"]
        out["deita"] = {
            "method": self.method,
            "rows_scored": n,
            "mean_complexity": round(self.sums_["complexity"] / n, 4) if n else None,
            "mean_quality": round(self.sums_["quality"] / n, 4) if n else None,
            "mean_score": round(self.sums_["score"] / n, 4) if n else None,
            # expected scores rounded to the nearest whole score
            "complexity_distribution": {str(k): v for k, v in sorted(self.figures_["complexity"].items())},
            "quality_distribution": {str(k): v for k, v in sorted(self.figures_["quality"].items())},
            "failures": dict(self.failures_),
        }
        return out

    # ---- the rows -------------------------------------------------------------------------------

    def keep(self, table: pa.Table) -> tuple[Any, Any, Mapping[str, Any]]:
        if getattr(self, "figures_", None) is None:  # driven directly, without the engine's begin()
            self._zero()
        templates = self._templates()
        rows = Rows.of(table, ("output", self.lineage))
        errors: list[list[str]] = [[] for _ in range(rows.n)]
        if self.method == "expected":
            cols = self._expected(rows, templates, errors)
        else:
            cols = self._ranked(rows, templates, errors)
        for i in range(rows.n):
            if errors[i]:
                for values in cols.values():
                    values[i] = None
                continue
            if cols["deita_score"][i] is not None:
                with self.lock_:
                    self.sums_["rows"] += 1
                    for k in ("complexity", "quality", "score"):
                        self.sums_[k] += cols[f"deita_{k}"][i]
                    self.figures_["complexity"][round(cols["deita_complexity"][i])] += 1
                    self.figures_["quality"][round(cols["deita_quality"][i])] += 1
        columns: dict[str, Any] = {
            k: pa.array(v, type=pa.list_(pa.float64()) if k.endswith("_turns") else pa.float64()) for k, v in cols.items()
        }
        columns["error"] = ["; ".join(e) if e else None for e in errors]
        return [True] * rows.n, "", columns

    def _fail(self, errors: list[list[str]], i: int, kind: str, message: str) -> None:
        errors[i].append(message)
        with self.lock_:
            self.failures_[kind] += 1

    def _turns(self, rows: Rows, i: int, errors: list[list[str]]) -> list[tuple[str, str | None]] | None:
        """Row i's turns, or None (and the reason in `errors`) when it cannot be scored."""
        try:
            turns = turns_of(rows.instruction[i], rows.input[i], rows.history[i], rows.columns["output"][i])
        except ValueError as e:
            self._fail(errors, i, "bad_row", f"{rows.name(i)}: field 'history': {e}")
            return None
        if not turns[-1][0].strip():
            self._fail(errors, i, "bad_row", f"{rows.name(i)}: field 'instruction' is empty; there is nothing to score")
            return None
        if turns[-1][1] is None:
            self._fail(errors, i, "bad_row", f"{rows.name(i)}: field 'output' is null; quality needs an answer")
            return None
        return turns

    # expected scores ---------------------------------------------------------------------------

    def _expected(self, rows: Rows, templates: Mapping[str, Prompt], errors: list[list[str]]) -> dict[str, list[Any]]:
        prompts: list[str] = []
        where: list[tuple[int, int, str]] = []  # (row, turn, "complexity" | "quality")
        n_turns = [0] * rows.n
        for i in range(rows.n):
            turns = self._turns(rows, i, errors)
            if turns is None:
                continue
            n_turns[i] = len(turns)
            for t, (user, answer) in enumerate(turns):
                prompts.append(templates["complexity"].render(instruction=user))
                where.append((i, t, "complexity"))
                prompts.append(templates["quality"].render(instruction=user, response=answer or ""))
                where.append((i, t, "quality"))
        values = self._distributions(prompts, where, rows, errors)
        per: dict[str, list[list[float | None]]] = {
            k: [[None] * n_turns[i] for i in range(rows.n)] for k in ("complexity", "quality")
        }
        for (i, t, kind), v in zip(where, values, strict=True):
            per[kind][i][t] = v
        cols: dict[str, list[Any]] = {
            k: [None] * rows.n
            for k in ("deita_complexity", "deita_quality", "deita_score", "deita_complexity_turns", "deita_quality_turns")
        }
        for i in range(rows.n):
            c, q = per["complexity"][i], per["quality"][i]
            if errors[i] or not c or any(v is None for v in c + q):
                continue
            cs, qs = [float(v) for v in c if v is not None], [float(v) for v in q if v is not None]
            cols["deita_complexity"][i], cols["deita_quality"][i] = sum(cs) / len(cs), sum(qs) / len(qs)
            cols["deita_score"][i] = sum(a * b for a, b in zip(cs, qs, strict=True))
            cols["deita_complexity_turns"][i], cols["deita_quality_turns"][i] = cs, qs
        return cols

    def _distributions(
        self, prompts: list[str], where: list[tuple[int, int, str]], rows: Rows, errors: list[list[str]]
    ) -> list[float | None]:
        """The expected score of each prompt (None where the row failed; the reason is in `errors`)."""
        backend = self.model()
        out: list[float | None] = []
        step = max(1, self.batch_size)
        for lo in range(0, len(prompts), step):
            chunk, places = prompts[lo : lo + step], where[lo : lo + step]
            if self._local(backend):
                out += self._local_scores(backend, chunk, places, rows, errors)
            else:
                out += self._served_scores(backend, chunk, places, rows, errors)
        return out

    def _local_scores(
        self, backend: Any, chunk: list[str], places: list[tuple[int, int, str]], rows: Rows, errors: list[list[str]]
    ) -> list[float | None]:
        rendered = [backend.render([{"role": "user", "content": p}]) for p in chunk]
        try:
            dists = backend.next_token_logprobs(rendered, DIGITS)
        except BackendError:  # a prompt too long for the model: find it, score the others
            dists = []
            for (i, t, kind), text in zip(places, rendered, strict=True):
                try:
                    dists += backend.next_token_logprobs([text], DIGITS)
                except BackendError as e:
                    self._fail(errors, i, "too_long", f"{rows.name(i)}: scoring turn {t + 1}'s {kind}: {e}")
                    dists.append({})
        return [expected_from_logprobs(list(d.items()), SCORES) if d else None for d in dists]

    def _served_scores(
        self, backend: Any, chunk: list[str], places: list[tuple[int, int, str]], rows: Rows, errors: list[list[str]]
    ) -> list[float | None]:
        params: dict[str, Any] = {"max_tokens": 4, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        if self.seed is not None:
            params["seed"] = self.seed
        results = backend.chat([[{"role": "user", "content": p}] for p in chunk], **params)
        out: list[float | None] = []
        for (i, t, kind), res in zip(places, results, strict=True):
            what = f"turn {t + 1}'s {kind}"
            if res.error is not None:
                self._fail(errors, i, "request", f"{rows.name(i)}: scoring {what}: {res.error}")
                out.append(None)
                continue
            value = first_digit_expectation((res.logprobs or [None])[0])
            if value is None:
                why = "sent no log-probabilities" if not (res.logprobs or [None])[0] else "has no digit 1-6 among its top log-probabilities"
                self._fail(errors, i, "no_score", f"{rows.name(i)}: the reply scoring {what} {why}: {clip(res.text)}")
            out.append(value)
        return out

    # ranking -----------------------------------------------------------------------------------

    def _ranked(self, rows: Rows, templates: Mapping[str, Prompt], errors: list[list[str]]) -> dict[str, list[Any]]:
        ids = rows.ids if rows.ids is not None else list(range(rows.n))
        roots = lineage_roots(list(ids), rows.columns[self.lineage])
        groups: dict[Any, list[int]] = {}
        users: list[str] = [""] * rows.n
        answers: list[str | None] = [None] * rows.n
        for i in range(rows.n):
            turns = self._turns(rows, i, errors)
            if turns is not None:
                users[i], answers[i] = turns[-1]
                groups.setdefault(roots[i], []).append(i)
        chunks = [g[k : k + self.max_group] for g in groups.values() for k in range(0, len(g), self.max_group)]
        req, ans = _LABELS[self.language]
        convs: list[list[dict[str, str]]] = []
        asks: list[tuple[list[int], str]] = []
        for members in chunks:
            listed = "\n\n".join(f"[{k + 1}] {users[i]}" for k, i in enumerate(members))
            convs.append([{"role": "user", "content": templates["rank_complexity"].render(instructions=listed, count=len(members))}])
            asks.append((members, "complexity"))
            pairs = "\n\n".join(f"[{k + 1}] {req}: {users[i]}\n[{k + 1}] {ans}: {answers[i]}" for k, i in enumerate(members))
            convs.append([{"role": "user", "content": templates["rank_quality"].render(pairs=pairs, count=len(members))}])
            asks.append((members, "quality"))
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0.0}
        if self.seed is not None:
            params["seed"] = self.seed
        results = []
        backend = self.model()
        step = max(1, self.batch_size)
        for lo in range(0, len(convs), step):
            batch = convs[lo : lo + step]
            schemas = {len(a[0]) for a in asks[lo : lo + step]}
            for size in sorted(schemas):  # one call per list length: the schema fixes how many scores come back
                pick = [k for k in range(len(batch)) if len(asks[lo + k][0]) == size]
                got = backend.chat([batch[k] for k in pick], response_format=rank_schema(size), **params)
                results += list(zip([lo + k for k in pick], got, strict=True))
        results.sort(key=lambda kv: kv[0])
        cols: dict[str, list[Any]] = {k: [None] * rows.n for k in ("deita_complexity", "deita_quality", "deita_score")}
        for (members, kind), (_, res) in zip(asks, results, strict=True):
            scores = None
            if res.error is None:
                value = (res.parsed or [None])[0]
                scores = value.get("scores") if isinstance(value, Mapping) else None
                ok = isinstance(scores, list) and len(scores) == len(members) and all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 1 <= s <= 6 for s in scores
                )
                if not ok:
                    scores = None
            for k, i in enumerate(members):
                if scores is None:
                    why = res.error or f"the reply gives no {len(members)} scores from 1 to 6: {clip(res.text)}"
                    self._fail(errors, i, "no_score", f"{rows.name(i)}: ranking {kind} among {len(members)} variant(s): {why}")
                else:
                    cols[f"deita_{kind}"][i] = float(scores[k])
        for i in range(rows.n):
            c, q = cols["deita_complexity"][i], cols["deita_quality"][i]
            if c is not None and q is not None:
                cols["deita_score"][i] = c * q
        return cols


def rank_schema(count: int) -> dict[str, Any]:
    """The JSON a ranking reply must follow: exactly `count` scores."""
    return {
        "title": "scores",
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "number"}, "minItems": count, "maxItems": count}},
        "required": ["scores"],
    }


def first_digit_expectation(entries: Any) -> float | None:
    """DEITA's expectation from a served reply's log-probabilities: at the first answer position whose top list holds
    a digit 1-6 (the first token, unless the model opens with a quote or a space)."""
    for entry in entries or []:
        pairs = top_entries(entry)
        if not pairs and score_of_token(str(entry.get("token", "")), SCORES) is not None:
            pairs = [(str(entry["token"]), float(entry.get("logprob", 0.0)))]
        value = expected_from_logprobs(pairs, SCORES)
        if value is not None:
            return value
    return None
