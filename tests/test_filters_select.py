"""Baseline selections (Threshold, TopK, TopPercent, LongestSelect, RandomSelect): their edge cases — ties, budgets
over the row count, empty input, missing scores — and the reasons they give."""

from __future__ import annotations

import pyarrow as pa
import pytest

from thresher.errors import ConfigError, PipelineError, StepError
from thresher.filters import LongestSelect, RandomSelect, Threshold, TopK, TopPercent


def table(scores: list[float | None], outputs: list[str | None] | None = None) -> pa.Table:
    n = len(scores)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "instruction": [f"task {i}" for i in range(n)],
        "output": outputs if outputs is not None else ["x" * (i + 1) for i in range(n)],
        "score": pa.array(scores, pa.float64()),
    })


def kept(res) -> list[str]:
    return res.output.column("id").to_pylist()


def test_threshold_bounds_are_inclusive_and_reasons_name_the_bound() -> None:
    t = table([1.0, 4.5, 4.49, 5.0, 3.0])
    res = Threshold(column="score", minimum=4.5).apply(t)
    assert kept(res) == ["r1", "r3"]
    assert res.rejected.column("reason").to_pylist() == ["score 1 < minimum 4.5", "score 4.49 < minimum 4.5",
                                                         "score 3 < minimum 4.5"]
    res = Threshold(column="score", maximum=3.0).apply(t)
    assert kept(res) == ["r0", "r4"] and "score 4.5 > maximum 3" in res.rejected.column("reason").to_pylist()
    assert kept(Threshold(column="score", minimum=3.0, maximum=4.5).apply(t)) == ["r1", "r2", "r4"]
    with pytest.raises(ConfigError, match="give minimum, maximum or both"):
        Threshold(column="score").apply(t)
    with pytest.raises(ConfigError, match="minimum 5 is above maximum 1"):
        Threshold(column="score", minimum=5, maximum=1).apply(t)


def test_topk_breaks_ties_by_input_order_and_ranks_every_row() -> None:
    t = table([2.0, 3.0, 3.0, 1.0, 3.0, 2.0])
    res = TopK(column="score", k=2).apply(t)
    assert kept(res) == ["r1", "r2"]  # three rows tie at 3.0: the two earlier ones stay
    ranks = dict(zip(res.output.column("id").to_pylist() + res.rejected.column("id").to_pylist(),
                     res.output.column("select_rank").to_pylist() + res.rejected.column("select_rank").to_pylist(), strict=True))
    assert ranks == {"r1": 1, "r2": 2, "r4": 3, "r0": 4, "r5": 5, "r3": 6}
    reason = res.rejected.filter(pa.compute.equal(res.rejected.column("id"), "r4")).column("reason")[0].as_py()
    assert reason == "rank 3 by score (3) is beyond k=2; the last kept row has 3"
    # ascending: the lowest scores, ties again by input order
    assert kept(TopK(column="score", k=3, descending=False).apply(t)) == ["r0", "r3", "r5"]
    # the same decision on a reversed input keeps the rows earlier in *that* input
    assert set(kept(TopK(column="score", k=2).apply(t.take(list(range(5, -1, -1)))))) == {"r4", "r2"}


def test_budgets_over_the_row_count_keep_everything_and_zero_keeps_nothing() -> None:
    t = table([1.0, 2.0, 3.0])
    assert kept(TopK(column="score", k=10).apply(t)) == ["r0", "r1", "r2"]
    assert kept(TopPercent(column="score", percent=100).apply(t)) == ["r0", "r1", "r2"]
    assert kept(LongestSelect(budget=99).apply(t)) == ["r0", "r1", "r2"]
    assert kept(RandomSelect(budget=99).apply(t)) == ["r0", "r1", "r2"]
    res = TopK(column="score", k=0).apply(t)
    assert res.rows_out == 0 and res.rows_rejected == 3
    for step in (TopK(column="score", k=5), TopPercent(column="score", percent=50), LongestSelect(budget=5),
                 RandomSelect(fraction=0.5), Threshold(column="score", minimum=0)):
        res = step.apply(table([]))
        assert res.rows_in == 0 and res.rows_out == 0


