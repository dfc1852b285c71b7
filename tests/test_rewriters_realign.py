"""ReAlign and Polish against the scripted fault server (a real HTTP server on 127.0.0.1): each verdict from a known
reply (the longest of n candidates kept; kept by keep_kind, empty, truncated and each check, with its reason),
evidence from a real BM25 index and from a user's retriever shown in the prompt and recorded, failed requests and
bad task values as failed rows, Chinese templates, and the configuration errors before any request."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from thresher.errors import ConfigError, PipelineError
from thresher.llms.testing import FaultServer, Rule
from thresher.pipelines import Pipeline
from thresher.rewriters import BM25Retriever, Passage, Polish, ReAlign
from thresher.rewriters.rewriting import strip_cue, template_markers

sys.path.insert(0, str(Path(__file__).parent))
pytestmark = pytest.mark.usefixtures("isolated_cache")

MATH = "She sold 48 clips in April and 48 / 2 = 24 in May.\nSo 48 + 24 = 72 clips.\n#### 72"
GOOD_MATH = ("We add April's sales to May's, which are half of April's.\n\n1. May: 48 / 2 = 24 clips.\n"
             "2. Total: 48 + 24 = 72 clips.\n\nResult: 72 clips in all.")  # fmt: skip
SHORT_MATH = "She sold 48 + 24 = 72 clips."
CAPITAL = "The capital of Australia is Canberra, a planned city chosen as a compromise between Sydney and Melbourne."
GOOD_CAPITAL = ("Canberra is the capital of Australia.\n\nIt is a planned city, chosen as a compromise between the "
                "rivals Sydney and Melbourne, and it has been the seat of government since 1927.")  # fmt: skip


def spec(server: FaultServer) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "rw", "retry_base_delay": 0.01, "max_retries": 1}


def row(rid: str, instruction: str, output: str | None, task: str) -> dict[str, Any]:
    return {"id": rid, "instruction": instruction, "input": "", "output": output, "task": task}


def at(rid: str) -> str:
    """A rule's match for the prompt of one row (its request section opens with the row's tag)."""
    return rf"### User request\n{rid}:"


def test_each_verdict_from_known_replies(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=[
        Rule(match=at("Q1"), reply=[SHORT_MATH, GOOD_MATH]),  # two candidates: the longer is kept
        Rule(match=at("Q2"), reply=GOOD_CAPITAL),
        Rule(match=at("Q4"), reply=GOOD_MATH.replace("72", "seventy-two")),
        Rule(match=at("Q5"), reply=GOOD_MATH + "\n\n```python\nprint(48 + 24)\n```"),
        Rule(match=at("Q6"), reply="72."),
        Rule(match=at("Q7"), reply="Reasoning: the format asks for steps.\nRevised response: " + GOOD_MATH),
        Rule(match=at("Q8"), reply="### Rewritten response\n" + GOOD_MATH),
        Rule(match=at("Q9"), reply=GOOD_MATH, finish_reason="length"),
    ], unmatched="error")  # fmt: skip
    retriever = BM25Retriever(corpus=["Canberra, the capital, became the seat of Australia's government in 1927.",
                                      "Sydney is the largest city in Australia."], index_dir=tmp_path)  # fmt: skip
    table = pa.Table.from_pylist([
        row("r1", "Q1: How many clips did Natalia sell?", MATH, "math_problem"),
        row("r2", "Q2: What is the capital of Australia?", CAPITAL, "open_qa"),
        row("r3", "Q3: Write a story about a fox.", "Once upon a time a fox...", "story_writing"),
        row("r4", "Q4: How many clips?", MATH, "math_problem"),
        row("r5", "Q5: How many clips?", MATH, "math_problem"),
        row("r6", "Q6: How many clips?", MATH, "math_problem"),
        row("r7", "Q7: How many clips?", MATH, "math_problem"),
        row("r8", "Q8: How many clips?", MATH, "math_problem"),
        row("r9", "Q9: How many clips?", MATH, "math_problem"),
        row("r10", "Q10: How many clips?", MATH, "cooking"),
        row("r11", "Q11: How many clips?", None, "math_problem"),
        row("r12", "Q12 [[fail]]: How many clips?", MATH, "math_problem"),
    ])  # fmt: skip
    step = ReAlign(backend=spec(fault), retriever=retriever, top_k=2, n=2)
    res = step.apply(table)
    assert res.rows_in == res.rows_out + res.rows_failed == 12 and res.rows_rejected == 0
    out = {r["id"]: r for r in res.output.to_pylist()}
    status = {k: r["realign_status"] for k, r in out.items()}
    assert status == {
        "r1": "rewritten",
        "r2": "rewritten",
        "r3": "kept: keep_kind: responses to 'story_writing' tasks are kept as they are",
        "r4": "kept: answer: the original's final answer '72' (after '####') is not in the rewrite",
        "r5": "kept: code: the rewrite adds code (a fenced code block) that the original does not have",
        "r6": "kept: length: the rewrite has 1 token, under 0.5 of the original's 18",
        "r7": "kept: scaffolding: the rewrite holds prompt scaffolding 'revised response:'",
        "r8": "rewritten",
        "r9": "kept: truncated: every candidate was cut off at max_tokens=1024",
        "r11": "kept: empty: the row has no response to rewrite",
    }
    assert out["r1"]["output"] == GOOD_MATH and out["r1"]["output_original"] == MATH
    assert out["r8"]["output"] == GOOD_MATH  # the template's closing cue at the start is dropped
    for k in ("r3", "r4", "r5", "r6", "r7", "r9", "r11"):
        assert out[k]["output"] == table.to_pylist()[int(k[1:]) - 1]["output"] and out[k]["output_original"] is None
    # evidence: open_qa needs it; the math rows do not get any
    assert out["r2"]["realign_evidence"][0]["text"].startswith("Canberra, the capital, became the seat")
    assert out["r2"]["realign_evidence"][0]["source"] == "corpus row 0"
    assert all(out[k]["realign_evidence"] is None for k in out if k != "r2")
    prompts = [b["messages"][0]["content"] for b in fault.stats()["bodies"]]
    (q2,) = [p for p in prompts if "Q2:" in p]
    assert "### Evidence passages\n[1] (corpus row 0) Canberra, the capital, became the seat" in q2
    assert "Give the direct answer in the first sentence" in q2  # open_qa's format criterion
    assert not any("Q3:" in p for p in prompts)  # a kept kind costs no request
    failed = {r["id"]: r["error"] for r in res.failed.to_pylist()}
    assert set(failed) == {"r10", "r12"}
    assert failed["r10"].startswith("row id='r10', field 'task': 'cooking' is not a kind of the taxonomy")
    assert "valid: open_qa, closed_qa" in failed["r10"]
    assert failed["r12"].startswith("row id='r12'")
    m = step.metrics()
    assert m["rewritten"] == 3 and m["with_evidence"] == 1
    assert m["kept_by"] == {"keep_kind": 1, "answer": 1, "code": 1, "length": 1, "scaffolding": 1, "truncated": 1,
                            "empty": 1}  # fmt: skip


def test_a_fixed_task_and_the_column_check(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match=at("Q1"), reply=GOOD_MATH)])
    table = pa.table({"id": ["r1"], "instruction": ["Q1: How many clips?"], "output": [MATH]})
    res = ReAlign(backend=spec(fault), task="math_problem", n=1).apply(table)
    assert res.output.column("realign_status").to_pylist() == ["rewritten"]
    with pytest.raises(PipelineError, match=r"task.*TaskClassifier before it, or give ReAlign a fixed task="):
        ReAlign(backend=spec(fault)).apply(table)


def test_polish_with_a_user_retriever_keeps_the_first_original(fault: FaultServer) -> None:
    class Notes:
        def identity(self) -> dict[str, Any]:
            return {"kind": "notes"}

        def retrieve(self, query: str, k: int = 3) -> list[Passage]:
            return [Passage("Canberra has been the capital since 1913.", "notes://canberra", 1.0)]

    fault.configure(script=[Rule(match=r"### User request\nQ2:", reply=GOOD_CAPITAL)])
    table = pa.table({"id": ["r2"], "instruction": ["Q2: What is the capital of Australia?"], "output": [CAPITAL],
                      "output_original": ["the capital is Canberra"]})  # fmt: skip
    step = Polish(backend=spec(fault), retriever=Notes(), n=1)
    (got,) = step.apply(table).output.to_pylist()
    assert got["polish_status"] == "rewritten" and got["output"] == GOOD_CAPITAL
    assert got["output_original"] == "the capital is Canberra"  # an earlier rewriter's original stays
    assert got["polish_evidence"] == [{"text": "Canberra has been the capital since 1913.", "source": "notes://canberra",
                                       "score": 1.0}]  # fmt: skip
    (body,) = fault.stats()["bodies"]
    assert "[1] (notes://canberra) Canberra has been the capital since 1913." in body["messages"][0]["content"]


def test_chinese_templates_and_scaffolding(fault: FaultServer) -> None:
    original = "北京是中国的首都，也是全国的政治和文化中心，有三千多年的建城史。"
    fault.configure(script=[
        Rule(match=r"### 用户请求\n问1", reply="北京是中国的首都。\n\n它是全国的政治和文化中心，建城史已有三千多年。"),
        Rule(match=r"### 用户请求\n问2", reply="修改后的回答：北京是中国的首都，是全国的政治和文化中心，有三千多年的建城史。"),
    ])  # fmt: skip
    table = pa.table({"id": ["a", "b"], "instruction": ["问1：中国的首都是哪里？", "问2：中国的首都是哪里？"],
                      "output": [original, original], "task": ["open_qa", "open_qa"]})  # fmt: skip
    res = ReAlign(backend=spec(fault), language="zh", n=1).apply(table)
    assert res.output.column("realign_status").to_pylist() == [
        "rewritten", "kept: scaffolding: the rewrite holds prompt scaffolding '修改后的回答:'"]  # fmt: skip
    assert "### 目标格式" in fault.stats()["bodies"][0]["messages"][0]["content"]


def test_configuration_errors_before_any_request(fault: FaultServer, tmp_path: Path) -> None:
    b = spec(fault)
    table = pa.table({"instruction": ["q"], "output": ["a"], "task": ["open_qa"]})
    cases = [
        (ReAlign(backend=b, task="cooking"), r"task 'cooking' is not a kind of the taxonomy; valid: \['open_qa'"),
        (ReAlign(backend=b, checks=["length", "tone"]), r"checks must be a list of \['length', 'code', 'answer'"),
        (ReAlign(backend=b, n=2, temperature=0), "2 copies of one rewrite"),
        (ReAlign(backend=b, min_length_ratio=2), r"min_length_ratio must be a number in \[0, 1\]"),
        (Polish(backend=b, n=0), "n must be a positive integer"),
        (Polish(backend=b, language="fr"), "unknown language 'fr'"),
        (ReAlign(backend=b, prompts={"rewrite_plain": "x.txt"}), r"no template 'rewrite_plain'; valid: \['rewrite'"),
        (ReAlign(backend=b, retriever={"kind": "web"}), "unknown kind 'web'"),
        (Polish(backend=b, retriever={"kind": "bm25", "corpus": str(tmp_path / "missing.txt")}), "does not exist"),
    ]
    for step, message in cases:
        with pytest.raises(ConfigError, match=message):
            step.apply(table)
    bad = tmp_path / "rewrite.txt"
    bad.write_text("Rewrite $response in $style.", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"the 'rewrite' template takes exactly \['format', 'question', 'response'\]"):
        ReAlign(backend=b, prompts={"rewrite": str(bad)}).apply(table)
    assert fault.stats()["total"] == 0


def test_fingerprints_follow_content(tmp_path: Path) -> None:
    b = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    corpus = tmp_path / "kb.txt"
    corpus.write_text("Canberra is the capital.", encoding="utf-8")
    r = {"kind": "bm25", "corpus": str(corpus)}
    step = ReAlign(backend=b, retriever=r)
    fp = step.fingerprint()
    assert ReAlign(backend=b, retriever={**r, "index_dir": str(tmp_path / "elsewhere")}).fingerprint() == fp
    assert ReAlign(backend=b, retriever=BM25Retriever(corpus=str(corpus))).fingerprint() == fp  # object or spec
    assert step.clone(extend={"open_qa": {"format": "One line."}}).fingerprint() != fp
    corpus.write_text("Canberra is the capital of Australia.", encoding="utf-8")
    assert step.fingerprint() != fp
    rebuilt = Pipeline.from_yaml(Pipeline.from_step(step).to_yaml())
    (only,) = rebuilt.nodes.values()
    assert only.step.fingerprint() == step.fingerprint()


def test_cue_and_markers() -> None:
    assert strip_cue("Rewritten response: Hi.", "Rewritten response") == "Hi."
    assert strip_cue("**Rewritten response:** Hi.", "Rewritten response") == "Hi."
    assert strip_cue("Hi. Rewritten response", "Rewritten response") == "Hi. Rewritten response"
    markers = template_markers(["### User request\n$question\n\n### Target format\n$format\n"])
    assert "### Target format" in markers and "User request:" in markers


def test_a_value_that_is_not_text_fails_its_row_by_name(fault: FaultServer) -> None:
    table = pa.table({"id": ["x1"], "instruction": ["How many?"], "output": [72], "task": ["math_problem"]})
    for step in (ReAlign(backend=spec(fault)), Polish(backend=spec(fault))):
        res = step.apply(table)
        assert res.rows_failed == 1 and res.rows_out == 0
        assert res.failed.column("error").to_pylist() == ["row id='x1', field 'output': expected text, found int 72"]
    assert fault.stats()["total"] == 0
