"""RegexFilter validates with RE2, the engine that runs it; ExactDedup keys the whole user side (issue 8, part 4)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.filters import RegexFilter


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [(r"foo(?=bar)", "lookahead"), (r"(?<!x)y", "lookbehind"), (r"(a)\1", "backreference")],
)
def test_regex_filter_rejects_at_check_what_re2_cannot_run(pattern: str, construct: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?s)not a valid regular expression.*RE2.*{construct}"):
        RegexFilter(pattern=pattern).check()


def test_regex_filter_accepts_re2_syntax_python_does_not_know() -> None:
    f = RegexFilter(pattern=r"^\pN+$", field="instruction")  # RE2's Unicode class; Python's re rejects \p
    f.check()
    res = f.apply(pa.table({"id": ["a", "b"], "instruction": ["123", "12a"]}))
    assert res.output.column("id").to_pylist() == ["b"]


def test_regex_filter_still_reports_plain_syntax_errors() -> None:
    with pytest.raises(ConfigError, match=r"not a valid regular expression.*RE2.*missing \)"):
        RegexFilter(pattern="(unclosed").check()
