"""Rule filters: cheap, explainable row filters on text columns (length, regular expressions)."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import ConfigError
from thresher.pipelines import Filter, runtime


class LengthFilter(Filter):
    """Keep rows whose `field` has between `min_chars` and `max_chars` characters (null counts as 0)."""

    inputs = ("output",)
    VERSION = "1"

    def __init__(
        self, *, field: str = "output", min_chars: int = 1, max_chars: int | None = None, batch_size: int = runtime(8192)
    ):
        self.field, self.min_chars, self.max_chars, self.batch_size = field, min_chars, max_chars, batch_size

    def reads(self) -> tuple[str, ...]:
        return (self.field,)

    def check(self) -> None:
        if self.min_chars < 0:
            raise ConfigError(f"LengthFilter: min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"LengthFilter: max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")

    def keep(self, batch: pa.Table) -> tuple[Any, Any]:
        n = pc.fill_null(pc.utf8_length(batch.column(self.field)), 0)
        ok = pc.greater_equal(n, self.min_chars)
        if self.max_chars is not None:
            ok = pc.and_(ok, pc.less_equal(n, self.max_chars))
        reasons = pc.binary_join_element_wise(
            f"{self.field} has ", pc.cast(n, pa.string()),
            f" chars, outside [{self.min_chars}, {'inf' if self.max_chars is None else self.max_chars}]", "",
        )
        return ok, reasons


class RegexFilter(Filter):
    """Drop rows whose `field` matches `pattern` (or, with `keep_matching=True`, rows that do not)."""

    inputs = ("output",)
    VERSION = "1"

    def __init__(
        self,
        *,
        pattern: str,
        field: str = "output",
        ignore_case: bool = True,
        keep_matching: bool = False,
        batch_size: int = runtime(8192),
    ):
        self.pattern, self.field, self.ignore_case = pattern, field, ignore_case
        self.keep_matching, self.batch_size = keep_matching, batch_size

    def reads(self) -> tuple[str, ...]:
        return (self.field,)

    def check(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"RegexFilter: pattern {self.pattern!r} is not a valid regular expression: {e}") from e

    def keep(self, batch: pa.Table) -> tuple[Any, str]:
        hit = pc.fill_null(pc.match_substring_regex(batch.column(self.field), self.pattern, ignore_case=self.ignore_case), False)
        if self.keep_matching:
            return hit, f"{self.field} does not match /{self.pattern}/"
        return pc.invert(hit), f"{self.field} matches /{self.pattern}/"