def test_top_percent_floors_like_the_papers_scripts() -> None:
    t = table([float(i) for i in range(100)])
    assert kept(TopPercent(column="score", percent=7).apply(t)) == [f"r{i}" for i in range(93, 100)]  # 7, not 8
    assert TopPercent(column="score", percent=5).apply(table([1.0] * 19)).rows_out == 0  # floor(0.95)
    with pytest.raises(ConfigError, match=r"percent must be a number in \(0, 100\]"):
        TopPercent(column="score", percent=0).apply(t)


def test_missing_scores_are_errors_naming_rows_and_column() -> None:
    t = table([1.0, None, 2.0, float("nan")])
    for step in (TopK(column="score", k=1), TopPercent(column="score", percent=50),
                 Threshold(column="score", minimum=1)):
        with pytest.raises(StepError, match=r"2 row\(s\) have no value in column 'score' \(null or NaN\): "
                                            r"id='r1', id='r3'"):
            step.apply(t)
    with pytest.raises(PipelineError, match=r"needs column\(s\) \['deita_score'\]"):
        TopK(k=1).apply(t)
    text = t.set_column(3, "score", pa.array(["a", "b", "c", "d"]))
    with pytest.raises(StepError, match="column 'score' must hold numbers, found string"):
        TopK(column="score", k=1).apply(text)


def test_longest_select_by_characters_and_tokens() -> None:
    outputs = ["short", "a much longer answer with many words in it", "mid length one", "é" * 30, "tie!!"]
    t = table([0.0] * 5, outputs)
    res = LongestSelect(budget=2).apply(t)
    assert kept(res) == ["r1", "r3"] and res.output.column("response_length").to_pylist() == [42, 30]
    # tokens: the bundled MiniLM WordPiece tokenizer's counts, computed here without the step
    from transformers import AutoTokenizer

    from thresher.llms.bundled import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    counts = [len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs]
    res = LongestSelect(budget=5, unit="tokens").apply(t)
    assert res.output.column("response_length").to_pylist() == counts
    best = sorted(range(5), key=lambda i: (-counts[i], i))[:2]
    assert kept(LongestSelect(budget=2, unit="tokens").apply(t)) == [f"r{i}" for i in sorted(best)]
    assert LongestSelect(budget=1, unit="tokens").fingerprint() != LongestSelect(budget=1).fingerprint()
    # ties (5 characters each) by input order
    assert kept(LongestSelect(budget=4).apply(t)) == ["r0", "r1", "r2", "r3"]
    reason = LongestSelect(budget=1).apply(t).rejected.column("reason")[0].as_py()
    assert reason == "rank 4 by response length in chars (5) is beyond budget=1; the last kept row has 42"
    with pytest.raises(StepError, match=r"1 row\(s\) have no response in column 'output' \(null\): id='r2'"):
        LongestSelect(budget=1).apply(table([0.0] * 3, ["a", "b", None]))
    with pytest.raises(ConfigError, match="unknown unit 'words'; valid choices: chars, tokens"):
        LongestSelect(unit="words").apply(t)


def test_random_select_is_seeded_per_row_id() -> None:
    t = table([0.0] * 200)
    a = RandomSelect(budget=20, seed=1).apply(t)
    assert a.rows_out == 20 and kept(a) == kept(RandomSelect(budget=20, seed=1).apply(t))
    assert kept(a) != kept(RandomSelect(budget=20, seed=2).apply(t))
    # the draw depends on the id, not the position: a shuffled input draws the same rows
    shuffled = t.take(list(range(199, -1, -1)))
    assert set(kept(RandomSelect(budget=20, seed=1).apply(shuffled))) == set(kept(a))
    # the kept rows have the smallest draws, and every rejected row says it was not drawn
    worst_kept = max(a.output.column("random_key").to_pylist())
    assert min(a.rejected.column("random_key").to_pylist()) > worst_kept
    assert all(r.startswith("not drawn: draw ") for r in a.rejected.column("reason").to_pylist())
    assert RandomSelect(fraction=0.25).apply(t).rows_out == 50
    with pytest.raises(ConfigError, match="exactly one of budget"):
        RandomSelect(budget=5, fraction=0.5).apply(t)
    with pytest.raises(ConfigError, match="exactly one of budget"):
        RandomSelect().apply(t)
