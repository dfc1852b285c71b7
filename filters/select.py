"""Baseline selections every report shows beside a clever one: a threshold, the top k or top percent by any score
column, the longest responses, and a seeded random draw.

MIG's paper finds several scorers no better than random at scale (DESIGN.md §5), so these are not afterthoughts: a
selection means something only next to random and longest at the same budget. Each one is a global filter (it
needs every row's score before it can rank any) that says why each row was dropped and, where that is not
obvious, why each kept row was kept (`select_rank`, `random_key`).

Ties. Rankings are stable: of rows with equal scores (or lengths) the one earlier in the input ranks first, so a
budget that falls inside a tie keeps the earlier rows, the same way in every run. RandomSelect draws per row id
(see its docstring), so its choice does not depend on row order at all.

Missing scores are errors, never silently ranked last: a null or NaN score names the first such rows by id, and the
column; score every row first, or drop the unscored ones on purpose (a RegexFilter, a Threshold upstream, ...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import ConfigError, StepError
from thresher.pipelines import GlobalFilter
from thresher.pipelines.rng import derive_seed

_SHOW = 5  # rows an error names by id before it gives only the count
LENGTH_UNITS: tuple[str, ...] = ("chars", "tokens")


def row_names(table: pa.Table, rows: Sequence[int] | np.ndarray) -> str:
    """How errors name rows: by id where the table has ids, else by 0-based position; the first few, then a count."""
    rows = [int(r) for r in rows]
    ids = table.column("id") if "id" in table.column_names else None
    shown = [f"id={ids[r].as_py()!r}" if ids is not None else f"row {r}" for r in rows[:_SHOW]]
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return ", ".join(shown) + more


def score_array(table: pa.Table, column: str, step: str) -> np.ndarray:
    """`column` as float64, or StepError naming the column and the rows whose score is null or NaN."""
    if column not in table.column_names:
        raise StepError(f"{step}: the data has no column {column!r}; available: {sorted(table.column_names)}")
    col = table.column(column)
    numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type)
    if not numeric and not pa.types.is_null(col.type):
        raise StepError(f"{step}: column {column!r} must hold numbers, found {col.type}")
    values = np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    if len(values) and pa.types.is_null(col.type):
        values = np.full(len(values), np.nan)
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        raise StepError(
            f"{step}: {len(bad)} row(s) have no value in column {column!r} (null or NaN): {row_names(table, bad)}; "
            "score every row first, or drop the unscored rows before this step"
        )
    return values


def rank_order(values: np.ndarray, descending: bool) -> np.ndarray:
    """Row indices best first; equal values keep input order (a stable sort)."""
    return np.argsort(-values if descending else values, kind="stable")


def ranks_of(order: np.ndarray) -> np.ndarray:
    """1-based rank of every row, from `rank_order`'s permutation."""
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _count(step: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{step}: {name} must be an integer >= 0, got {value!r}")
    return value


def _number(step: str, name: str, value: Any, low: float, high: float, *, open_low: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{step}: {name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def share_count(n: int, share: float) -> int:
    """Rows a fraction keeps: floor(n x share), as the papers' scripts slice (`rows[: int(n * rate)]`); a tiny
    slack keeps 0.07 x 100 = 7.000000000000001 from flooring wrong."""
    return min(n, math.floor(n * share + 1e-9))


class Threshold(GlobalFilter):
    """Keep rows whose `column` lies within [`minimum`, `maximum`] (both inclusive; give one or both).

    AlpaGasus keeps rows judged >= 4.5 on accuracy: `Threshold(column="judge_accuracy", minimum=4.5)`; Cherry drops
    IFD > 1: `Threshold(column="ifd", maximum=1.0)`. A row without a score is an error (see the module docstring).
    """

    inputs = ("id",)
    outputs = ()
    VERSION = "1"

    def __init__(self, *, column: str = "deita_score", minimum: float | None = None, maximum: float | None = None):
        self.column = column
        self.minimum = minimum
        self.maximum = maximum

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def check(self) -> None:
        name = type(self).__name__
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"{name}: column must be a column name, got {self.column!r}")
        if self.minimum is None and self.maximum is None:
            raise ConfigError(f"{name}: give minimum, maximum or both (the bounds a kept row's {self.column} lies in)")
        for key in ("minimum", "maximum"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise ConfigError(f"{name}: {key} must be a number or None, got {v!r}")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ConfigError(f"{name}: minimum {self.minimum} is above maximum {self.maximum}: no row could pass")

    def semantic_params(self) -> dict[str, Any]:
        # 3 and 3.0 are one bound (a YAML recipe gives floats to a float parameter)
        params = super().semantic_params()
        for key in ("minimum", "maximum"):
            if isinstance(params[key], int) and not isinstance(params[key], bool):
                params[key] = float(params[key])
        return params

    def keep(self, table: pa.Table) -> tuple[Any, Any]:
        values = score_array(table, self.column, type(self).__name__)
        keep = np.ones(len(values), dtype=bool)
        reasons: list[str | None] = [None] * len(values)
        if self.minimum is not None:
            low = values < self.minimum
            keep &= ~low
            for i in np.flatnonzero(low):
                reasons[i] = f"{self.column} {values[i]:g} < minimum {self.minimum:g}"
        if self.maximum is not None:
            high = values > self.maximum
            keep &= ~high
            for i in np.flatnonzero(high):
                reasons[i] = f"{self.column} {values[i]:g} > maximum {self.maximum:g}"
        return keep, reasons


class _RankSelect:
    """Keep the best `_quota(n)` rows by a per-row value; `select_rank` says where each row ranked. A mixin before
    GlobalFilter (a Step subclass of its own would register as a step)."""

    outputs: ClassVar[tuple[str, ...]] = ("select_rank",)
    #: what the value is called in reasons
    _what = "score"

    def _values(self, table: pa.Table) -> np.ndarray:
        raise NotImplementedError

    def _quota(self, n: int) -> int:
        raise NotImplementedError

    def _limit(self) -> str:
        raise NotImplementedError

    def _descending(self) -> bool:
        return True

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        values = self._values(table)
        n = len(values)
        quota = self._quota(n)
        order = rank_order(values, self._descending())
        ranks = ranks_of(order)
        keep = ranks <= quota
        cut = f"; the last kept row has {values[order[quota - 1]]:g}" if 0 < quota <= n else ""
        reasons = [
            None if k else f"rank {r} by {self._what} ({v:g}) is beyond {self._limit()}{cut}"
            for k, r, v in zip(keep.tolist(), ranks.tolist(), values.tolist(), strict=True)
        ]
        self.stats_ = {"rows": n, "kept": int(keep.sum())}
        return keep, reasons, {"select_rank": pa.array(ranks, pa.int64())}

    def metrics(self) -> dict[str, Any]:
        return dict(getattr(self, "stats_", {}))


class _ScoreRank(_RankSelect):  # a mixin too
    """A ranking by a score column (`column`, best first unless `descending=False`)."""

    column: str
    descending: bool

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def _check_column(self) -> None:
        name = type(self).__name__
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"{name}: column must be a column name, got {self.column!r}")
        if not isinstance(self.descending, bool):
            raise ConfigError(f"{name}: descending must be True or False, got {self.descending!r}")

    @property
    def _what(self) -> str:  # type: ignore[override]
        return self.column

    def _values(self, table: pa.Table) -> np.ndarray:
        return score_array(table, self.column, type(self).__name__)

    def _descending(self) -> bool:
        return bool(self.descending)


class TopK(_ScoreRank, GlobalFilter):
    """Keep the `k` rows with the highest `column` (the lowest with `descending=False`); all rows when k >= rows.

    Ties keep input order (see the module docstring). Every row gets `select_rank` (1 = best).
    """

    inputs = ("id",)
    VERSION = "1"

    def __init__(self, *, column: str = "deita_score", k: int = 1000, descending: bool = True):
        self.column = column
        self.k = k
        self.descending = descending

    def check(self) -> None:
        self._check_column()
        _count(type(self).__name__, "k", self.k)

    def _quota(self, n: int) -> int:
        return min(n, self.k)

    def _limit(self) -> str:
        return f"k={self.k}"


class TopPercent(_ScoreRank, GlobalFilter):
    """Keep the top `percent` % of rows by `column`: floor(rows x percent / 100) of them (Cherry's "top 5%").

    Ties keep input order (see the module docstring). Every row gets `select_rank` (1 = best).
    """

    inputs = ("id",)
    VERSION = "1"

    def __init__(self, *, column: str = "deita_score", percent: float = 10.0, descending: bool = True):
        self.column = column
        self.percent = percent
        self.descending = descending

    def check(self) -> None:
        self._check_column()
        _number(type(self).__name__, "percent", self.percent, 0.0, 100.0)

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        if isinstance(self.percent, int) and not isinstance(self.percent, bool):
            params["percent"] = float(self.percent)  # 5 and 5.0 are one share
        return params

    def _quota(self, n: int) -> int:
        self.quota_ = share_count(n, float(self.percent) / 100.0)
        return self.quota_

    def _limit(self) -> str:
        return f"the top {self.percent:g}% ({self.quota_} rows)"


class LongestSelect(_RankSelect, GlobalFilter):
    """Keep the `budget` rows with the longest responses ("Long Is More for Alignment", Zhao et al. 2024: the
    1,000 longest responses of a pool make a strong baseline).

    Length of `column` (default `output`, the last response) in `unit`: "chars" (Unicode characters) or "tokens"
    (of `tokenizer`, a local Hugging Face tokenizer folder; None: the bundled all-MiniLM-L6-v2 WordPiece
    tokenizer, offline). Ties keep input order. A null response is an error naming the row (respond first).
    Every row gets `select_rank` (1 = longest) and `response_length`.
    """

    inputs = ("id", "output")
    outputs = ("select_rank", "response_length")
    VERSION = "1"
    _what = "response length"

    def __init__(
        self,
        *,
        budget: int = 1000,
        column: str = "output",
        unit: str = "chars",
        tokenizer: str | os.PathLike[str] | None = None,
    ):
        self.budget = budget
        self.column = column
        self.unit = unit
        self.tokenizer = tokenizer

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def check(self) -> None:
        name = type(self).__name__
        _count(name, "budget", self.budget)
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"{name}: column must be a column name, got {self.column!r}")
        if self.unit not in LENGTH_UNITS:
            raise ConfigError(f"{name}: unknown unit {self.unit!r}; valid choices: {', '.join(LENGTH_UNITS)}")
        if self.tokenizer is not None and self.unit != "tokens":
            raise ConfigError(f"{name}: tokenizer is used only with unit='tokens' (unit is {self.unit!r})")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise ConfigError(f"{name}: tokenizer {os.fspath(self.tokenizer)!r} is not a folder holding a tokenizer")

    def _tokenizer_path(self) -> str:
        from thresher.llms.bundled import minilm_dir

        return os.fspath(self.tokenizer) if self.tokenizer is not None else str(minilm_dir())

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        if self.unit == "tokens":
            from thresher.llms.bundled import model_digest

            # the tokenizer counts by its files, not by where they lie
            params["tokenizer"] = model_digest(self._tokenizer_path())
        return params

    def load(self) -> None:
        if self.unit == "tokens" and getattr(self, "tokenizer_", None) is None:
            from transformers import AutoTokenizer

            self.tokenizer_: Any = AutoTokenizer.from_pretrained(self._tokenizer_path(), local_files_only=True)

    def unload(self) -> None:
        self.tokenizer_ = None

    def _values(self, table: pa.Table) -> np.ndarray:
        name = type(self).__name__
        col = table.column(self.column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            raise StepError(f"{name}: column {self.column!r} must hold text, found {col.type}")
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        missing = np.flatnonzero(np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False)))
        if len(missing):
            raise StepError(
                f"{name}: {len(missing)} row(s) have no response in column {self.column!r} (null): "
                f"{row_names(table, missing)}; respond to every row first"
            )
        if self.unit == "chars":
            lengths = np.asarray(pc.utf8_length(col).to_numpy(zero_copy_only=False), dtype=np.float64)
        else:
            self.load()
            texts = col.to_pylist()
            lengths = np.zeros(len(texts), dtype=np.float64)
            for lo in range(0, len(texts), 4096):
                enc = self.tokenizer_(texts[lo : lo + 4096], add_special_tokens=False)["input_ids"]
                lengths[lo : lo + len(enc)] = [len(e) for e in enc]
        self.lengths_ = lengths
        return lengths

    def _quota(self, n: int) -> int:
        return min(n, self.budget)

    def _limit(self) -> str:
        return f"budget={self.budget}"

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        mask, reasons, columns = super().keep(table)
        lengths = self.lengths_.astype(np.int64)
        reasons = [r and r.replace("response length", f"response length in {self.unit}") for r in reasons]
        return mask, reasons, {**columns, "response_length": pa.array(lengths, pa.int64())}


