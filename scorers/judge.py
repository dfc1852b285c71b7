"""`LLMJudge`: a chat model scores each row's answer 0-5 on named dimensions, or compares two answers pairwise.

Scoring (AlpaGasus-style): per row and dimension one request with our `score` template, which asks for the score
alone on the first line and the explanation after it; the reply is read by `judge_parse.parse_score`, so "Score:
4.5/5", "**4**", a score after prose or "4分" all count, and a reply with no score fails the row with the reply
quoted (it never becomes a 0). Columns: `judge_<dimension>` (the score) and `judge_<dimension>_reason`. With
`one_request=True` every dimension is asked at once for a JSON object ({dimension: {score, explanation}}) through
the backend's structured output. With `expected_scores=True` the request also asks for top log-probabilities and
`judge_<dimension>_expected` holds the probability-weighted mean over the score tokens 0-5 at the token where the
score was written (an integer grid: for "4.5" the "4" token's distribution), null where the backend sent none.

Pairwise (`compare_with` names a second answer column): each dimension is asked twice, once with each answer shown
first; an answer wins only when both orders pick it, anything else is a tie (position bias cancels out instead of
deciding). Columns: `judge_<dimension>_winner` (the winning column's name, or "tie"), `judge_<dimension>_orders` (the
winner each order gave) and `judge_<dimension>_reason`.

Dimensions are described in the `dimensions` template (key | name shown | what to look at), shipped for accuracy,
helpfulness, relevance, level_of_detail, harmlessness, honesty, coherence and instruction_following in English and
Chinese; `rubrics` adds or replaces descriptions. Thresholds (AlpaGasus keeps accuracy >= 4.5) are the job of a
filter downstream: the judge writes columns and removes nothing.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from thresher.data.messages import history_pairs, system_text, user_text
from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt
from thresher.pipelines.step import RowStep
from thresher.scorers._common import (
    Rows,
    clip,
    expected_from_logprobs,
    load_templates,
    score_position,
    templates_digest,
    text_of,
    top_entries,
)
from thresher.scorers.judge_parse import parse_score, parse_verdict

METHOD = "judge"
PROMPT_NAMES = ("score", "score_all", "pairwise", "dimensions")
SCORES = range(0, 6)
_FILLS = {
    "score": {"dimension", "description", "instruction", "response"},
    "score_all": {"rubric", "keys", "instruction", "response"},
    "pairwise": {"dimension", "description", "instruction", "first", "second"},
    "dimensions": set(),
}
_DIMENSION_NAME = re.compile(r"^\w+$")


def dimension_table(template: Prompt) -> dict[str, tuple[str, str]]:
    """{key: (name shown, description)} from a `dimensions` template: `key | name | description` lines."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(template.text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"prompt {template.path}, line {n}: expected 'key | name | description', got {line!r}")
        out[parts[0]] = (parts[1], parts[2])
    return out


def request_text(instruction: Any, input_: Any, system: Any, history: Any) -> str:
    """What the judge is shown as the user's request: the last user turn, after the system text and earlier turns
    (marked [system] / [user] / [assistant]) when the row has them."""
    last = user_text(instruction, input_)
    sys_text = system_text(system)
    turns = history_pairs(history)
    if sys_text is None and not turns:
        return last
    parts = [f"[system] {sys_text}"] if sys_text is not None else []
    for u, a in turns:
        parts += [f"[user] {u}", f"[assistant] {a}"]
    parts.append(f"[user] {last}")
    return "\n".join(parts)


