"""DeitaScorer: expected scores over "1"-"6" from a served model's scripted top log-probabilities and from the bundled
model's next-token distribution (checked against torch written out here), multi-turn rows summed turn by turn, the
ranking route over Evol-Instruct lineages, and failed rows that say why."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.llms.testing import FaultServer, Rule
from thresher.scorers import DeitaScorer
from thresher.scorers.deita import lineage_roots

pytestmark = pytest.mark.usefixtures("isolated_cache")


def spec(server: FaultServer) -> dict[str, object]:
    return {"kind": "openai", "base_url": server.base_url, "model": "scorer", "retry_base_delay": 0.01}


def digits(**logprobs: float) -> list[dict[str, object]]:
    """A scripted reply's log-probabilities: the first token with the given top list ("d3" -> token "3")."""
    tops = {k[1:]: v for k, v in logprobs.items()}
    best = max(tops, key=lambda t: tops[t])
    return [{"token": best, "logprob": tops[best], "top_logprobs": tops}]


def expectation(**logprobs: float) -> float:
    ps = {int(k[1:]): math.exp(v) for k, v in logprobs.items()}
    return sum(k * p for k, p in ps.items()) / sum(ps.values())


def test_expected_scores_from_a_served_model_turn_by_turn(fault: FaultServer) -> None:
    c_easy, c_hard = {"d1": -0.1, "d2": -2.5}, {"d5": -0.4, "d6": -1.2, "d4": -2.0}
    q_good, q_poor = {"d5": -0.3, "d6": -1.5}, {"d2": -0.2, "d1": -1.9, "d3": -3.0}
    fault.configure(script=[
        Rule(match=r"(?s)How demanding.*\[Request\]\nSay hi", reply="1", logprobs=digits(**c_easy)),
        Rule(match=r"(?s)How demanding.*\[Request\]\n", reply="5", logprobs=digits(**c_hard)),
        Rule(match=r"(?s)How good.*\[Answer\]\nGOOD", reply="5", logprobs=digits(**q_good)),
        Rule(match=r"(?s)How good.*\[Answer\]\n", reply="2", logprobs=digits(**q_poor)),
    ])  # fmt: skip
    table = pa.table({
        "id": ["single", "multi", "noanswer"],
        "instruction": ["Prove that sqrt(2) is irrational.", "Now do it for sqrt(3).", "Explain."],
        "input": ["", "", ""],
        "output": ["GOOD proof", "weak proof", None],
        "history": [None, [["Say hi", "GOOD hi"]], None],
    })  # fmt: skip
    step = DeitaScorer(backend=spec(fault))
    res = step.apply(table)
    out = {r["id"]: r for r in res.output.to_pylist()}
    c1, c2, q1, q2 = (expectation(**x) for x in (c_easy, c_hard, q_good, q_poor))
    assert out["single"]["deita_complexity"] == pytest.approx(c2)
    assert out["single"]["deita_quality"] == pytest.approx(q1)
    assert out["single"]["deita_score"] == pytest.approx(c2 * q1)
    multi = out["multi"]  # turn 1: "Say hi" / "GOOD hi"; turn 2: the row's instruction / "weak proof"
    assert multi["deita_complexity_turns"] == pytest.approx([c1, c2])
    assert multi["deita_quality_turns"] == pytest.approx([q1, q2])
    assert multi["deita_score"] == pytest.approx(c1 * q1 + c2 * q2)
    assert multi["deita_complexity"] == pytest.approx((c1 + c2) / 2)
    assert fault.stats()["total"] == 6  # 2 for the single-turn row, 4 for the two turns; none for the failed row
    (err,) = res.failed.column("error").to_pylist()
    assert "id='noanswer'" in err and "'output' is null" in err
    m = step.metrics()["deita"]
    assert m["rows_scored"] == 2 and m["failures"] == {"bad_row": 1}


def test_a_reply_without_a_score_digit_fails_the_row(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match="How demanding", reply="Complex", logprobs=[{"token": "Complex", "logprob": -0.1,
                                                                 "top_logprobs": {"Complex": -0.1, "Hard": -2.0}}]),
        Rule(match="How good", reply="4", logprobs=digits(d4=-0.1)),
    ])  # fmt: skip
    res = DeitaScorer(backend=spec(fault)).apply(pa.table({"id": ["a"], "instruction": ["Do it."], "output": ["Done."]}))
    (err,) = res.failed.column("error").to_pylist()
    assert res.rows_out == 0 and "id='a'" in err and "no digit 1-6" in err and "'Complex'" in err