class RandomSelect(GlobalFilter):
    """A seeded random sample: `budget` rows, or floor(rows x `fraction`) of them (give exactly one).

    Each row's draw is a uniform number in [0, 1) from (seed, the row's id) alone, and the rows with the smallest
    draws are kept: the same rows in every run, whatever the row order or batching, and a row's draw does not
    change when other rows are added or removed (equal ids draw equal numbers; input order breaks that tie).
    Every row gets `random_key` (its draw), so a kept row says why it was kept.
    """

    inputs = ("id",)
    outputs = ("random_key",)
    VERSION = "1"

    def __init__(self, *, budget: int | None = None, fraction: float | None = None, seed: int = 0):
        self.budget = budget
        self.fraction = fraction
        self.seed = seed

    def check(self) -> None:
        name = type(self).__name__
        if (self.budget is None) == (self.fraction is None):
            raise ConfigError(f"{name}: give exactly one of budget (rows) and fraction (of the rows), "
                              f"got budget={self.budget!r}, fraction={self.fraction!r}")
        if self.budget is not None:
            _count(name, "budget", self.budget)
        else:
            _number(name, "fraction", self.fraction, 0.0, 1.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{name}: seed must be an integer, got {self.seed!r}")

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        ids = table.column("id").to_pylist()
        n = len(ids)
        quota = min(n, self.budget) if self.budget is not None else share_count(n, float(self.fraction or 0.0))
        # 53 random bits of a per-row hash: a double in [0, 1), the same for an id in every run
        keys = np.array([(derive_seed(self.seed, "RandomSelect", i) >> 11) * 2.0**-53 for i in ids], dtype=np.float64)
        order = np.argsort(keys, kind="stable")
        keep = np.zeros(n, dtype=bool)
        keep[order[:quota]] = True
        limit = f"budget={self.budget}" if self.budget is not None else f"fraction={self.fraction:g} ({quota} rows)"
        bar = f"; the last row drawn has {keys[order[quota - 1]]:.6f}" if quota else ""
        reasons = [
            None if k else f"not drawn: draw {v:.6f} (seed {self.seed}) is not among the {quota} smallest ({limit}){bar}"
            for k, v in zip(keep.tolist(), keys.tolist(), strict=True)
        ]
        return keep, reasons, {"random_key": pa.array(keys, pa.float64())}
