"""Pairwise evaluation (AlpaGasus / Cherry LLM protocol): two models answer over HTTP, a scripted judge rates both
answers in both orders; exact win/tie/loss counts, a disagreement between the orders is a tie, a win and a tie is a
win, unparseable replies leave the prompt out with the reply kept; the Cherry test sets load with their own fields;
the score-pair parser; `thresher eval` on the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from thresher.cli import main
from thresher.errors import ConfigError, RecordError
from thresher.evaluation import CHERRY_SETS, load_prompt_set, outcome, pairwise_eval
from thresher.llms.testing import FaultServer, Rule
from thresher.scorers.judge_parse import parse_score_pair

pytestmark = pytest.mark.usefixtures("isolated_cache")

# prompt -> (A's answer, B's answer, judge's reply with A shown first, judge's reply with B shown first, A's outcome)
CASES = {
    "q1": ("alpha one", "beta one", "8 3\nA is precise.", "3 8\nthe second is precise.", "win"),
    "q2": ("alpha two", "beta two", "7 4\nA is clearer.", "6 6\nequally good.", "win"),  # a win and a tie
    "q3": ("alpha three", "beta three", "9 2\nthe first one.", "9 2\nthe first one.", "tie"),  # position bias
    "q4": ("alpha four", "beta four", "2 9\nB is right.", "9 2\nB is right.", "loss"),
    "q5": ("alpha five", "beta five", "5 5\nsame.", "[[5, 5]] same.", "tie"),
    "q6": ("alpha six", "beta six", "A is better, clearly.", "3 8\nfine", None),  # no pair of scores: left out
}


def _answer_rules(which: int) -> list[Rule]:
    return [Rule(match=rf"Question {q}\b", role="last_user", reply=case[which], name=q) for q, case in CASES.items()]


def _judge_rules() -> list[Rule]:
    rules = []
    for q, (a, b, a_first, b_first, _) in CASES.items():
        rules.append(Rule(match=rf"(?s)\[Answer A\]\n{a}\n\n\[Answer B\]\n{b}\n", reply=a_first, name=f"{q}-A-first"))
        rules.append(Rule(match=rf"(?s)\[Answer A\]\n{b}\n\n\[Answer B\]\n{a}\n", reply=b_first, name=f"{q}-B-first"))
    return rules


@pytest.fixture
def servers(fault: FaultServer) -> Iterator[tuple[FaultServer, FaultServer, FaultServer]]:
    """Model A, model B and the judge: three scripted OpenAI-compatible servers on 127.0.0.1."""
    fault.configure(script=[r.to_dict() for r in _judge_rules()])
    with FaultServer(script=[r.to_dict() for r in _answer_rules(0)]) as a, \
            FaultServer(script=[r.to_dict() for r in _answer_rules(1)]) as b:  # fmt: skip
        yield a, b, fault


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": q, "prompt": f"Question {q}: tell me."}) + "\n" for q in CASES))
    return path.rename(tmp_path / "koala_test_set.jsonl")  # read as the Cherry Koala set (field `prompt`)


def _spec(server: FaultServer, model: str) -> dict[str, str]:
    # distinct model names: the request cache keys answers by model, not by URL (where a model is served)
    return {"kind": "openai", "base_url": server.base_url, "model": model}


def test_counts_both_orders_and_ties_on_disagreement(servers, tmp_path: Path) -> None:
    a, b, judge = servers
    result = pairwise_eval(_spec(a, "model-a"), _spec(b, "model-b"), judge=_spec(judge, "judge"), test_sets=[_prompts(tmp_path)],
                           names=("curated", "full"), out_dir=tmp_path / "out")  # fmt: skip
    (s,) = result.sets
    assert s.name == "koala"
    assert (s.n, s.wins, s.ties, s.losses, s.failed) == (5, 2, 2, 1, 1)
    assert s.winning_score == pytest.approx((2 - 1) / 5 + 1)
    # A's scores in both orders: q1 8,8 q2 7,6 q3 9,2 q4 2,2 q5 5,5 -> mean over 10 judgements
    assert s.mean_score_a == pytest.approx((8 + 8 + 7 + 6 + 9 + 2 + 2 + 2 + 5 + 5) / 10)
    by_id = {p.id: p for p in s.pairs}
    for q, (ans_a, ans_b, a_first, b_first, expected) in CASES.items():
        p = by_id[q]
        assert (p.answer_a, p.answer_b, p.outcome) == (ans_a, ans_b, expected)
        assert p.reasons == [a_first, b_first]  # the judge's replies are kept whole, in order
    assert by_id["q3"].scores == [[9, 2], [2, 9]]  # stored as [A, B] whatever the order shown
    assert "gives no two scores" in str(by_id["q6"].error) and "A is better, clearly." in str(by_id["q6"].error)
    # every prompt judged exactly twice, once per order
    hits = judge.stats()["script"]["hits"]
    assert all(hits[f"{q}-{o}-first"] == 1 for q in CASES for o in "AB")
    assert judge.stats()["total"] == 2 * len(CASES)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["model_a"] == "curated" and saved["sets"][0]["wins"] == 2
    lines = (tmp_path / "out" / "pairs-koala.jsonl").read_text().splitlines()
    assert [json.loads(x)["outcome"] for x in lines] == [c[4] for c in CASES.values()]


def test_swapping_the_models_mirrors_the_counts(servers, tmp_path: Path) -> None:
    a, b, judge = servers
    result = pairwise_eval(_spec(b, "model-b"), _spec(a, "model-a"), judge=_spec(judge, "judge"), test_sets=[_prompts(tmp_path)])
    (s,) = result.sets
    assert (s.wins, s.ties, s.losses, s.failed) == (1, 2, 2, 1)
    assert s.winning_score == pytest.approx((1 - 2) / 5 + 1)


def test_a_failed_answer_leaves_the_prompt_out(servers, tmp_path: Path) -> None:
    a, b, judge = servers
    b.configure(script=[r.to_dict() for r in _answer_rules(1) if r.name != "q1"])  # B's server cannot answer q1
    result = pairwise_eval(_spec(a, "model-a"), _spec(b, "model-b"), judge=_spec(judge, "judge"), test_sets=[_prompts(tmp_path)])
    (s,) = result.sets
    assert (s.n, s.failed) == (4, 2)
    q1 = next(p for p in s.pairs if p.id == "q1")
    assert q1.outcome is None and "model b failed to answer" in str(q1.error)
    assert judge.stats()["total"] == 2 * (len(CASES) - 1)  # nothing to judge for q1


def _json_reply(reason: str, a: int, b: int) -> str:
    return json.dumps({"reason": reason, "score_a": a, "score_b": b})


def test_structured_judge_replies_in_json_through_the_schema(servers, tmp_path: Path) -> None:
    # the same cases, the judge replying in JSON: what a grammar-constrained judge writes; q6's reply has a score off
    # the 1-10 scale, which the schema's validation refuses (re-asked, then left out with the reason)
    a, b, judge = servers
    replies = {
        "q1": (_json_reply("A is precise.", 8, 3), _json_reply("the second is precise.", 3, 8)),
        "q2": (_json_reply("A is clearer.", 7, 4), _json_reply("equally good.", 6, 6)),
        "q3": (_json_reply("the first one.", 9, 2), _json_reply("the first one.", 9, 2)),
        "q4": (_json_reply("B is right.", 2, 9), _json_reply("B is right.", 9, 2)),
        "q5": (_json_reply("same.", 5, 5), _json_reply("same.", 5, 5)),
        "q6": (_json_reply("A, clearly.", 11, 2), _json_reply("fine", 3, 8)),
    }
    rules = []
    for q, (x, y, *_rest) in CASES.items():
        rules.append(Rule(match=rf"(?s)\[Answer A\]\n{x}\n\n\[Answer B\]\n{y}\n", reply=replies[q][0], name=f"{q}-A"))
        rules.append(Rule(match=rf"(?s)\[Answer A\]\n{y}\n\n\[Answer B\]\n{x}\n", reply=replies[q][1], name=f"{q}-B"))
    judge.configure(script=[r.to_dict() for r in rules])
    result = pairwise_eval(_spec(a, "model-a"), _spec(b, "model-b"), judge=_spec(judge, "judge"),
                           test_sets=[_prompts(tmp_path)], structured=True)  # fmt: skip
    (s,) = result.sets
    assert (s.n, s.wins, s.ties, s.losses, s.failed) == (5, 2, 2, 1, 1)
    q6 = next(p for p in s.pairs if p.id == "q6")
    assert q6.outcome is None and "not valid for schema" in str(q6.error) and "11 is not one of" in str(q6.error)
    bodies = [b for b in judge.stats()["bodies"] if "score_a" in json.dumps(b.get("response_format"))]
    assert bodies, "the judge was not asked for the schema"
    assert all('"reason"' in m["content"] for body in bodies for m in body["messages"])  # the compare_json template


def test_cli_prints_the_table_and_uses_an_overriding_template(servers, tmp_path: Path) -> None:
    a, b, judge = servers
    own = tmp_path / "mine.txt"
    own.write_text("Request: $instruction\n[Answer A]\n$first\n\n[Answer B]\n$second\n\nTwo scores, 1-10.")
    res = CliRunner().invoke(main, [
        "eval", "--a", json.dumps(_spec(a, "model-a")), "--b", json.dumps(_spec(b, "model-b")), "--judge", json.dumps(_spec(judge, "judge")),
        "--set", str(_prompts(tmp_path)), "--names", "mine,theirs", "--prompt", str(own), "--out", str(tmp_path / "o"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mine vs theirs" in res.output
    assert "koala" in res.output and "1.200" in res.output
    assert all(p.endswith("Two scores, 1-10.") for p in judge.stats()["per_prompt"])  # our template was sent
    bad = CliRunner().invoke(main, ["eval", "--a", "bundled", "--b", "bundled", "--set", "vicuna"])
    assert bad.exit_code != 0 and "data_dir" in bad.output


def test_outcome_rule() -> None:
    # A's points per order (+1 its score is higher, -1 lower, 0 equal), added
    assert [outcome(1, 1), outcome(1, 0), outcome(0, 1), outcome(1, -1), outcome(0, 0)] == ["win"] * 3 + ["tie"] * 2
    assert [outcome(-1, -1), outcome(-1, 0), outcome(-1, 1)] == ["loss", "loss", "tie"]


@pytest.mark.parametrize(("text", "pair"), [
    ("7 4\nbecause", (7, 4)), ("[[8, 3]] fine", (8, 3)), ("**7/10, 4/10**\nx", (7, 4)), ("Scores: 7 and 4", (7, 4)),
    ("Answer A: 9\nAnswer B: 2", (9, 2)), ("回答 A：8分\n回答 B：6分", (8, 6)), ("８ ６\n理由", (8, 6)),
    ("7\nonly one", None), ("11 3", None), ("The first is better.", None), ("", None), ("Answer A: 9 only", None),
])  # fmt: skip
def test_parse_score_pair(text: str, pair: tuple[int, int] | None) -> None:
    assert parse_score_pair(text) == pair


def test_cherry_test_sets_load_with_their_own_fields(shared_data: Path) -> None:
    d = shared_data / "cherry-llm"
    sizes = {name: len(load_prompt_set(name, data_dir=d)) for name in CHERRY_SETS}
    assert sizes == {"vicuna": 80, "koala": 180, "wizardlm": 218, "sinstruct": 252, "lima": 300}
    vicuna = load_prompt_set("vicuna", data_dir=d, max_prompts=2)
    assert vicuna.rows[0] == {"id": "1", "instruction": "How can I improve my time management skills?", "input": ""}
    si = load_prompt_set("sinstruct", data_dir=d, max_prompts=1).rows[0]
    assert si["id"] == "user_oriented_task_0" and si["input"].startswith("If you have any questions")
    alpaca = load_prompt_set(shared_data / "cherry-llm" / "cherry_alpaca_5_percent.json", max_prompts=3)
    assert len(alpaca) == 3 and all(r["instruction"] for r in alpaca.rows)


def test_bad_test_set_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "vicuna_test_set.jsonl"
    path.write_text('{"question_id": 1, "text": "fine"}\n{"question_id": 2, "txt": "typo"}\n')
    with pytest.raises(RecordError, match=r"vicuna_test_set.jsonl, line 2, field 'text'"):
        load_prompt_set(path)
    with pytest.raises(ConfigError, match="neither a file nor one of the known sets"):
        load_prompt_set("vicuna2")
    with pytest.raises(ConfigError, match="placeholders"):
        pairwise_eval(None, None, judge=None, test_sets=[path], prompts={"compare": _write(tmp_path, "$instruction")})


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.txt"
    p.write_text(text)
    return p


def test_commands_have_help() -> None:
    top = CliRunner().invoke(main, ["--help"])
    for cmd in ("eval", "learn", "iterate"):
        assert cmd in top.output
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