def test_lineage_roots_follow_parent_ids() -> None:
    ids = ["x-evol1", "x-evol2", "y-evol1", "x", "z"]
    parents = ["x", "x-evol1", "y", None, None]
    assert lineage_roots(ids, parents) == ["x", "x", "y", "x", "z"]


def test_ranking_route_scores_each_lineage_in_one_request(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"(?s)versions of a request.*\[1\] Base x.*\[3\]", json={"scores": [1, 3, 5]}, name="c3"),
        Rule(match=r"(?s)versions of a request.*\[1\] Base y", json={"scores": [2]}, name="c1"),
        Rule(match=r"(?s)requests, each with an answer.*\[1\] Request: Base x.*\[3\]", json={"scores": [6, 4, 2]}, name="q3"),
        Rule(match=r"(?s)requests, each with an answer.*\[1\] Request: Base y", json={"scores": [9]}, name="q1"),
    ])  # fmt: skip
    table = pa.table({
        "id": ["x", "x-evol1", "x-evol2", "y"],
        "instruction": ["Base x", "Base x, harder", "Base x, hardest", "Base y"],
        "output": ["a", "b", "c", "d"],
        "parent_id": [None, "x", "x-evol1", None],
    })  # fmt: skip
    res = DeitaScorer(backend=spec(fault), method="rank").apply(table)
    hits = fault.stats()["script"]["hits"]
    assert hits == {"c3": 1, "c1": 1, "q3": 1, "q1": 1}  # one request per lineage and score kind
    out = {r["id"]: r for r in res.output.to_pylist()}
    assert [out[k]["deita_complexity"] for k in ("x", "x-evol1", "x-evol2")] == [1.0, 3.0, 5.0]
    assert [out[k]["deita_score"] for k in ("x", "x-evol1", "x-evol2")] == [6.0, 12.0, 10.0]
    (err,) = res.failed.column("error").to_pylist()  # y's quality reply is out of the scale
    assert "id='y'" in err and "ranking quality" in err and "[9]" in err


def test_parameters_are_checked(fault: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        DeitaScorer(method="guess").check()
    with pytest.raises(ConfigError, match="top_logprobs"):
        DeitaScorer(backend=spec(fault), top_logprobs=3).check()
    with pytest.raises(ConfigError, match="method='rank'"):
        DeitaScorer(backend={"kind": "llama_cpp"}).check()
    own = tmp_path / "c.txt"
    own.write_text("Rate $instruction from 1 to 6.")
    a = DeitaScorer(backend=spec(fault), prompts={"complexity": str(own)})
    a.check()
    assert a.fingerprint() != DeitaScorer(backend=spec(fault)).fingerprint()
    assert DeitaScorer(method="rank").reads() == ("instruction", "output", "parent_id")


@pytest.mark.slow
def test_bundled_model_expected_scores_equal_a_direct_torch_computation(smol_hf_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = pa.table({
        "id": ["a", "b"],
        "instruction": ["Name a colour.", "Write a proof that there are infinitely many primes, in Chinese."],
        "output": ["Blue.", "假设素数只有有限个……"],
    })  # fmt: skip
    step = DeitaScorer(backend={"kind": "transformers", "model": str(smol_hf_dir)})
    out = step(table).to_pylist()
    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_hf_dir, dtype=torch.float32).eval()
    ids = [tok.convert_tokens_to_ids(d) for d in "123456"]
    templates = step._templates()

    def direct(prompt: str) -> float:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits = model(**enc).logits[0, -1]
        p = torch.softmax(logits[ids].double(), dim=0)
        return float(sum((k + 1) * p[k] for k in range(6)))

    for row in out:
        c = direct(templates["complexity"].render(instruction=row["instruction"]))
        q = direct(templates["quality"].render(instruction=row["instruction"], response=row["output"]))
        assert row["deita_complexity"] == pytest.approx(c, abs=1e-4)
        assert row["deita_quality"] == pytest.approx(q, abs=1e-4)
        assert row["deita_score"] == pytest.approx(c * q, abs=1e-3)
        assert 1.0 <= c <= 6.0
    print("bundled SmolLM2 DEITA scores:", [(r["id"], round(r["deita_complexity"], 3), round(r["deita_quality"], 3)) for r in out])
