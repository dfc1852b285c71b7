"""LLMJudge: scores read from messy real-style replies (English and Chinese), failed rows that quote the reply,
expected scores from scripted top log-probabilities, all dimensions in one JSON reply, and pairwise judging in both
orders against a scripted server."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.llms.testing import FaultServer, Rule
from thresher.scorers import LLMJudge
from thresher.scorers.judge_parse import parse_score, parse_verdict

pytestmark = pytest.mark.usefixtures("isolated_cache")

# (reply, the score it gives on 0-5, or None: no score, the row fails)
REPLIES: list[tuple[str, float | None]] = [
    ("4\nThe response is accurate.", 4),
    ("4.5\n\nExplanation: mostly right, one date is off by a year.", 4.5),
    ("Score: 4.5/5\nGood answer.", 4.5),
    ("**4**\n\nThe answer is correct but terse.", 4),
    ("The response correctly names the capital. However, it omits the population.\n\nScore: 3", 3),
    ("I would rate this response 4 out of 5 because it is mostly accurate.", 4),
    ("Rating: 8/10 - solid, but verbose", 4),
    ("[[5]]", 5),
    ("## Score\n**3.5**\n\nReasons below.", 3.5),
    ("Accuracy: 2\nThe answer has a factual error.", 2),
    ("Score: N/A - the question cannot be evaluated.", None),
    ("The response has 3 errors and 2 omissions.", None),
    ("Score: 4-5", None),
    ("Score: 7", None),
    ("4 - The answer is accurate and complete.", 4),
    ("5. The answer is perfect.\nNothing to add.", 5),
    ("1. The response is accurate.\n2. It is concise.", None),
    ("Final score: 4\n(At first I thought 3.)", 4),
    ("Let me think. The answer says 1990, which is right.\n\nOverall rating: 5/5", 5),
    ("Score (0-5): 3\nMostly correct.", 3),
    ("  \n  Score:4\nok", 4),
    ("I cannot score this.", None),
    ("", None),
    ("The score is 4.", 4),
    ("The response deserves a score of 2 because it gets the dates wrong.", 2),
    ("3/5", 3),
    ("Score: four", None),
    ("The answer is 3.5, which means the request was met.", 3.5),  # SmolLM2-135M's habit on the judge template
    ("The answer is 5.7, and it's a perfect example.", None),
    ("评分：4分\n回答准确。", 4),
    ("4分\n回答基本准确，但缺少细节。", 4),
    ("这个回答很好，我给4.5分。", 4.5),
    ("得分：３\n理由：部分正确。", 3),
    ("我给这个回答打四分，因为它基本正确。", 4),
    ("满分5分，该回答得3分。", 3),
    ("满分10分，我给8分。", 4),
    ("**评分**：5\n\n解释：完全正确。", 5),
    ("回答十分准确，没有任何问题。", None),
    ("分数为 2.5 分", 2.5),
    ("综合评分：3.5/5", 3.5),
    ("最终得分：2分（满分5分）", 2),
    ("准确性：1\n回答与问题无关。", 1),
]


@pytest.mark.parametrize(("reply", "score"), REPLIES)
def test_scores_are_read_from_messy_replies(reply: str, score: float | None) -> None:
    got = parse_score(reply, 0, 5, labels=("accuracy", "准确性"))
    assert (got.value if got else None) == score


def test_the_explanation_is_what_follows_the_score() -> None:
    assert parse_score("4\nThe response is accurate.").reason == "The response is accurate."  # type: ignore[union-attr]
    assert parse_score("4 - Accurate and complete.").reason == "Accurate and complete."  # type: ignore[union-attr]
    assert parse_score("评分：4分\n回答准确。").reason == "回答准确。"  # type: ignore[union-attr]
    prose = "Good, but thin. Score: 3"
    assert parse_score(prose).reason == prose  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A\nIt is more precise.", "A"), ("[[B]]", "B"), ("tie", "tie"), ("Response B is better.", "B"),
        ("平局\n两者相当。", "tie"), ("回答A更好。", "A"), ("**A**", "A"), ("Verdict: B", "B"), ("I prefer A.", "A"),
        ("A good answer is rare; Response 2 wins.", "B"), ("Both are equally good.", "tie"), ("B\n", "B"),
        ("Hmm, hard to say.", None), ("Response A is better, but response B is better on style.", None),
    ],
)  # fmt: skip
def test_pairwise_verdicts_are_read(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def spec(server: FaultServer) -> dict[str, object]:
    return {"kind": "openai", "base_url": server.base_url, "model": "judge", "retry_base_delay": 0.01}


def rows(*instructions: str, **extra: list[str | None]) -> pa.Table:
    n = len(instructions)
    return pa.table({"id": [f"r{i}" for i in range(n)], "instruction": list(instructions), "input": [""] * n,
                     "output": extra.pop("output", [f"answer {i}" for i in range(n)]), **extra})  # fmt: skip


def test_scores_reasons_and_a_failed_row_that_quotes_the_reply(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"(?s)\[The user's request\]\nCapital", reply="Score: 4.5/5\nRight city, no detail."),
        Rule(match=r"(?s)\[The user's request\]\nAdd", reply="**2**\n\nThe sum is wrong."),
        Rule(match=r"(?s)\[The user's request\]\nPoem", reply="What a lovely poem, I enjoyed it."),
    ])  # fmt: skip
    res = LLMJudge(backend=spec(fault)).apply(rows("Capital of France?", "Add 2 and 2.", "Poem about rain."))
    assert res.rows_in == res.rows_out + res.rows_failed and res.rows_failed == 1
    out = res.output.to_pylist()
    assert [r["judge_accuracy"] for r in out] == [4.5, 2.0]
    assert out[0]["judge_accuracy_reason"] == "Right city, no detail." and out[1]["judge_accuracy_reason"] == "The sum is wrong."
    err = res.failed.column("error")[0].as_py()
    assert "id='r2'" in err and "no score" in err and "What a lovely poem, I enjoyed it." in err
    assert "judge_accuracy" not in res.failed.column_names or res.failed.column("judge_accuracy")[0].as_py() is None


def test_several_dimensions_one_request_each_and_in_chinese(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"只看一个方面：准确性", reply="评分：3分\n有一处错误。"),
        Rule(match=r"只看一个方面：有用性", reply="4分\n很实用。"),
    ])  # fmt: skip
    judge = LLMJudge(backend=spec(fault), dimensions=["accuracy", "helpfulness"], language="zh")
    out = judge(rows("北京是哪个国家的首都？"))
    assert out.column("judge_accuracy").to_pylist() == [3.0] and out.column("judge_helpfulness").to_pylist() == [4.0]
    assert out.column("judge_helpfulness_reason").to_pylist() == ["很实用。"]
    assert fault.stats()["total"] == 2
    m = judge.metrics()["dimensions"]
    assert m["accuracy"]["distribution"] == {"3.0": 1} and m["helpfulness"]["mean"] == 4.0


def test_all_dimensions_in_one_structured_reply(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match="Good", json={"accuracy": {"score": 5, "explanation": "correct"},
                                 "helpfulness": {"score": "3.5/5", "explanation": "thin"}}),
        Rule(match="Broken", json={"accuracy": {"score": 9, "explanation": "?"}, "helpfulness": {"score": 1}}),
    ])  # fmt: skip
    res = LLMJudge(backend=spec(fault), dimensions=["accuracy", "helpfulness"], one_request=True).apply(
        rows("Good question", "Broken question")
    )
    assert fault.stats()["total"] == 2  # one request a row
    (row,) = res.output.to_pylist()
    assert (row["judge_accuracy"], row["judge_helpfulness"], row["judge_helpfulness_reason"]) == (5.0, 3.5, "thin")
    assert "no score from 0 to 5 for accuracy" in res.failed.column("error")[0].as_py()


def test_expected_score_from_scripted_top_logprobs(fault: FaultServer) -> None:
    first_line = [
        {"token": "4", "logprob": -0.2, "top_logprobs": {"4": -0.2, "5": -1.8, "3": -3.0, "Score": -4.0}},
        {"token": "\n", "logprob": 0.0}, {"token": "Fine", "logprob": 0.0}, {"token": ".", "logprob": 0.0},
    ]  # fmt: skip
    after_prose = [
        {"token": "Score", "logprob": -0.1, "top_logprobs": {"Score": -0.1, "1": -5.0}},
        {"token": ":", "logprob": 0.0},
        {"token": " 3", "logprob": -0.1, "top_logprobs": {" 3": -0.1, " 2": -2.5, "3": -3.0}},
    ]  # fmt: skip
    fault.configure(script=[
        Rule(match="First", reply="4\nFine.", logprobs=first_line),
        Rule(match="Prose", reply="Score: 3", logprobs=after_prose),
        Rule(match="Words", reply="Score: four", logprobs=[{"token": "Score: four", "logprob": 0.0}]),
        Rule(match="Bare", reply="5\nok"),  # no scripted logprobs: one 0.0 entry per word, so p(5) = 1
    ])  # fmt: skip
    judge = LLMJudge(backend=spec(fault), expected_scores=True, top_logprobs=5)
    res = judge.apply(rows("First", "Prose", "Words", "Bare"))
    out = {r["instruction"]: r for r in res.output.to_pylist()}
    p4, p5, p3 = math.exp(-0.2), math.exp(-1.8), math.exp(-3.0)
    assert out["First"]["judge_accuracy"] == 4.0
    assert out["First"]["judge_accuracy_expected"] == pytest.approx((4 * p4 + 5 * p5 + 3 * p3) / (p4 + p5 + p3))
    q3, q2 = math.exp(-0.1) + math.exp(-3.0), math.exp(-2.5)  # " 3" and "3" are one score
    assert out["Prose"]["judge_accuracy"] == 3.0
    assert out["Prose"]["judge_accuracy_expected"] == pytest.approx((3 * q3 + 2 * q2) / (q3 + q2))
    assert out["Bare"]["judge_accuracy_expected"] == 5.0
    assert res.rows_failed == 1 and "Score: four" in res.failed.column("error")[0].as_py()
    assert judge.metrics()["dimensions"]["accuracy"]["expected_missing"] == 0


def test_pairwise_judges_both_orders_and_needs_them_to_agree(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"BIASED", reply="A\nThe first one reads better."),  # a judge that always picks what it sees first
        Rule(match=r"UNSURE", reply="Both have merits."),
        Rule(match=r"(?s)\[Answer A\]\nGOOD", reply="A\nA is correct."),
        Rule(match=r"(?s)\[Answer B\]\nGOOD", reply="**B**\nB is correct."),
        Rule(match=r"(?s)\[Answer A\]\nsame", reply="tie\nNo difference."),
    ])  # fmt: skip
    table = rows(
        "Q1", "Q2", "Q3 BIASED", "Q4 UNSURE", "Q5",
        output=["GOOD one", "bad one", "x", "x", "same"], output_b=["bad one", "GOOD one", "y", "y", "same"],
    )  # fmt: skip
    judge = LLMJudge(backend=spec(fault), compare_with="output_b")
    res = judge.apply(table)
    assert fault.stats()["total"] == 10  # two orders a row
    out = {r["instruction"]: r for r in res.output.to_pylist()}
    assert out["Q1"]["judge_accuracy_winner"] == "output" and out["Q1"]["judge_accuracy_orders"] == ["output", "output"]
    assert out["Q2"]["judge_accuracy_winner"] == "output_b"
    assert out["Q3 BIASED"]["judge_accuracy_winner"] == "tie"
    assert out["Q3 BIASED"]["judge_accuracy_orders"] == ["output", "output_b"]  # each order picked the first shown
    assert out["Q5"]["judge_accuracy_winner"] == "tie"
    assert "[output shown first] A is correct." in out["Q1"]["judge_accuracy_reason"]
    err = res.failed.column("error")[0].as_py()
    assert res.rows_failed == 1 and "id='r3'" in err and "names no winner" in err and "Both have merits." in err
    m = judge.metrics()["dimensions"]["accuracy"]
    assert m["winners"] == {"output": 1, "output_b": 1, "tie": 2} and m["orders_disagree"] == 1


def test_bad_rows_and_bad_parameters_are_named(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=[Rule(match=".", reply="3")])
    res = LLMJudge(backend=spec(fault)).apply(rows("Fine", "", "Also fine", output=["a", "b", None]))
    errs = res.failed.column("error").to_pylist()
    assert "id='r1'" in errs[0] and "'instruction' is empty" in errs[0]
    assert "id='r2'" in errs[1] and "'output' is null" in errs[1]
    b = spec(fault)
    with pytest.raises(ConfigError, match="no description for dimension"):
        LLMJudge(backend=b, dimensions=["creativity"]).check()
    LLMJudge(backend=b, dimensions=["creativity"], rubrics={"creativity": "Is it original?"}).check()
    with pytest.raises(ConfigError, match="unknown language"):
        LLMJudge(backend=b, language="fr").check()
    with pytest.raises(ConfigError, match="pairwise mode"):
        LLMJudge(backend=b, compare_with="output_b", expected_scores=True).check()
    with pytest.raises(ConfigError, match="must be a word"):
        LLMJudge(backend=b, dimensions=["a b"]).check()
    own = tmp_path / "score.txt"
    own.write_text("Rate $dimension of $response for $instruction.")
    with pytest.raises(ConfigError, match="takes exactly"):
        LLMJudge(backend=b, prompts={"score": str(own)}).check()
    own.write_text("Rate $dimension ($description) of $response for $instruction.")
    judge = LLMJudge(backend=b, prompts={"score": str(own)})
    judge.check()
    assert judge.fingerprint() != LLMJudge(backend=b).fingerprint()
