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


# Python `re` syntax RE2 lacks, as RE2's message shows it (or as the pattern has it), and what to call it
_RE2_UNSUPPORTED = (
    ("(?<=", "lookbehind (?<=...)"),
    ("(?<!", "negative lookbehind (?<!...)"),
    ("(?=", "lookahead (?=...)"),
    ("(?!", "negative lookahead (?!...)"),
    ("(?>", "atomic group (?>...)"),
    ("(?#", "comment group (?#...)"),
    ("(?P=", "named backreference (?P=name)"),
    ("(?(", "conditional group (?(id)yes|no)"),
)


def _re2_unsupported(pattern: str, re2_message: str) -> str | None:
    """Name the construct RE2 refused, when it is one Python's `re` knows; None when RE2's message says it all."""
    for text, name in _RE2_UNSUPPORTED:
        # RE2 quotes "(?P" for a named backreference: the pattern tells which
        if text in re2_message or (text.startswith("(?P") and text in pattern):
            return name
    if m := re.search(r"invalid escape sequence: (\\[1-9])", re2_message):
        return f"backreference {m.group(1)}"
    if "invalid escape sequence: \\Z" in re2_message:
        return "\\Z (RE2 writes it \\z)"
    if "bad repetition operator" in re2_message and re.search(r"[*+?}]\+", pattern):
        return "possessive quantifier (*+, ++, ?+)"
    return None


class RegexFilter(Filter):
    """Drop rows whose `field` matches `pattern` (or, with `keep_matching=True`, rows that do not).

    `pattern` is RE2 syntax (pyarrow runs it), not Python's `re`: no lookaround or backreferences, but linear time.
    """

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
        # validated by the engine that runs it: RE2 (pyarrow) rejects some of Python's syntax and accepts some
        # Python rejects. An empty array compiles nothing, hence one empty string.
        try:
            pc.match_substring_regex(pa.array([""], pa.string()), self.pattern, ignore_case=self.ignore_case)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            said = str(e).removeprefix("Invalid regular expression: ")
            construct = _re2_unsupported(self.pattern, said)
            why = f"{construct} is not supported by RE2 (no lookaround, backreferences or atomic groups); " if construct else ""
            raise ConfigError(
                f"RegexFilter: pattern {self.pattern!r} is not a valid regular expression in RE2 syntax, the engine "
                f"that runs it (pyarrow.compute, https://github.com/google/re2/wiki/Syntax): {why}RE2 says: {said}"
            ) from e

    def keep(self, batch: pa.Table) -> tuple[Any, str]:
        hit = pc.fill_null(pc.match_substring_regex(batch.column(self.field), self.pattern, ignore_case=self.ignore_case), False)
        if self.keep_matching:
            return hit, f"{self.field} does not match /{self.pattern}/"
        return pc.invert(hit), f"{self.field} matches /{self.pattern}/"
