"""What the model-asking scorers (LLMJudge, DeitaScorer, Tagger) share: their prompt templates checked against the
placeholders each step fills, a batch's alpaca fields, and expected scores from a model's top log-probabilities.

An expected score is the probability-weighted mean over the score labels at one token position: the top
log-probabilities a server returns there (or a local model's next-token log-probabilities of each label) are turned
into probabilities, the labels' tokens are summed per score (" 4" and "4" are the same score), renormalised over the
scores found, and averaged. Labels absent from the top list count as zero; no label at all gives no expected score.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines.prompts import Prompt, check_overrides, load_prompt, prompts_digest

PACKAGE = "scorers"


def load_templates(
    who: str,
    method: str,
    fills: Mapping[str, set[str]],
    language: str,
    overrides: Mapping[str, str | os.PathLike[str]] | None,
    all_names: Sequence[str] | None = None,
) -> dict[str, Prompt]:
    """The templates `fills` names (shipped, or the user's from `overrides`), each checked to have exactly the
    placeholders the step fills; `all_names` (default: `fills`' names) are the overridable names."""
    check_overrides(method, overrides, tuple(all_names or fills))
    templates = {n: load_prompt(PACKAGE, method, n, language, overrides) for n in fills}
    for n, t in templates.items():
        if t.placeholders != fills[n]:
            raise ConfigError(
                f"{who}: prompt {t.path} has placeholders {sorted(t.placeholders)}; "
                f"the {n!r} template takes exactly {sorted(fills[n])}"
            )
    return templates


def templates_digest(
    method: str, names: Sequence[str], language: str, overrides: Mapping[str, str | os.PathLike[str]] | None
) -> dict[str, str]:
    return prompts_digest(PACKAGE, method, tuple(names), language, overrides)


@dataclass
class Rows:
    """A batch's alpaca fields as Python lists (missing columns are all None)."""

    n: int
    ids: list[Any] | None
    instruction: list[Any]
    input: list[Any]
    system: list[Any]
    history: list[Any]
    columns: dict[str, list[Any]]

    @classmethod
    def of(cls, batch: pa.Table, extra: Sequence[str] = ()) -> Rows:
        n = batch.num_rows
        names = batch.column_names

        def col(c: str) -> list[Any]:
            return batch.column(c).to_pylist() if c in names else [None] * n

        return cls(
            n,
            batch.column("id").to_pylist() if "id" in names else None,
            col("instruction"),
            col("input"),
            col("system"),
            col("history"),
            {c: col(c) for c in extra},
        )

    def name(self, i: int) -> str:
        """How messages name row i: by its id when the data has one."""
        return f"row id={self.ids[i]!r}" if self.ids is not None else f"row {i}"


def text_of(value: Any) -> str:
    return "" if value is None else str(value)


def clip(text: str | None, limit: int = 300) -> str:
    """A model reply quoted in an error message: one line, at most `limit` characters."""
    flat = " ".join((text or "").split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def score_of_token(token: str, scores: Sequence[int]) -> int | None:
    """The score a token spells (" 4", "4", "４"), or None."""
    t = unicodedata.normalize("NFKC", token).strip(" \t\n*_`#[]():.,")
    if t.isdigit() and t.isascii() and int(t) in scores:
        return int(t)
    return None


def top_entries(entry: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(token, logprob) pairs of one token position's top list (OpenAI's list form or a {token: logprob} dict)."""
    tops = entry.get("top_logprobs") or []
    if isinstance(tops, Mapping):
        return [(str(t), float(lp)) for t, lp in tops.items()]
    out = []
    for t in tops:
        if isinstance(t, Mapping) and "token" in t and t.get("logprob") is not None:
            out.append((str(t["token"]), float(t["logprob"])))
    return out


def expected_from_logprobs(pairs: Sequence[tuple[str, float]], scores: Sequence[int]) -> float | None:
    """The probability-weighted mean score over the (token, logprob) pairs that spell a score; None when none does."""
    mass: dict[int, float] = {}
    for token, lp in pairs:
        s = score_of_token(token, scores)
        if s is not None and math.isfinite(lp):
            mass[s] = mass.get(s, 0.0) + math.exp(lp)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return sum(s * p for s, p in mass.items()) / total


def score_position(entries: Sequence[Mapping[str, Any]], text: str | None, char: int | None, scores: Sequence[int]) -> int | None:
    """Which token of a reply carries its score: the token covering character `char` of `text` when the tokens
    spell the text, else the first token that is a score. None when there is none."""
    if char is not None and text is not None and "".join(str(e.get("token", "")) for e in entries) == text:
        at = 0
        for k, e in enumerate(entries):
            at += len(str(e.get("token", "")))
            if at > char:
                return k if score_of_token(str(e.get("token", "")), scores) is not None else None
        return None
    for k, e in enumerate(entries):
        if score_of_token(str(e.get("token", "")), scores) is not None:
            return k
    return None
