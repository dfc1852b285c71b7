"""TaskClassifier against the scripted fault server: JSON and prose answers mapped to kinds, answers off the list
to `default` (with the answer kept in `task_raw`), the kinds sent as a JSON-schema enum, few-shot examples, Chinese,
failed rows, bad examples named by file, row and field, and fingerprints that follow content, not paths."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.llms.testing import FaultServer, Rule
from thresher.rewriters import TaskClassifier, load_taxonomy
from thresher.rewriters.classifier import match_kind
from thresher.rewriters.taxonomy import shipped_path

pytestmark = pytest.mark.usefixtures("isolated_cache")
KINDS = load_taxonomy().kinds


def spec(server: FaultServer, **extra: object) -> dict[str, object]:
    return {"kind": "openai", "base_url": server.base_url, "model": "clf", "retry_base_delay": 0.01, **extra}


def rows(*instructions: str) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(len(instructions))], "instruction": list(instructions)})


def test_match_kind_reads_names_from_answers() -> None:
    assert match_kind("open_qa", KINDS) == "open_qa"
    assert match_kind(' "Open QA". ', KINDS) == "open_qa"
    assert match_kind("code-writing", KINDS) == "code_writing"
    assert match_kind("I would say this is math_problem, or maybe open_qa.", KINDS) == "math_problem"
    assert match_kind("code_language_identification", KINDS) == "code_language_identification"
    assert match_kind("It asks for a language identification.", KINDS) == "language_identification"
    assert match_kind("cooking", KINDS) is None and match_kind("", KINDS) is None
    assert match_kind("open_qa_plus", KINDS) is None  # a longer word is not the kind


def test_json_answers_off_list_answers_and_prose(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"\[Request\]\nQ1\b", json={"task": "math_problem"}),
        Rule(match=r"\[Request\]\nQ2\b", json={"task": "Open QA"}),
        Rule(match=r"\[Request\]\nQ3\b", json={"task": "cooking_advice"}),  # not a kind
        Rule(match=r"\[Request\]\nQ4\b", reply="This one is poem_writing."),  # prose, though JSON was asked for
        Rule(match=r"\[Request\]\nQ5\b", json={"kind": "story_writing"}),  # JSON without 'task': read as text
    ])  # fmt: skip
    step = TaskClassifier(backend=spec(fault))
    res = step.apply(rows("Q1 add 2 and 3", "Q2 who wrote Hamlet", "Q3 make soup", "Q4 a poem", "Q5 a story", " "))
    out = {r["id"]: r for r in res.output.to_pylist()}
    assert [(out[f"r{i}"]["task"], out[f"r{i}"]["task_raw"]) for i in range(5)] == [
        ("math_problem", "math_problem"), ("open_qa", "Open QA"), ("default", "cooking_advice"),
        ("poem_writing", "This one is poem_writing."), ("story_writing", '{"kind": "story_writing"}')]  # fmt: skip
    assert set(out[r]["task"] for r in out) <= set(KINDS)
    (err,) = res.failed.column("error").to_pylist()
    assert err.startswith("row id='r5': field 'instruction' is empty")
    assert res.rows_in == res.rows_out + res.rows_failed == 6
    m = step.metrics()
    assert m["answers"] == {"off_list": 1, "from_text": 2}
    assert m["tasks"] == {k: 1 for k in ("math_problem", "open_qa", "default", "poem_writing", "story_writing")}
    assert m["reasks"] == 0  # a prose answer is read, never re-asked


def test_the_kinds_reach_the_server_as_an_enum(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match="Request", json={"task": "translation"})])
    TaskClassifier(backend=spec(fault)).apply(rows("Translate 'cat' into French."))
    (body,) = fault.stats()["bodies"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["task"]["enum"] == KINDS and schema["required"] == ["task"]
    content = body["messages"][0]["content"]
    assert "- open_qa: Answer a question about the world" in content and content.count("\n- ") == len(KINDS)
    assert content.index("- default:") < content.index("Translate 'cat'")  # shared prefix first, the row last
    # a server without json_schema: auto mode steps down to json_object with the schema (llama.cpp's grammar form)
    fault.reset()
    fault.configure(reject_json_schema=True)
    res = TaskClassifier(backend=spec(fault), seed=3).apply(rows("Translate 'dog' into French."))
    assert res.output.column("task").to_pylist() == ["translation"]
    last = fault.stats()["bodies"][-1]["response_format"]
    assert last["type"] == "json_object" and last["schema"]["properties"]["task"]["enum"] == KINDS


def test_unstructured_replies_are_parsed_from_text(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"\[Request\]\nA\b", reply="code_correction"),
        Rule(match=r"\[Request\]\nB\b", reply='The kind is "Code Writing".'),
        Rule(match=r"\[Request\]\nC\b", reply="I am not sure."),
        Rule(match=r"\[Request\]\nD\b", reply='{"task": "ordering"}'),
    ])  # fmt: skip
    step = TaskClassifier(backend=spec(fault), structured=False)
    res = step.apply(rows("A fix my loop", "B write a parser", "C hmm", "D sort these"))
    assert res.output.column("task").to_pylist() == ["code_correction", "code_writing", "default", "ordering"]
    assert res.output.column("task_raw").to_pylist()[2] == "I am not sure."
    assert all("response_format" not in b for b in fault.stats()["bodies"])
    assert step.metrics()["answers"] == {"off_list": 1, "from_text": 3}


def test_chinese_prompts_and_taxonomy(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"【请求】\n把这段话翻译成英文", json={"task": "translation"}),
        Rule(match=r"【请求】\n写一首关于秋天的诗", reply="这是 poem_writing 类任务"),
        Rule(match=r"【请求】\n你好", json={"task": "闲聊"}),
    ])  # fmt: skip
    res = TaskClassifier(backend=spec(fault), language="zh").apply(rows("把这段话翻译成英文：你好", "写一首关于秋天的诗", "你好"))
    out = res.output.to_pylist()
    assert [r["task"] for r in out] == ["translation", "poem_writing", "default"] and out[2]["task_raw"] == "闲聊"
    content = fault.stats()["bodies"][0]["messages"][0]["content"]
    assert "- open_qa: 凭常识或世界知识回答一个问题" in content and "只回复一个 JSON 对象" in content


def shots_file(tmp_path: Path, records: list[dict[str, object]]) -> Path:
    path = tmp_path / "shots.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


EXAMPLES = [{"instruction": f"Solve {i} + {i}.", "task": "math_problem"} for i in range(6)] + [
    {"instruction": f"Write a haiku about the number {i}.", "task": "poem_writing"} for i in range(6)] + [
    {"instruction": "Who painted the Mona Lisa?", "task": "open_qa"}]  # fmt: skip


def test_few_shot_examples_are_drawn_once_over_the_kinds(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=[Rule(match="Request", json={"task": "math_problem"})])
    step = TaskClassifier(backend=spec(fault), examples=shots_file(tmp_path, EXAMPLES), n_shots=3, seed=7)
    step.apply(rows("What is 9 * 9?", "What is 8 * 8?"))
    first, second = (b["messages"][0]["content"] for b in fault.stats()["bodies"])
    assert first.split("What is 9")[0] == second.split("What is 8")[0]  # every row sees the same examples
    shown = [line for line in first.splitlines() if line.startswith('Answer: {"task"')]
    assert sorted(shown) == sorted(f'Answer: {{"task": "{k}"}}' for k in ("math_problem", "poem_writing", "open_qa"))
    assert "Some requests and the kind each belongs to:" in first
    # the same seed draws the same examples; another seed may draw others, and its fingerprint differs
    assert step.clone().fingerprint() == step.fingerprint()
    assert step.clone(seed=8).fingerprint() != step.fingerprint()
    # n_shots=0 is zero-shot: the examples do not count
    zero = TaskClassifier(backend=spec(fault), examples=EXAMPLES, n_shots=0)
    assert zero.fingerprint() == TaskClassifier(backend=spec(fault)).fingerprint()
    # all examples when n_shots is None, from a list as from a file
    assert len(TaskClassifier(backend=spec(fault), examples=EXAMPLES)._shots(load_taxonomy())) == len(EXAMPLES)


def test_bad_examples_are_named_by_file_row_and_field(tmp_path: Path) -> None:
    backend = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    bad = shots_file(tmp_path, [*EXAMPLES[:2], {"instruction": "Bake bread.", "task": "cooking"}])
    with pytest.raises(ConfigError, match=rf"{bad}, row 2, field 'task': 'cooking' is not a kind of the taxonomy"):
        TaskClassifier(backend=backend, examples=bad).check()
    with pytest.raises(ConfigError, match=r"examples, row 0, field 'instruction': expected a non-empty string"):
        TaskClassifier(backend=backend, examples=[{"instruction": "", "task": "open_qa"}]).check()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "task": "open_qa"}\n{"instruction": \n')
    with pytest.raises(ConfigError, match=rf"examples {broken}, line 2: not valid JSON"):
        TaskClassifier(backend=backend, examples=broken).check()
    with pytest.raises(ConfigError, match="n_shots=2 but no examples"):
        TaskClassifier(backend=backend, n_shots=2).check()
    with pytest.raises(ConfigError, match="unknown language 'fr'"):
        TaskClassifier(backend=backend, language="fr").check()
    with pytest.raises(ConfigError, match=r"prompts has no template 'judge'; valid: \['classify'"):
        TaskClassifier(backend=backend, prompts={"judge": str(bad)}).check()


def test_fingerprint_follows_taxonomy_content_not_its_path(tmp_path: Path) -> None:
    backend = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    copy = tmp_path / "tasks.json"
    copy.write_text(shipped_path("en").read_text(encoding="utf-8"), encoding="utf-8")
    base = TaskClassifier(backend=backend)
    assert TaskClassifier(backend=backend, taxonomy=copy).fingerprint() == base.fingerprint()
    extended = TaskClassifier(backend=backend, extend={"chitchat": {"description": "Small talk.", "keep": True}})
    assert extended.fingerprint() != base.fingerprint()
    assert TaskClassifier(backend=backend, language="zh").fingerprint() != base.fingerprint()
    assert base.clone(batch_size=7, max_concurrency=3).fingerprint() == base.fingerprint()


def test_extended_kinds_are_offered_and_failed_requests_fail_their_row(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match="Request", json={"task": "chitchat"})])
    step = TaskClassifier(backend=spec(fault, max_retries=1), extend={"chitchat": {"description": "Small talk.",
                                                                                 "keep": True}})  # fmt: skip
    res = step.apply(rows("hi there", "[[fail]] hello"))
    assert res.output.column("task").to_pylist() == ["chitchat"]
    assert "chitchat" in fault.stats()["bodies"][0]["response_format"]["json_schema"]["schema"]["properties"]["task"]["enum"]
    (err,) = res.failed.column("error").to_pylist()
    assert err.startswith("row id='r1':") and res.rows_in == res.rows_out + res.rows_failed
