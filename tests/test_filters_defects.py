"""RegexFilter validates with RE2, the engine that runs it; ExactDedup keys the whole user side (issue 8, part 4)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.filters import ExactDedup, RegexFilter


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


def _conversations() -> pa.Table:
    # the same last turn after different earlier turns, under different system prompts
    return pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "instruction": ["And in French?"] * 5,
        "input": [""] * 5,
        "output": ["Bonjour", "Merci", "Bonjour", "Salut", "Bonjour"],
        "system": [None, None, "Answer tersely.", None, None],
        "history": [[["Say hello", "Hello"]], [["Say thanks", "Thanks"]], [["Say hello", "Hello"]], [], [["say  HELLO", "Hello"]]],
    })


def test_exact_dedup_keeps_conversations_that_differ_in_earlier_turns_or_system() -> None:
    res = ExactDedup().apply(_conversations())
    # only e repeats a (same history once normalised, same system, same last turn)
    assert res.output.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert res.rejected.column("id").to_pylist() == ["e"]
    assert res.rejected.column("duplicate_of").to_pylist() == ["a"]
    assert res.rejected.column("reason").to_pylist() == ["exact duplicate on system, history, instruction, input"]


def test_exact_dedup_default_works_without_system_and_history_columns() -> None:
    t = pa.table({"id": ["a", "b", "c"], "instruction": ["Hi", " hi ", "Bye"], "input": ["", "", ""]})
    res = ExactDedup().apply(t)
    assert res.output.column("id").to_pylist() == ["a", "c"]
    assert res.rejected.column("reason").to_pylist() == ["exact duplicate on instruction, input"]
    # an absent column is the same as a column of nulls: the key does not depend on which columns a table carries
    with_nulls = t.append_column("system", pa.array([None] * 3, pa.string()))
    assert ExactDedup().apply(with_nulls).output.column("dedup_key").to_pylist() == res.output.column("dedup_key").to_pylist()


def test_exact_dedup_hashes_any_value_type_canonically() -> None:
    none_vs_empty = pa.table({"id": ["a", "b", "c"], "instruction": ["x", "x", "x"], "input": [None, "", None]})
    assert ExactDedup().apply(none_vs_empty).output.column("id").to_pylist() == ["a", "b"]

    numbers = pa.table({"id": ["a", "b", "c", "d"], "instruction": ["x"] * 4, "n": [1, 2, 1, None]})
    assert ExactDedup(fields=["instruction", "n"]).apply(numbers).output.column("id").to_pylist() == ["a", "b", "d"]

    lists = pa.table({"id": ["a", "b", "c", "d"], "tags": [["x", "y"], ["xy"], ["X ", "y"], []]})
    assert ExactDedup(fields=["tags"]).apply(lists).output.column("id").to_pylist() == ["a", "b", "d"]

    dicts = pa.table({"id": ["a", "b", "c"], "meta": [{"k": "v", "n": 1}, {"k": "v", "n": 2}, {"k": "V", "n": 1}]})
    assert ExactDedup(fields=["meta"]).apply(dicts).output.column("id").to_pylist() == ["a", "b"]

    # values that used to collapse: a number next to text that looks like it, and a field boundary moved
    moved = pa.table({"id": ["a", "b"], "instruction": ["a\x1fb", "a"], "input": ["c", "b\x1fc"]})
    assert ExactDedup().apply(moved).output.num_rows == 2


def test_exact_dedup_names_explicit_fields_it_cannot_find() -> None:
    from thresher.errors import PipelineError

    with pytest.raises(PipelineError, match="system"):
        ExactDedup(fields=["instruction", "system"]).apply(pa.table({"id": ["a"], "instruction": ["x"]}))


def test_exact_dedup_arrow_normalisation_equals_the_python_one() -> None:
    import random

    from thresher.filters.exact_dedup import _normalise_array, normalise

    rng = random.Random(7)
    alphabet = "aAbZ  \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u3000ßΣς\ufb01Ｆé\u0301İ1.,"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += ["  Hello\t\tWORLD \n", "\x1c", "", None]  # type: ignore[list-item]
    got = _normalise_array(pa.array(texts, pa.string())).to_pylist()
    assert got == [None if t is None else normalise(t) for t in texts]