class LLMJudge(ModelStep, RowStep):
    """Score answers 0-5 on named dimensions, or compare two answer columns pairwise (see the module docstring).

    backend: the judge model (a spec dict, a backend object, or None for the embedded llama.cpp model).
    dimensions: the dimensions to judge (default ["accuracy"]); rubrics: {dimension: description} for dimensions the
    shipped `dimensions` template lacks, or to replace its wording. response: the answer column judged;
    compare_with: a second answer column for pairwise mode. one_request: all dimensions in one structured (JSON)
    reply instead of one request each. expected_scores: also ask for `top_logprobs` log-probabilities and write
    `judge_<dimension>_expected`. language: "en" or "zh" (the shipped templates); prompts: {template: file}
    overrides (names: score, score_all, pairwise, dimensions).
    """

    inputs = ("instruction", "output")
    outputs = ("judge_accuracy", "judge_accuracy_reason")
    VERSION = "1"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        dimensions: Sequence[str] | None = None,
        rubrics: Mapping[str, str] | None = None,
        response: str = "output",
        compare_with: str | None = None,
        one_request: bool = False,
        expected_scores: bool = False,
        top_logprobs: int = 20,
        language: str = "en",
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_tokens: int = 256,
        temperature: float | None = 0.0,
        seed: int | None = None,
        api_key: str | None = secret(),
        batch_size: int = runtime(256),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.dimensions = dimensions
        self.rubrics = rubrics
        self.response = response
        self.compare_with = compare_with
        self.one_request = one_request
        self.expected_scores = expected_scores
        self.top_logprobs = top_logprobs
        self.language = language
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- configuration --------------------------------------------------------------------------

    def _dims(self) -> list[str]:
        return ["accuracy"] if self.dimensions is None else list(self.dimensions)

    def _mode_template(self) -> str:
        return "pairwise" if self.compare_with else "score_all" if self.one_request else "score"

    def _templates(self) -> dict[str, Prompt]:
        names = (self._mode_template(), "dimensions")
        return load_templates(
            type(self).__name__, METHOD, {n: _FILLS[n] for n in names}, self.language, self.prompts, PROMPT_NAMES
        )

    def _described(self, templates: Mapping[str, Prompt]) -> dict[str, tuple[str, str]]:
        table = dimension_table(templates["dimensions"])
        for key, text in (self.rubrics or {}).items():
            table[key] = (table[key][0] if key in table else key.replace("_", " "), str(text))
        return table

    def check(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        dims = self._dims()
        if isinstance(self.dimensions, str) or not dims:
            raise ConfigError(f"{name}: dimensions must be a non-empty list of names, got {self.dimensions!r}")
        if len(set(dims)) != len(dims):
            raise ConfigError(f"{name}: dimensions lists a dimension twice: {dims}")
        for d in dims:
            if not isinstance(d, str) or not _DIMENSION_NAME.match(d):
                raise ConfigError(f"{name}: dimension {d!r} must be a word (letters, digits, _): it names columns")
        if self.rubrics is not None and not isinstance(self.rubrics, Mapping):
            raise ConfigError(f"{name}: rubrics must be a mapping {{dimension: description}}, got {self.rubrics!r}")
        if not isinstance(self.response, str) or not self.response:
            raise ConfigError(f"{name}: response must name a column, got {self.response!r}")
        if self.compare_with is not None:
            if self.compare_with == self.response or self.compare_with == "tie" or self.response == "tie":
                raise ConfigError(
                    f"{name}: compare_with must name a second answer column other than {self.response!r} (and not "
                    f"'tie', the tie value), got {self.compare_with!r}"
                )
            if self.one_request or self.expected_scores:
                raise ConfigError(f"{name}: pairwise mode (compare_with) takes neither one_request nor expected_scores")
        if self.one_request and self.expected_scores:
            raise ConfigError(
                f"{name}: expected_scores needs one request per dimension (the score token of each); set one_request=False"
            )
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not 1 <= self.top_logprobs <= 20:
            raise ConfigError(f"{name}: top_logprobs must be an integer in 1..20, got {self.top_logprobs!r}")
        for key in ("max_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
        table = self._described(self._templates())
        missing = [d for d in dims if d not in table]
        if missing:
            raise ConfigError(
                f"{name}: no description for dimension(s) {missing}: give rubrics={{name: description}}; "
                f"described: {sorted(table)}"
            )
        super().check()

    def fingerprint_extra(self) -> dict[str, Any]:
        names = (self._mode_template(), "dimensions")
        return {"prompts": templates_digest(METHOD, names, self.language, self.prompts)}

    def reads(self) -> tuple[str, ...]:
        return ("instruction", self.response) + ((self.compare_with,) if self.compare_with else ())

    def writes(self) -> tuple[str, ...]:
        cols: list[str] = []
        for d in self._dims():
            if self.compare_with:
                cols += [f"judge_{d}_winner", f"judge_{d}_orders", f"judge_{d}_reason"]
            else:
                cols += [f"judge_{d}", f"judge_{d}_reason"] + ([f"judge_{d}_expected"] if self.expected_scores else [])
        return tuple(cols)

    # ---- per-run figures ------------------------------------------------------------------------

    def begin(self) -> None:
        super().begin()
        self._zero()

    def _zero(self) -> None:
        self.lock_ = threading.Lock()
        self.scores_: dict[str, Counter[float]] = {d: Counter() for d in self._dims()}
        self.expected_: dict[str, list[float]] = {d: [] for d in self._dims()}
        self.no_score_: Counter[str] = Counter()
        self.winners_: dict[str, Counter[str]] = {d: Counter() for d in self._dims()}
        self.disagreements_: Counter[str] = Counter()

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        if getattr(self, "scores_", None) is None:
            return out
        dims: dict[str, Any] = {}
        for d in self._dims():
            if self.compare_with:
                dims[d] = {"winners": dict(self.winners_[d]), "orders_disagree": self.disagreements_[d],
                           "no_verdict": self.no_score_[d]}  # fmt: skip
                continue
            c = self.scores_[d]
            n = sum(c.values())
            exp = self.expected_[d]
            dims[d] = {
                "scored": n,
                "mean": round(sum(k * v for k, v in c.items()) / n, 4) if n else None,
                "distribution": {str(k): c[k] for k in sorted(c)},
                "no_score": self.no_score_[d],
            }
            if self.expected_scores:
                dims[d]["expected_mean"] = round(sum(exp) / len(exp), 4) if exp else None
                dims[d]["expected_missing"] = n - len(exp)
        out["dimensions"] = dims
        return out

    # ---- the rows -------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.seed is not None:
            params["seed"] = self.seed
        if self.expected_scores:
            params["logprobs"] = True
            params["top_logprobs"] = self.top_logprobs
        return params

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        if getattr(self, "scores_", None) is None:  # driven directly, without the engine's begin()
            self._zero()
        templates = self._templates()
        table = self._described(templates)
        extra = [self.response] + ([self.compare_with] if self.compare_with else [])
        rows = Rows.of(batch, extra)
        errors: list[list[str]] = [[] for _ in range(rows.n)]
        requests: list[str | None] = [None] * rows.n
        for i in range(rows.n):
            if not text_of(rows.instruction[i]).strip():
                errors[i].append(f"{rows.name(i)}: field 'instruction' is empty; there is nothing to judge against")
                continue
            for col in extra:
                if rows.columns[col][i] is None:
                    errors[i].append(f"{rows.name(i)}: field {col!r} is null; there is no answer to judge")
            if errors[i]:
                continue
            try:
                requests[i] = request_text(rows.instruction[i], rows.input[i], rows.system[i], rows.history[i])
            except ValueError as e:
                errors[i].append(f"{rows.name(i)}: field 'history': {e}")
        todo = [i for i in range(rows.n) if requests[i] is not None]
        if self.compare_with:
            columns = self._pairwise(rows, todo, requests, templates["pairwise"], table, errors)
        elif self.one_request:
            columns = self._all_at_once(rows, todo, requests, templates["score_all"], table, errors)
        else:
            columns = self._one_by_one(rows, todo, requests, templates["score"], table, errors)
        columns["error"] = ["; ".join(e) if e else None for e in errors]
        return columns

    def _one_by_one(
        self, rows: Rows, todo: list[int], requests: list[str | None], tpl: Prompt,
        table: Mapping[str, tuple[str, str]], errors: list[list[str]],
    ) -> dict[str, Any]:  # fmt: skip
        dims = self._dims()
        convs, where = [], []
        for i in todo:
            for d in dims:
                shown, desc = table[d]
                text = tpl.render(dimension=shown, description=desc, instruction=requests[i],
                                  response=text_of(rows.columns[self.response][i]))  # fmt: skip
                convs.append([{"role": "user", "content": text}])
                where.append((i, d))
        results = self.model().chat(convs, **self._params()) if convs else []
        score: dict[str, list[float | None]] = {d: [None] * rows.n for d in dims}
        reason: dict[str, list[str | None]] = {d: [None] * rows.n for d in dims}
        expected: dict[str, list[float | None]] = {d: [None] * rows.n for d in dims}
        for (i, d), res in zip(where, results, strict=True):
            if res.error is not None:
                errors[i].append(f"{rows.name(i)}: judging {d}: {res.error}")
                continue
            parsed = parse_score(res.text, 0, 5, labels=(d, table[d][0]))
            if parsed is None:
                errors[i].append(f"{rows.name(i)}: the judge's reply on {d} gives no score from 0 to 5: {clip(res.text)}")
                with self.lock_:
                    self.no_score_[d] += 1
                continue
            score[d][i], reason[d][i] = parsed.value, parsed.reason
            if self.expected_scores:
                expected[d][i] = reply_expected(res, parsed.start, SCORES)
        out: dict[str, Any] = {}
        with self.lock_:
            for d in dims:
                for i in range(rows.n):
                    if errors[i]:  # a failed row leaves whole: its other dimensions are not counted either
                        score[d][i] = reason[d][i] = expected[d][i] = None
                    elif score[d][i] is not None:
                        self.scores_[d][score[d][i]] += 1  # type: ignore[index]
                        if expected[d][i] is not None:
                            self.expected_[d].append(expected[d][i])  # type: ignore[arg-type]
                out[f"judge_{d}"] = pa.array(score[d], type=pa.float64())
                out[f"judge_{d}_reason"] = pa.array(reason[d], type=pa.string())
                if self.expected_scores:
                    out[f"judge_{d}_expected"] = pa.array(expected[d], type=pa.float64())
        return out

    def _all_at_once(
        self, rows: Rows, todo: list[int], requests: list[str | None], tpl: Prompt,
        table: Mapping[str, tuple[str, str]], errors: list[list[str]],
    ) -> dict[str, Any]:  # fmt: skip
        dims = self._dims()
        rubric = "\n".join(f"- {d} ({table[d][0]}): {table[d][1]}" for d in dims)
        keys = ", ".join(dims)
        item = {
            "type": "object",
            "properties": {"score": {"type": ["number", "string"]}, "explanation": {"type": "string"}},
            "required": ["score"],
        }
        schema = {"title": "judgement", "type": "object", "properties": dict.fromkeys(dims, item), "required": dims}
        convs = []
        for i in todo:
            answer = text_of(rows.columns[self.response][i])
            text = tpl.render(rubric=rubric, keys=keys, instruction=requests[i], response=answer)
            convs.append([{"role": "user", "content": text}])
        results = self.model().chat(convs, response_format=schema, **self._params()) if convs else []
        score: dict[str, list[float | None]] = {d: [None] * rows.n for d in dims}
        reason: dict[str, list[str | None]] = {d: [None] * rows.n for d in dims}
        for i, res in zip(todo, results, strict=True):
            if res.error is not None:
                errors[i].append(f"{rows.name(i)}: judging {keys}: {res.error}")
                continue
            value = (res.parsed or [None])[0]
            got: dict[str, tuple[float, str]] = {}
            for d in dims:
                entry = value.get(d) if isinstance(value, Mapping) else None
                raw = entry.get("score") if isinstance(entry, Mapping) else None
                parsed = None if isinstance(raw, bool) else parse_score(str(raw), 0, 5) if raw is not None else None
                if parsed is None:
                    errors[i].append(f"{rows.name(i)}: the judge's reply gives no score from 0 to 5 for {d}: {clip(res.text)}")
                    with self.lock_:
                        self.no_score_[d] += 1
                    continue
                got[d] = (parsed.value, text_of(entry.get("explanation") if isinstance(entry, Mapping) else None))
            if not errors[i]:
                for d, (v, why) in got.items():
                    score[d][i], reason[d][i] = v, why
        with self.lock_:
            for d in dims:
                for value in score[d]:
                    if value is not None:
                        self.scores_[d][value] += 1
        out: dict[str, Any] = {}
        for d in dims:
            out[f"judge_{d}"] = pa.array(score[d], type=pa.float64())
            out[f"judge_{d}_reason"] = pa.array(reason[d], type=pa.string())
        return out

    def _pairwise(
        self, rows: Rows, todo: list[int], requests: list[str | None], tpl: Prompt,
        table: Mapping[str, tuple[str, str]], errors: list[list[str]],
    ) -> dict[str, Any]:  # fmt: skip
        dims = self._dims()
        a_col, b_col = self.response, str(self.compare_with)
        convs, where = [], []
        for i in todo:
            a, b = text_of(rows.columns[a_col][i]), text_of(rows.columns[b_col][i])
            for d in dims:
                shown, desc = table[d]
                for first, second, order in ((a, b, 0), (b, a, 1)):
                    text = tpl.render(dimension=shown, description=desc, instruction=requests[i], first=first,
                                      second=second)  # fmt: skip
                    convs.append([{"role": "user", "content": text}])
                    where.append((i, d, order))
        results = self.model().chat(convs, **self._params()) if convs else []
        picks: dict[tuple[int, str], list[str | None]] = {}
        reasons: dict[tuple[int, str], list[str]] = {}
        for (i, d, order), res in zip(where, results, strict=True):
            shown_first = (a_col, b_col) if order == 0 else (b_col, a_col)
            if res.error is not None:
                errors[i].append(f"{rows.name(i)}: comparing on {d} with {shown_first[0]!r} first: {res.error}")
                continue
            verdict = parse_verdict(res.text)
            if verdict is None:
                errors[i].append(
                    f"{rows.name(i)}: the judge's reply on {d} with {shown_first[0]!r} first names no winner "
                    f"(A, B or tie): {clip(res.text)}"
                )
                with self.lock_:
                    self.no_score_[d] += 1
                continue
            pick = "tie" if verdict == "tie" else shown_first[0] if verdict == "A" else shown_first[1]
            picks.setdefault((i, d), [None, None])[order] = pick
            body = (res.text or "").strip().split("\n", 1)
            reasons.setdefault((i, d), ["", ""])[order] = f"[{shown_first[0]} shown first] {body[1].strip() if len(body) > 1 else body[0]}"
        out: dict[str, Any] = {}
        with self.lock_:
            for d in dims:
                winner: list[str | None] = [None] * rows.n
                orders: list[list[str | None] | None] = [None] * rows.n
                why: list[str | None] = [None] * rows.n
                for i in range(rows.n):
                    got = picks.get((i, d))
                    if errors[i] or got is None:
                        continue
                    winner[i] = got[0] if got[0] == got[1] and got[0] != "tie" else "tie"
                    orders[i], why[i] = got, "\n".join(reasons[(i, d)])
                    self.winners_[d][winner[i]] += 1  # type: ignore[index]
                    if got[0] != got[1]:
                        self.disagreements_[d] += 1
                out[f"judge_{d}_winner"] = pa.array(winner, type=pa.string())
                out[f"judge_{d}_orders"] = pa.array(orders, type=pa.list_(pa.string()))
                out[f"judge_{d}_reason"] = pa.array(why, type=pa.string())
        return out


def reply_expected(res: Any, char: int | None, scores: Sequence[int]) -> float | None:
    """The expected score of a reply with log-probabilities: at the token that wrote the score (found by `char`,
    the score's offset in the text), the weighted mean over the score tokens of its top list."""
    entries = (res.logprobs or [None])[0]
    if not entries:
        return None
    pos = score_position(entries, res.text, char, scores)
    if pos is None:
        return None
    entry = entries[pos]
    pairs = top_entries(entry) or [(str(entry.get("token", "")), float(entry.get("logprob", 0.0)))]
    return expected_from_logprobs(pairs, scores)
