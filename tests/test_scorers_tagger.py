"""Tagger (InsTag): tags from scripted JSON replies, normalised by rule (case, plurals, punctuation), synonyms merged
with the real bundled MiniLM embedder, a frequency floor, the vocabulary as a metric, Chinese, and failed rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.llms.testing import FaultServer, Rule
from thresher.scorers import Tagger
from thresher.scorers.tagger import normalise_tag, singular

pytestmark = pytest.mark.usefixtures("isolated_cache")


def spec(server: FaultServer) -> dict[str, object]:
    return {"kind": "openai", "base_url": server.base_url, "model": "tagger", "retry_base_delay": 0.01}


def tags(*names: str) -> dict[str, object]:
    return {"tags": [{"tag": n, "explanation": "because"} for n in names]}


def test_rule_normalisation() -> None:
    assert [singular(w) for w in ("queries", "boxes", "tags", "analysis", "mathematics", "class", "bus", "sql")] == [
        "query", "box", "tag", "analysis", "mathematics", "class", "bus", "sql"]  # fmt: skip
    assert normalise_tag("  Math_Problems!! ") == "math problem"
    assert normalise_tag("SQL-Queries / Joins") == "sql query join"
    assert normalise_tag("数学，计算") == "数学计算"
    assert normalise_tag("...") == ""


def test_tags_merged_floored_and_counted(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"\[Request\]\nR1\b", json=tags("Math", "Poem Writing")),
        Rule(match=r"\[Request\]\nR2\b", json=tags("mathematics", "poetry writing", "History")),
        Rule(match=r"\[Request\]\nR3\b", json=tags("math", "Math problems")),
        Rule(match=r"\[Request\]\nR4\b", json={"tags": []}),
        Rule(match=r"\[Request\]\nR5\b", reply="I think it is about math."),  # never JSON, even when re-asked
    ])  # fmt: skip
    table = pa.table({"id": [f"r{i}" for i in range(1, 6)], "instruction": [f"R{i} task" for i in range(1, 6)]})
    step = Tagger(backend=spec(fault), min_count=2)
    res = step.apply(table)
    out = {r["id"]: r for r in res.output.to_pylist()}
    # "mathematics" joins "math" (the more frequent), "poetry writing" joins "poem writing" (MiniLM cosine >= 0.9);
    # "history" and "math problem" stay on one row each and fall under the floor of 2
    assert out["r1"]["tags"] == ["math", "poem writing"]
    assert out["r2"]["tags"] == ["math", "poem writing"] and out["r2"]["n_tags"] == 2
    assert out["r3"]["tags"] == ["math"]
    assert out["r4"]["tags"] == [] and out["r4"]["n_tags"] == 0
    (err,) = res.failed.column("error").to_pylist()
    assert "id='r5'" in err and "not valid for schema 'intention_tags' after 2 re-ask(s)" in err
    m = step.metrics()["tags"]
    assert m["vocabulary"] == {"math": 3, "poem writing": 2}
    assert m["merged"] == {"mathematics": "math", "poetry writing": "poem writing"}
    assert m["below_floor"] == {"history": 1, "math problem": 1}
    assert m["rows_given_no_tags"] == 1 and m["replies_without_json"] == 1 and m["rows_tagged"] == 3


def test_chinese_template_and_tags(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"【请求】\n把这句话翻译成英文", json=tags("翻译", "英语")),
        Rule(match=r"【请求】\n解方程", json=tags("数学", "方程求解")),
    ])  # fmt: skip
    table = pa.table({"instruction": ["把这句话翻译成英文", "解方程"], "input": ["你好", "x+1=2"]})
    out = Tagger(backend=spec(fault), language="zh", merge_similarity=None)(table).to_pylist()
    assert [r["tags"] for r in out] == [["翻译", "英语"], ["数学", "方程求解"]]


def test_parameters_are_checked(fault: FaultServer) -> None:
    with pytest.raises(ConfigError, match="merge_similarity"):
        Tagger(backend=spec(fault), merge_similarity=1.5).check()
    with pytest.raises(ConfigError, match="min_count"):
        Tagger(backend=spec(fault), min_count=0).check()
    with pytest.raises(ConfigError, match="no template"):
        Tagger(backend=spec(fault), prompts={"tags": "x.txt"}).check()
    res = Tagger(backend=spec(fault)).apply(pa.table({"id": ["e"], "instruction": ["  "]}))
    assert "id='e'" in res.failed.column("error")[0].as_py() and "'instruction' is empty" in res.failed.column("error")[0].as_py()
