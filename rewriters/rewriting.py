"""What ReAlign and Polish share: ask a chat model for `n` rewrites of a row's response, keep the longest by tokens,
run the checks, and write the verdict.

Per row the step writes `output` (the rewrite, or the original when it is kept), `output_original` (the response
before the rewrite; an `output_original` an earlier rewriter wrote is kept, so it always holds the first one),
`<prefix>_status` ("rewritten", or "kept: <rule>: <why>") and `<prefix>_evidence` (the passages shown to the model:
text, source, score; null when none). Rules a row is kept by: the step's own (`empty`: no response to rewrite,
`keep_kind`: ReAlign's task kinds whose form is left alone, `truncated`: every candidate was cut off at
`max_tokens`), then the checks of `thresher.rewriters.checks` in order. A request that failed after the backend's
retries fails the row (the `failed` output), as in every model step.

The model's reply is the rewrite: a copy of the template's closing cue at its very start ("### Rewritten response",
"Rewritten response:") is dropped; anything else the template says that shows up in it is leaked scaffolding
(the `scaffolding` check, with the `### ...` section markers of the templates in use).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from thresher.data.messages import user_text
from thresher.errors import ConfigError
from thresher.pipelines.prompts import LANGUAGES, Prompt, check_overrides, load_prompt, prompts_digest
from thresher.rewriters.checks import CHECKS, run_checks
from thresher.rewriters.retrieval.base import Passage, make_retriever, retrieve_many
from thresher.rewriters.text import count_tokens

EVIDENCE_TYPE = pa.list_(pa.struct([("text", pa.string()), ("source", pa.string()), ("score", pa.float64())]))
_MARKER_LINE = re.compile(r"^###[^\S\n]*(\S[^\n$]*?)\s*$", re.MULTILINE)


def template_markers(templates: Sequence[str]) -> tuple[str, ...]:
    """The section markers of templates: every `### Title` line, as written and as "Title:"."""
    found: set[str] = set()
    for text in templates:
        for m in _MARKER_LINE.finditer(text):
            found.update({f"### {m.group(1)}", f"{m.group(1)}:", f"{m.group(1)}："})
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def strip_cue(text: str, cue: str) -> str:
    """The reply without a copy of the template's closing cue at its start (`### Rewritten response`, or the cue
    as a label: `Rewritten response:`)."""
    t = text.strip()
    for form in (f"### {cue}", f"{cue}:", f"{cue}：", f"**{cue}:**", f"**{cue}**", cue):
        if t.casefold().startswith(form.casefold()):
            return t[len(form) :].lstrip(" :：\n")
    return t


def format_evidence(passages: Sequence[Passage]) -> str:
    """Passages as the templates show them: numbered, each with its source."""
    return "\n\n".join(f"[{i}] ({p.source}) {p.text}" for i, p in enumerate(passages, 1))


class RewriteStep:
    """Mixin for steps that rewrite responses (put it first: `class Polish(RewriteStep, ModelStep, RowStep)`).

    The step stores `backend`, `retriever`, `language`, `prompts`, `n`, `checks`, `min_length_ratio`, `top_k`,
    `max_tokens`, `temperature`, `seed` and the runtime knobs. Subclasses set `METHOD` (the prompt folder),
    `PROMPT_NAMES`, `FILLS` (placeholders per template), `STATUS`/`EVIDENCE` (column names) and `CUE`.
    """

    METHOD: str = ""
    PROMPT_NAMES: tuple[str, ...] = ()
    FILLS: Mapping[str, set[str]] = {}
    STATUS: str = ""
    EVIDENCE: str = ""
    CUE: Mapping[str, str] = {"en": "Rewritten response", "zh": "改写后的回答"}

    retriever: Any
    language: str
    prompts: Mapping[str, Any] | None
    n: int
    checks: Sequence[str]
    min_length_ratio: float
    top_k: int
    max_tokens: int
    temperature: float | None
    batch_size: int

    # ---- configuration --------------------------------------------------------------------------

    def check(self) -> None:
        self._check_rewriting()
        super().check()  # type: ignore[misc]

    def _check_rewriting(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        for key in ("n", "top_k", "max_tokens", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {v!r}")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(f"{name}: n={self.n} candidates at temperature 0 are {self.n} copies of one rewrite; "
                              "raise the temperature or set n=1")  # fmt: skip
        r = self.min_length_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ConfigError(f"{name}: min_length_ratio must be a number in [0, 1], got {r!r}")
        if isinstance(self.checks, str) or not all(c in CHECKS for c in self.checks):
            raise ConfigError(f"{name}: checks must be a list of {list(CHECKS)}, got {self.checks!r}")
        check_overrides(self.METHOD, self.prompts, self.PROMPT_NAMES)
        self._templates()
        if self.retriever is not None:
            make_retriever(self.retriever).identity()  # a bad spec or an unreadable corpus fails here, for free

    def _templates(self) -> dict[str, Prompt]:
        out = {n: load_prompt("rewriters", self.METHOD, n, self.language, self.prompts) for n in self.PROMPT_NAMES}
        for n, t in out.items():
            if t.placeholders != self.FILLS[n]:
                raise ConfigError(f"{type(self).__name__}: prompt {t.path} has placeholders {sorted(t.placeholders)}; "
                                  f"the {n!r} template takes exactly {sorted(self.FILLS[n])}")  # fmt: skip
        return out

    def semantic_params(self) -> dict[str, Any]:
        params: dict[str, Any] = super().semantic_params()  # type: ignore[misc]
        if self.retriever is not None:
            params["retriever"] = make_retriever(self.retriever).identity()  # content, not where the index is kept
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = super().fingerprint_extra()  # type: ignore[misc]
        return {**extra, "prompts": prompts_digest("rewriters", self.METHOD, self.PROMPT_NAMES, self.language,
                                                   self.prompts)}  # fmt: skip

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        super().load()  # type: ignore[misc]
        if getattr(self, "retriever_", None) is None and self.retriever is not None:
            r = make_retriever(self.retriever)
            load = getattr(r, "load", None)
            if callable(load):
                load()
            self.retriever_: Any = r
        if getattr(self, "templates_", None) is None:
            self.templates_ = self._templates()
            self.markers_ = template_markers([t.text for t in self.templates_.values()])
        if getattr(self, "lock_", None) is None:
            self.lock_ = threading.Lock()

    def unload(self) -> None:
        super().unload()  # type: ignore[misc]
        r = getattr(self, "retriever_", None)
        close = getattr(r, "close", None)
        if r is not None and r is not self.retriever and callable(close):
            close()  # a retriever built from a spec; one the user handed over stays theirs
        self.retriever_ = None

    def begin(self) -> None:
        super().begin()  # type: ignore[misc]
        self._zero_counts()

    def _zero_counts(self) -> None:
        self.rewritten_ = 0
        self.kept_by_: Counter[str] = Counter()
        self.with_evidence_ = 0

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(super().metrics())  # type: ignore[misc]
        if getattr(self, "kept_by_", None) is not None:
            out.update(rewritten=self.rewritten_, kept_by=dict(self.kept_by_), with_evidence=self.with_evidence_)
        return out

    def start_batch(self) -> None:
        """Load (idempotent) and start the counters when the step is driven without the engine's begin()."""
        self.load()
        if getattr(self, "kept_by_", None) is None:
            self._zero_counts()

    # ---- the rows -------------------------------------------------------------------------------

    def evidence_for(self, questions: Sequence[str]) -> list[list[Passage]]:
        """The retriever's passages for each question ([] each when the step has no retriever)."""
        r = getattr(self, "retriever_", None)
        if r is None or not questions:
            return [[] for _ in questions]
        return retrieve_many(r, questions, self.top_k)

    def rewrite_rows(
        self,
        batch: pa.Table,
        todo: Mapping[int, tuple[str, Mapping[str, Any], list[Passage]]],
        status: list[str | None],
        errors: list[str | None],
    ) -> dict[str, Any]:
        """Ask for the rewrites of the `todo` rows ({row: (template name, fills, evidence)}), pick, check, and build
        the output columns. `status` holds the verdict already reached for other rows ("kept: ..."), `errors`
        the rows that failed."""
        n = batch.num_rows
        cols = batch.column_names
        outputs = batch.column("output").to_pylist()
        before = batch.column("output_original").to_pylist() if "output_original" in cols else [None] * n
        ids = batch.column("id").to_pylist() if "id" in cols else None
        rows = list(todo)
        convs = [[{"role": "user", "content": self.templates_[todo[i][0]].render(**todo[i][1])}] for i in rows]
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.n > 1:
            params["n"] = self.n
        if self.temperature is not None:
            params["temperature"] = self.temperature
            if self.temperature != 0:
                params["seed"] = self.sample_seed("rewrite")  # type: ignore[attr-defined]
        results = self.model().chat(convs, **params) if convs else []  # type: ignore[attr-defined]
        # a failed row's value that is not text (named in its error) cannot stay in a text column
        new_out = [o if o is None or isinstance(o, str) else None for o in outputs]
        original_col = [o if o is None or isinstance(o, str) else None for o in before]
        cue = self.CUE[self.language]
        for i, res in zip(rows, results, strict=True):
            if res.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {res.error}"  # type: ignore[attr-defined]
                continue
            reasons = list(res.finish_reasons or [])
            candidates = [strip_cue(t or "", cue) for k, t in enumerate(res.texts)
                          if (reasons[k] if k < len(reasons) else None) != "length"]  # fmt: skip
            if not candidates:
                status[i] = f"kept: truncated: every candidate was cut off at max_tokens={self.max_tokens}"
                continue
            best = max(candidates, key=count_tokens)  # max() keeps the first of equally long candidates
            original = outputs[i]
            failed = run_checks(original, best, checks=self.checks, min_ratio=self.min_length_ratio,
                                markers=self.markers_)  # fmt: skip
            if failed is not None:
                status[i] = f"kept: {failed[0]}: {failed[1]}"
                continue
            new_out[i] = best
            original_col[i] = before[i] if before[i] is not None else original
            status[i] = "rewritten"
        evidence: list[Any] = [None] * n
        for i, (_, _, passages) in todo.items():
            if passages:
                evidence[i] = [{"text": p.text, "source": p.source, "score": p.score} for p in passages]
        with self.lock_:
            for i in range(n):
                if errors[i] is not None:
                    continue
                s = status[i] or ""
                if s == "rewritten":
                    self.rewritten_ += 1
                else:
                    self.kept_by_[s.split(":", 2)[1].strip()] += 1
                if evidence[i] is not None:
                    self.with_evidence_ += 1
        return {
            "output": pa.array(new_out, type=pa.string()),
            "output_original": pa.array(original_col, type=pa.string()),
            self.STATUS: pa.array(status, type=pa.string()),
            self.EVIDENCE: pa.array(evidence, type=EVIDENCE_TYPE),
            "error": errors,
        }

    @staticmethod
    def question(instruction: Any, input_: Any) -> str:
        return user_text(instruction, input_)

    def not_text(self, ids: list[Any] | None, i: int, **fields: Any) -> str | None:
        """An error naming the row and field when one of `fields` holds something other than text (or null)."""
        for field, value in fields.items():
            if value is not None and not isinstance(value, str):
                return (f"{self.row_name(ids, i)}, field {field!r}: expected text, "  # type: ignore[attr-defined]
                        f"found {type(value).__name__} {value!r:.60}")  # fmt: skip
        return None
