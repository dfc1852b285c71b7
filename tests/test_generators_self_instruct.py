"""SelfInstruct: the bootstrapping of the paper against a scripted server whose every answer is known (pool growth,
each post-filter, the similarity filter, classification and the two instance orders, the instance filters, Alpaca
mode, Chinese, accounting, resume in-process and after SIGKILL), and end to end with the real llama.cpp server."""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from llm_servers import kill_9_and_rerun

from thresher.errors import ConfigError
from thresher.filters.rouge import RougePool
from thresher.generators import SelfInstruct
from thresher.generators.self_instruct import OUTPUT_SCHEMA, SeedTask
from thresher.generators.task_filters import (
    filter_instances,
    length_units,
    parse_alpaca_reply,
    parse_input_first,
    parse_numbered_list,
    parse_output_first,
    task_rules,
)
from thresher.llms.testing import FaultServer, Rule
from thresher.pipelines import Pipeline
from thresher.pipelines.runner import open_run

pytestmark = pytest.mark.usefixtures("isolated_cache")

SEEDS = [
    "Name three rivers that flow through Germany.",
    "Convert the recipe quantities from cups to grams.",
    "Suggest a title for a blog post about urban gardening.",
    "Explain how a bicycle gear system works to a beginner.",
    "Tell whether the review below is positive or negative.",
    "Summarize the meeting notes in three bullet points.",
    "Write a limerick about a forgetful octopus.",
    "List five questions to ask before adopting a dog.",
]
GEN = r"numbered \d+ to 15"  # the English continue-the-list request
CLF_NO = Rule(match=r"Classification task\?\s*$", reply="No", name="clf")
INPUT_FIRST = r"first an input that fits the task"
OUTPUT_FIRST = r"Write the label first"
TWO_INSTANCES = "Example 1\nInput: 3 apples\nOutput: three apples\nExample 2\nInput: 4 pears\nOutput: four pears"


def backend(server: FaultServer, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "max_retries": 0, **kw}


def make(server: FaultServer, **kw: Any) -> SelfInstruct:
    params: dict[str, Any] = {"seed_tasks": SEEDS, "requests_per_batch": 1, "num_instructions": 1, "max_requests": 1}
    params.update(kw)
    return SelfInstruct(backend=backend(server), **params)


def by_filter(rejected: pa.Table) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rejected.to_pylist():
        out.setdefault(row["filter"], []).append(row)
    return out


def gen_prompts(server: FaultServer) -> list[str]:
    return [p for p in server.stats()["per_prompt"] if "numbered 9 to 15" in p or "第 9 到第 15" in p]


# ---- the text rules on their own ----------------------------------------------------------------------------


def test_blacklist_is_whole_words_with_plurals_and_alpaca_adds_its_own() -> None:
    si, alpaca = task_rules("en", "self_instruct"), task_rules("en", "alpaca")
    assert si.check("Describe the maps of the old city in detail.") == (
        "blacklist", "instruction names 'maps', which a text model cannot handle (blacklist)")
    assert si.check("Explain what data mapping means in databases.") is None  # "map" only as a whole word
    assert si.check("Tell me how to GO TO the station from the airport.")[0] == "blacklist"
    assert si.check("Recommend a short video about the history of tea.") is None
    assert alpaca.check("Recommend a short video about the history of tea.")[0] == "blacklist"
    assert alpaca.check("Turn the process below into a flowchart description.")[0] == "blacklist"
    assert si.check("write a program that sorts a list of names.")[0] == "write_a_program"
    assert si.check("Three words only") == ("length", "instruction has 3 words (<= 3)")
    assert si.check(" ".join(["word"] * 151)) == ("length", "instruction has 151 words (> 150)")
    assert si.check(" ".join(["word"] * 150)) is None
    assert si.check("¿Qué hora es en Madrid ahora mismo?")[0] == "punctuation"  # Unicode punctuation too
    assert si.check("Élaborer une liste de courses pour la semaine.")[0] == "non_ascii"


def test_chinese_rules_count_characters_and_skip_the_ascii_rule() -> None:
    zh = task_rules("zh", "self_instruct")
    assert length_units("用Python写一个排序函数", "zh") == 9  # "Python" counts once, each CJK character once
    assert zh.check("写诗。") == ("length", "instruction has 2 characters (<= 3)")
    assert zh.check("为这家面包店写一句广告语。") is None  # starts with a CJK character: allowed in Chinese
    assert zh.check("“请”把这句话翻译成英文。")[0] == "punctuation"
    assert zh.check("请绘制一张公司组织结构的说明。")[0] == "blacklist"
    assert zh.check("编写一个程序来计算平均分。")[0] == "write_a_program"
    assert zh.check("推荐一段学习做菜的视频。") is None
    assert task_rules("zh", "alpaca").check("推荐一段学习做菜的视频。")[0] == "blacklist"


def test_reading_replies() -> None:
    reply = "Sure! Here are more tasks:\n9. Plan a picnic menu\n   for six people.\n10、Name a fruit that is red.\n\n11) Find 2.5% of 80.\n12."
    assert parse_numbered_list(reply) == ["Plan a picnic menu for six people.", "Name a fruit that is red.", "Find 2.5% of 80."]
    assert parse_input_first("Example 1\nInput: a\nOutput: b\nExample 2\nOutput: c\nInput: d\nTask: New task\nExample 1\nInput: x\nOutput: y") == [
        ("a", "b"), ("", "c")]  # fmt: skip
    assert parse_input_first("Input: <noinput>\nOutput: done") == [("", "done")]
    assert parse_input_first("No examples here.") == []
    assert parse_output_first("Labels:\nClass label: Yes\nInput: 13\nClass label: No\n21") == [("13", "Yes"), ("21", "No")]
    assert parse_output_first("类别标签：正面\n输入：太好吃了！") == [("太好吃了！", "正面")]
    items = parse_alpaca_reply("intro\n###\n1. Instruction: A b c d.\n1. Input:\n<noinput>\n1. Output:\nyes\n###\n"
                               "指令：甲乙丙丁\n输出：戊\n###")  # fmt: skip
    assert [(i.instruction, i.input, i.output, i.problem) for i in items] == [
        ("A b c d.", "", "yes", None), ("甲乙丙丁", "", "", "fields ['instruction', 'output'], not [instruction, input, output]")]


def test_instance_filters_in_the_reference_order() -> None:
    rng = random.Random(0)
    got = filter_instances([("a", "a"), ("b", ""), ("c:", "x"), ("d", "y"), ("d", "y"), ("e", "z"), ("f", "w"), ("g", "v")],
                           cut_off=True, max_instances=2, rng=rng)  # fmt: skip
    rules = Counter(d[2] for d in got.dropped)
    assert rules == {"instance_cut_off": 1, "instance_same_as_input": 1, "instance_empty_output": 1,
                     "instance_dangling_colon": 1, "instance_duplicate": 1, "instance_over_limit": 1}  # fmt: skip
    assert len(got.kept) == 2 and set(got.kept) < {("d", "y"), ("e", "z"), ("f", "w")}
    conflict = filter_instances([("", "p"), ("", "q"), ("k", "1"), ("k", "2")], cut_off=False, max_instances=5, rng=rng)
    assert conflict.kept == [] and {d[2] for d in conflict.dropped} == {"instance_conflict"}
    # an empty input may have many outputs (a task without input), as the reference code allows
    assert len(filter_instances([("", "p"), ("", "q")], cut_off=False, max_instances=5, rng=rng).kept) == 2


# ---- seeds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "zh"])
def test_shipped_seeds_are_thirty_diverse_tasks_with_instances(language: str) -> None:
    step = SelfInstruct(language=language)
    seeds = step._seeds()
    assert len(seeds) >= 30 and len({s.id for s in seeds}) == len(seeds)
    assert all(s.instances and all(out for _, out in s.instances) for s in seeds)
    assert {s.is_classification for s in seeds} == {True, False}
    rules = task_rules(language, "alpaca")
    assert [s.instruction for s in seeds if rules.check(s.instruction)] == []
    pool = RougePool(tokenizer="cjk" if language == "zh" else "rouge_score")
    for s in seeds:  # diverse: no seed is a near-copy of another
        assert not len(pool) or pool.nearest(s.instruction)[0] <= 0.7, s.instruction
        pool.add(s.instruction)


def test_seed_tasks_from_a_file_in_any_layout_or_a_list(tmp_path: Path) -> None:
    si = tmp_path / "seeds.jsonl"
    si.write_text(json.dumps({"id": "t1", "name": "n", "instruction": "Name a colour.", "is_classification": False,
                              "instances": [{"input": "", "output": "Red"}, {"input": "", "output": "Blue"}]}) + "\n")  # fmt: skip
    (got,) = SelfInstruct(seed_tasks=str(si))._seeds()
    assert got == SeedTask("t1", "Name a colour.", (("", "Red"), ("", "Blue")), False)
    alpaca = tmp_path / "seeds.json"
    alpaca.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
                                  {"instruction": "Add the numbers.", "input": "2 2", "output": "4"},
                                  {"instruction": "Greet me.", "input": "", "output": "Hello!"}]))  # fmt: skip
    seeds = SelfInstruct(seed_tasks=str(alpaca))._seeds()
    assert [(s.instruction, s.instances) for s in seeds] == [
        ("Add the numbers.", (("1 2", "3"), ("2 2", "4"))), ("Greet me.", (("", "Hello!"),))]
    inline = SelfInstruct(seed_tasks=["Say hi.", {"instruction": "Count.", "input": "a b", "output": "2"}])._seeds()
    assert [s.instances for s in inline] == [(), (("a b", "2"),)]
    with pytest.raises(ConfigError, match="does not exist"):
        SelfInstruct(seed_tasks=str(tmp_path / "nope.jsonl"))._seeds()
    with pytest.raises(ConfigError, match="holds no seed task"):
        SelfInstruct(seed_tasks=[])._seeds()
    with pytest.raises(ConfigError, match="alpaca mode shows each seed task with an instance"):
        SelfInstruct(seed_tasks=["Say hi."], mode="alpaca")._seeds()


def test_check_names_bad_parameters_and_templates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode 'evol' is not one of"):
        SelfInstruct(mode="evol").check()
    with pytest.raises(ConfigError, match="language 'fr'"):
        SelfInstruct(language="fr").check()
    with pytest.raises(ConfigError, match="num_instructions must be a positive integer"):
        SelfInstruct(num_instructions=0).check()
    with pytest.raises(ConfigError, match="no template 'generate_tasks'"):
        SelfInstruct(prompts={"generate_tasks": __file__}).check()
    holey = tmp_path / "list.txt"
    holey.write_text("Continue this list:\n$tasks\n")
    with pytest.raises(ConfigError, match=r"has no placeholder for \['first', 'last'\]"):
        SelfInstruct(prompts={"continue_list": str(holey)}).check()


def test_fingerprint_follows_seed_and_prompt_content_not_paths(tmp_path: Path) -> None:
    seeds = tmp_path / "a" / "seeds.jsonl"
    seeds.parent.mkdir()
    seeds.write_text(json.dumps({"instruction": "Name a colour.", "instances": [{"input": "", "output": "Red"}]}) + "\n")
    moved = tmp_path / "b" / "seeds.jsonl"  # another folder: the name and content count, not where it lies
    moved.parent.mkdir()
    moved.write_text(seeds.read_text())
    a = SelfInstruct(seed_tasks=str(seeds))
    assert a.fingerprint() == SelfInstruct(seed_tasks=str(moved)).fingerprint()
    assert a.fingerprint() == a.clone(max_concurrency=3, cache=False, progress=True).fingerprint()
    assert a.fingerprint() != a.clone(requests_per_batch=2).fingerprint()
    seeds.write_text(seeds.read_text().replace("Red", "Green"))
    assert a.fingerprint() != SelfInstruct(seed_tasks=str(moved)).fingerprint()
    mine = tmp_path / "clf.txt"
    mine.write_text("Is this a classification task? $instruction\n")
    assert a.clone(prompts={"is_classification": str(mine)}).fingerprint() != a.fingerprint()
    assert SelfInstruct(language="zh").fingerprint() != SelfInstruct().fingerprint()


# ---- the method against a scripted server -------------------------------------------------------------------


def test_every_post_filter_and_the_similarity_filter_explain_their_rejections(fault: FaultServer) -> None:
    reply = "\n".join([
        "9. Write a haiku about autumn leaves in the park.",
        "10. Hi there.",
        "11. Describe the image below in one detailed sentence.",
        "12. Write a program that prints the first ten primes.",
        '13. "Quote" this sentence back with proper punctuation.',
        "14. Écrivez une phrase sur le printemps en français.",
        "15. Write a haiku about autumn leaves in the park today.",
    ])  # fmt: skip
    fault.configure(script=[CLF_NO, Rule(match=INPUT_FIRST, reply=TWO_INSTANCES), Rule(match=GEN, reply=reply)])
    step = make(fault)
    res = step.apply()
    assert res.output.column("instruction").to_pylist() == ["Write a haiku about autumn leaves in the park."] * 2
    rejected = by_filter(res.rejected)
    assert {k: [r["instruction"] for r in v] for k, v in rejected.items()} == {
        "length": ["Hi there."],
        "blacklist": ["Describe the image below in one detailed sentence."],
        "write_a_program": ["Write a program that prints the first ten primes."],
        "punctuation": ['"Quote" this sentence back with proper punctuation.'],
        "non_ascii": ["Écrivez une phrase sur le printemps en français."],
        "similarity": ["Write a haiku about autumn leaves in the park today."],
    }
    assert rejected["blacklist"][0]["reason"] == "instruction names 'image', which a text model cannot handle (blacklist)"
    sim = rejected["similarity"][0]
    # the accepted item 0 joined the pool at once, so item 6 of the same reply is measured against it
    assert sim["rouge_l_nearest"] == "Write a haiku about autumn leaves in the park."
    assert sim["rouge_l_max"] == pytest.approx(2 * 9 / (9 + 10))
    assert sim["reason"].startswith("ROUGE-L F1 0.9474 > 0.7 with pool instruction 'Write a haiku about autumn")
    assert all(r["request"] == 0 and len(r["demonstrations"]) == 8 for r in res.rejected.to_pylist())
    assert [r["item"] for r in res.rejected.to_pylist()] == [1, 2, 3, 4, 5, 6]
    counts = step.metrics()["counts"]
    assert counts == {"requests": 1, "items": 7, "length": 1, "blacklist": 1, "write_a_program": 1, "punctuation": 1,
                      "non_ascii": 1, "similarity": 1, "passed": 1, "classification": 0, "accepted": 1, "rows": 2}  # fmt: skip


def test_a_cut_off_reply_loses_every_task_and_a_reply_without_tasks_is_kept_for_inspection(fault: FaultServer) -> None:
    fault.configure(script=[Rule(match=GEN, reply={"text": "9. Plan a trip to the seaside for a family of four.\n"
                                                          "10. Name the planets in order from", "finish_reason": "length"})])  # fmt: skip
    res = make(fault).apply()
    assert res.rows_out == 0
    assert [(r["filter"], r["instruction"]) for r in res.rejected.to_pylist()] == [
        ("cut_off", "Plan a trip to the seaside for a family of four."), ("cut_off", "Name the planets in order from")]
    assert res.rejected.column("reason")[0].as_py() == "the reply was cut off by the length limit; all its tasks are dropped"
    fault.configure(script=[Rule(match=GEN, reply="I would rather not make up tasks today.")])
    res = make(fault, cache=False).apply()
    (row,) = res.rejected.to_pylist()
    assert row["filter"] == "unparsable" and row["instruction"] is None
    assert row["reply"] == "I would rather not make up tasks today." and row["reason"].startswith("request 0: no task")


def test_the_pool_grows_exactly_and_requests_show_machine_tasks_once_there_are_some(fault: FaultServer) -> None:
    first = ("9. Sort the recycling into paper, glass and plastic bins.\n10. Name the capital city of each country "
             "listed.\n11. Name the capital city of every country listed.")  # fmt: skip
    second = "9. Translate the greeting into Spanish and French.\n10. Sort the recycling into paper, glass and plastic bins."
    fault.configure(script=[
        CLF_NO, Rule(match=INPUT_FIRST, reply=TWO_INSTANCES),
        Rule(match=r"(?s)Sort the recycling.*" + GEN, reply=second, name="second"),  # shown the machine tasks
        Rule(match=GEN, reply=first, name="first"),
    ])  # fmt: skip
    step = make(fault, num_instructions=3, max_requests=5)
    res = step.apply()
    tasks = list(dict.fromkeys(res.output.column("instruction").to_pylist()))
    assert tasks == ["Sort the recycling into paper, glass and plastic bins.", "Name the capital city of each country "
                     "listed.", "Translate the greeting into Spanish and French."]  # fmt: skip
    assert res.rows_out == 6 and step.metrics()["counts"]["requests"] == 2  # stopped once 3 tasks had rows
    rej = res.rejected.to_pylist()
    assert [(r["request"], r["item"], r["rouge_l_nearest"], round(r["rouge_l_max"], 4)) for r in rej] == [
        (0, 2, "Name the capital city of each country listed.", 0.875),  # joined the pool within its batch
        (1, 1, "Sort the recycling into paper, glass and plastic bins.", 1.0),  # from an earlier batch
    ]
    out = res.output.to_pylist()
    seed_ids = {s.id for s in step._seeds()}
    machine_ids = {out[0]["task_id"], out[2]["task_id"]}
    assert set(out[0]["demonstrations"]) == seed_ids  # no machine task yet: all 8 shown are seeds
    shown = out[4]["demonstrations"]
    assert len(shown) == 8 and set(shown) & machine_ids == machine_ids and len(set(shown) & seed_ids) == 6
    prompts = gen_prompts(fault)
    assert len(prompts) == 2 and all(p.count("\n") >= 8 for p in prompts)
    assert "Sort the recycling into paper, glass and plastic bins." in prompts[1]
    assert fault.stats()["script"]["hits"] == {"clf": 3, INPUT_FIRST: 3, "second": 1, "first": 1}
    # rows: alpaca layout plus lineage; a task's instances share its task_id; ids are content hashes
    assert res.output.schema == OUTPUT_SCHEMA
    assert out[0]["input"] == "3 apples" and out[0]["output"] == "three apples" and out[0]["source"] == "self_instruct"
    assert out[0]["task_id"] == out[1]["task_id"] and len({r["id"] for r in out}) == 6
    assert all(r["parent_id"] is None and r["is_classification"] is False for r in out)


def test_classification_tasks_get_output_first_instances_the_rest_input_first(fault: FaultServer) -> None:
    fault.configure(script=[
        Rule(match=r"Task: Decide whether the headline[^\n]*\nClassification task\?\s*$", reply="Yes", name="yes"),
        CLF_NO,
        Rule(match=OUTPUT_FIRST, reply="Class label: Sports\nInput: The striker scored twice in the final.\n"
                                       "Class label: Politics\nInput: Parliament passed the budget on Tuesday.",
             name="output_first"),
        Rule(match=INPUT_FIRST, reply=TWO_INSTANCES, name="input_first"),
        Rule(match=GEN, reply="9. Decide whether the headline below is about sports or politics.\n"
                              "10. Describe your ideal weekend in four sentences."),
    ])  # fmt: skip
    step = make(fault, num_instructions=2)
    res = step.apply()
    rows = [(r["instruction"][:20], r["is_classification"], r["input"], r["output"]) for r in res.output.to_pylist()]
    assert rows == [
        ("Decide whether the h", True, "The striker scored twice in the final.", "Sports"),
        ("Decide whether the h", True, "Parliament passed the budget on Tuesday.", "Politics"),
        ("Describe your ideal ", False, "3 apples", "three apples"),
        ("Describe your ideal ", False, "4 pears", "four pears"),
    ]
    hits = fault.stats()["script"]["hits"]
    assert hits["yes"] == 1 and hits["clf"] == 1 and hits["output_first"] == 1 and hits["input_first"] == 1
    assert step.metrics()["counts"]["classification"] == 1


def test_instance_filters_drop_instances_and_tasks_and_a_dropped_task_leaves_the_pool(fault: FaultServer) -> None:
    opposites = "\n".join([
        "Example 1", "Input: hot", "Output: cold",
        "Example 2", "Input: same", "Output: same",
        "Example 3", "Input: up", "Output:",
        "Example 4", "Input: The word is:", "Output: tall",
        "Example 5", "Input: hot", "Output: cold",
        "Example 6", "Input: big", "Output: small",
        "Example 7", "Input: fast", "Output: slow",
        "Example 8", "Input: early", "Output: la",
    ])  # fmt: skip
    fault.configure(script=[
        CLF_NO,
        Rule(match=r"(?m)^Task: Give an example of a word", reply={"text": opposites, "finish_reason": "length"}),
        Rule(match=r"(?m)^Task: Pair each country", reply="Example 1\nInput: Brazil\nOutput: Portuguese\n"
                                                           "Example 2\nInput: Brazil\nOutput: Spanish"),
        Rule(match=r"(?m)^Task: Describe a quiet morning", reply="I am not sure what to write."),
        Rule(match=GEN, reply="9. Give an example of a word and its opposite meaning.\n"
                              "10. Pair each country with the language most people speak there.\n"
                              "11. Describe a quiet morning in a small fishing village."),
    ])  # fmt: skip
    step = make(fault, num_instructions=2, max_requests=2, max_instances=2)
    res = step.apply()
    out = res.output.to_pylist()
    assert len(out) == 2 and {r["instruction"] for r in out} == {"Give an example of a word and its opposite meaning."}
    assert {(r["input"], r["output"]) for r in out} < {("hot", "cold"), ("big", "small"), ("fast", "slow")}
    rej = by_filter(res.rejected)
    assert [(r["input"], r["output"]) for r in rej["instance_cut_off"]] == [("early", "la")]
    assert [(r["input"], r["output"]) for r in rej["instance_same_as_input"]] == [("same", "same")]
    assert [r["output"] for r in rej["instance_empty_output"]] == [""]
    assert [r["reason"] for r in rej["instance_dangling_colon"]] == ["instance: the input ends with a dangling ':'"]
    assert len(rej["instance_duplicate"]) == 1 and len(rej["instance_over_limit"]) == 1
    assert rej["instance_over_limit"][0]["reason"] == "instance: over the limit of 2 per task"
    # the country task conflicts (one input, two outputs): dropped, it leaves the pool with its batch, so request 1
    # proposes it again and it passes the similarity filter again instead of being rejected as a copy
    conflict = rej["instance_conflict"]
    assert [(r["request"], r["input"]) for r in conflict] == [(0, "Brazil"), (0, "Brazil"), (1, "Brazil"), (1, "Brazil")]
    assert [(r["request"], r["instruction"][:20]) for r in rej["no_instances"]] == [
        (0, "Describe a quiet mor"), (1, "Describe a quiet mor")]
    assert rej["no_instances"][0]["reply"] == "I am not sure what to write."
    # the opposites task stayed in the pool: request 1's copy of it is a similarity rejection
    assert [(r["request"], r["rouge_l_max"]) for r in rej["similarity"]] == [(1, 1.0)]
    counts = step.metrics()["counts"]
    assert counts["accepted"] == 1 and counts["tasks_dropped"] == 4 and counts["passed"] == 5


def test_failed_requests_fail_their_candidates_with_the_stage(fault: FaultServer) -> None:
    res = make(fault, seed_tasks=["[[fail]] Tell a story about a lighthouse keeper."], max_requests=2).apply()
    assert res.rows_out == 0 and res.rejected.num_rows == 0
    assert res.failed.column("stage").to_pylist() == ["generate", "generate"]
    assert res.failed.column("request").to_pylist() == [0, 1]
    assert all("request" in e and "500" in e for e in res.failed.column("error").to_pylist())
    fault.configure(script=[CLF_NO, Rule(match=INPUT_FIRST, reply=TWO_INSTANCES),
                            Rule(match=GEN, reply="9. Explain what the marker [[fail]] means in a server log.\n"
                                                  "10. Plan a vegetable garden for a small balcony.")])  # fmt: skip
    step = make(fault, num_instructions=1)
    res = step.apply()
    assert res.failed.column("stage").to_pylist() == ["classify"]
    assert res.failed.column("instruction").to_pylist() == ["Explain what the marker [[fail]] means in a server log."]
    assert set(res.output.column("instruction").to_pylist()) == {"Plan a vegetable garden for a small balcony."}
    assert step.metrics()["counts"]["tasks_failed"] == 1


ALPACA_REPLY = """###
1. Instruction: Give a synonym for the word.
1. Input:
happy
1. Output:
joyful
###
2. Instruction: Name the largest planet in the solar system.
2. Input:
<noinput>
2. Output:
Jupiter
###
3. Instruction: Recommend a video for learning to juggle quickly.
3. Input:
<noinput>
3. Output:
Search for beginner juggling lessons.
###
4. Instruction: Explain photosynthesis briefly to a child.
4. Output:
Plants make their food from light.
###
5. Instruction: Count the vowels in the given word.
5. Input:
banana
5. Output:
"""


def test_alpaca_mode_reads_tasks_with_their_instances_from_one_reply(fault: FaultServer) -> None:
    seeds = [{"instruction": s, "input": "", "output": f"answer {k}"} for k, s in enumerate(SEEDS)]
    fault.configure(script=[Rule(match=r"write 20 new tasks", reply={"text": ALPACA_REPLY, "finish_reason": "length"})])
    step = make(fault, mode="alpaca", seed_tasks=seeds)
    res = step.apply()
    assert [(r["instruction"], r["input"], r["output"], r["is_classification"], r["source"])
            for r in res.output.to_pylist()] == [
        ("Give a synonym for the word.", "happy", "joyful", None, "alpaca"),
        ("Name the largest planet in the solar system.", "", "Jupiter", None, "alpaca"),
    ]  # fmt: skip
    assert [(r["item"], r["filter"]) for r in res.rejected.to_pylist()] == [
        (2, "blacklist"), (3, "unparsable"), (4, "cut_off")]  # video: Alpaca's longer blacklist; only the last is cut
    assert all(len(r["demonstrations"]) == 3 for r in res.output.to_pylist())
    (prompt,) = fault.stats()["per_prompt"]
    assert prompt.count("###\nInstruction: ") == 3 and "Output: answer" in prompt
    assert fault.stats()["total"] == 1  # no classification or instance requests


ZH_SEEDS = ["写一首关于秋天的短诗。", "把这段话翻译成英文。", "列出三种常见的水果。", "解释什么是光合作用。",
            "判断这条评论是正面还是负面。", "为新开的书店想一个名字。", "总结这篇文章的主要观点。", "计算这组数的平均值。"]  # fmt: skip


def test_chinese_mode_uses_chinese_prompts_rules_and_character_rouge(fault: FaultServer) -> None:
    reply = "\n".join([
        "9、为一家新开的咖啡馆写一段开业宣传语。",
        "10. 你好。",
        "11. 绘制一张公司组织结构的说明。",
        "12. “引号”开头的任务要改写。",
        "13. 用三句话介绍长城的历史。",
        "14. 为一家新开的咖啡馆写一段开业的宣传语。",
    ])  # fmt: skip
    fault.configure(script=[
        Rule(match=r"是否分类任务？\s*$", reply="否", name="clf"),
        Rule(match=r"为下面的任务写出完成示例", reply="示例 1\n输入：拿铁\n输出：一杯拿铁，开启美好的一天。\n示例 2\n输入：\n输出：欢迎光临！",
             name="input_first"),
        Rule(match=r"写出第 9 到第 15 个新任务", reply=reply, name="gen"),
    ])  # fmt: skip
    step = make(fault, language="zh", seed_tasks=ZH_SEEDS, num_instructions=2)
    res = step.apply()
    tasks = list(dict.fromkeys(res.output.column("instruction").to_pylist()))
    assert tasks == ["为一家新开的咖啡馆写一段开业宣传语。", "用三句话介绍长城的历史。"]  # no ASCII rule in Chinese
    assert res.output.to_pylist()[0]["input"] == "拿铁" and res.output.to_pylist()[1]["input"] == ""
    rej = {r["filter"]: r for r in res.rejected.to_pylist()}
    assert set(rej) == {"length", "blacklist", "punctuation", "similarity"}
    assert rej["length"]["reason"] == "instruction has 2 characters (<= 3)"
    assert rej["similarity"]["rouge_l_nearest"] == "为一家新开的咖啡馆写一段开业宣传语。"
    assert rej["similarity"]["rouge_l_max"] > 0.9  # rouge_score's own tokenizer would have given 0
    (prompt,) = gen_prompts(fault)  # the Chinese template, showing the Chinese seeds as a numbered list
    assert "写出第 9 到第 15 个新任务" in prompt and all(f". {s}" in prompt for s in ZH_SEEDS)
    assert fault.stats()["script"]["hits"] == {"clf": 2, "input_first": 2, "gen": 1}


# ---- accounting and resume --------------------------------------------------------------------------------------

WORDS = [f"w{k}" for k in range(400)]


def word_task_script(n_replies: int = 40, per_reply: int = 3) -> list[Rule]:
    """A script whose replies hold tasks of random made-up words (so they rarely resemble each other), one reply
    list picked by a hash of the conversation: requests that show different tasks get different replies."""
    rng = random.Random(7)
    replies = []
    for _ in range(n_replies):
        items = [f"{9 + j}. Describe {' '.join(rng.sample(WORDS, 7))} briefly." for j in range(per_reply)]
        replies.append("\n".join(items))
    return [CLF_NO, Rule(match=INPUT_FIRST, reply=TWO_INSTANCES), Rule(match=GEN, reply=replies, pick="hash")]


def grow(server: FaultServer, **kw: Any) -> Pipeline:
    pipe = Pipeline("grow")
    params: dict[str, Any] = {"seed_tasks": SEEDS, "requests_per_batch": 3, "num_instructions": 25, "seed": 4}
    params.update(kw)
    pipe.add(SelfInstruct(backend=backend(server, max_concurrency=8), **params), name="self_instruct")
    return pipe


def test_accounting_balances_batch_by_batch_and_state_holds_the_counts(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=word_task_script())
    result = grow(fault).run(tmp_path / "run", progress=False)
    rec = result.steps["self_instruct"]
    assert rec.candidates == rec.rows_out + rec.rows_rejected + rec.rows_failed
    out = result.table("self_instruct")
    assert len(set(out.column("task_id").to_pylist())) >= 25
    states = sorted((tmp_path / "run" / rec.dir / "state").glob("part-*.json"))
    last = json.loads(states[-1].read_text())["state"]
    assert last["requests"] == 3 * len(states)
    counts = last["counts"]
    assert counts["accepted"] == len(set(out.column("task_id").to_pylist())) and counts["rows"] == out.num_rows
    assert counts["items"] == counts["passed"] + counts.get("similarity", 0)  # every item is counted somewhere
    assert rec.metrics["counts"] == counts and rec.metrics["requests"] == fault.stats()["total"]


def test_a_crash_resumes_from_the_committed_pool_and_state(
    fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that dies in batch 2 is run again: it rebuilds the pool from the committed output, carries on with the
    committed request counter, ends with the rows of an unbroken run, and pays for no request twice."""
    fault.configure(script=word_task_script())
    reference = grow(fault).run(tmp_path / "ref", progress=False)
    total = fault.stats()["total"]
    fault.reset()
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "other-cache.sqlite"))  # the reference's answers stay apart
    real = SelfInstruct._instances
    seen: list[int] = []

    def crash_in_batch_2(self: SelfInstruct, accepted: Any, prompts: Any, batch: Any) -> None:
        seen.append(1)
        real(self, accepted, prompts, batch)
        if len(seen) == 3:
            raise RuntimeError("crash in batch 2, after its instance requests were answered")

    monkeypatch.setattr(SelfInstruct, "_instances", crash_in_batch_2)
    pipe = grow(fault)
    with pytest.raises(Exception, match="crash in batch 2"):
        pipe.run(tmp_path / "run", progress=False)
    result = pipe.run(tmp_path / "run", progress=False)
    rec = result.steps["self_instruct"]
    assert rec.resumed_from_batch == 2
    assert result.table("self_instruct").to_pylist() == reference.table("self_instruct").to_pylist()
    assert result.rejected("self_instruct").to_pylist() == reference.rejected("self_instruct").to_pylist()
    assert rec.candidates == reference.steps["self_instruct"].candidates
    assert fault.stats()["total"] == total  # batch 2's answers came from the request cache


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from thresher.generators import SelfInstruct
    from thresher.pipelines.dag import Pipeline

    base_url, work = sys.argv[1], Path(sys.argv[2])
    seeds = __SEEDS__
    backend = {"kind": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 8}
    pipe = Pipeline("kill9")
    pipe.add(SelfInstruct(backend=backend, seed_tasks=seeds, requests_per_batch=4, num_instructions=60, seed=9),
             name="self_instruct")
    pipe.run(work / "run", progress=False)
    """
)


def test_kill_9_mid_self_instruct_resends_at_most_max_concurrency(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    fault.configure(script=word_task_script(n_replies=80), latency=0.02)
    script = tmp_path / "grow.py"
    script.write_text(KILL_SCRIPT.replace("__SEEDS__", repr(SEEDS)))
    run = kill_9_and_rerun(fault, script, tmp_path, isolated_cache, "self_instruct")
    assert run.committed >= 1
    assert 0 <= run.resent <= 8  # max_concurrency
    got, want = open_run(tmp_path / "run"), open_run(tmp_path / "ref" / "run")
    assert got.table("self_instruct").to_pylist() == want.table("self_instruct").to_pylist()
    assert got.rejected("self_instruct").to_pylist() == want.rejected("self_instruct").to_pylist()
    assert got.steps["self_instruct"].candidates == want.steps["self_instruct"].candidates
    assert got.steps["self_instruct"].resumed_from_batch == run.committed


# ---- end to end with the bundled model ------------------------------------------------------------------------


def acceptance_report(counts: dict[str, int], language: str) -> str:
    """Instruction-level acceptance per filter: the share of the candidates reaching each filter that it rejects."""
    lines = [f"[{language}] {counts.get('requests', 0)} requests, {counts.get('items', 0)} proposed tasks"]
    left = counts.get("items", 0)
    for rule in ("cut_off", "length", "blacklist", "write_a_program", "punctuation", "non_ascii", "similarity"):
        n = counts.get(rule, 0)
        lines.append(f"  {rule:16s} rejected {n:3d} of {left:3d} ({100 * n / max(left, 1):5.1f}%)")
        left -= n
    dropped, failed = counts.get("tasks_dropped", 0), counts.get("tasks_failed", 0)
    lines.append(f"  instances        dropped {dropped:3d} of {left:3d} tasks ({100 * dropped / max(left, 1):5.1f}%), "
                 f"{failed} failed; accepted {counts.get('accepted', 0)} tasks, {counts.get('rows', 0)} rows; "
                 f"unreadable replies {counts.get('unparsable', 0)}")  # fmt: skip
    return "\n".join(lines)


# SmolLM2-135M writes little readable Chinese: in a measured run (see the closing note of issue 9) about one task in
# ten that passed the post-filters got a usable instance, so the Chinese run in the suite grows 8 tasks, not 20, to
# keep CI inside its budget. THRESHER_E2E_TASKS=20 runs both languages to 20 tasks.
E2E_TASKS = {"en": 20, "zh": 8}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # several minutes on an idle 2-core machine; shared, loaded machines take longer
@pytest.mark.parametrize("language", ["en", "zh"])
def test_end_to_end_with_the_bundled_model(llama_server: str, tmp_path: Path, language: str) -> None:
    """SelfInstruct grows tasks from the shipped seeds with SmolLM2-135M behind llama.cpp's OpenAI server,
    EvolInstruct runs 2 rounds on them, Respond answers the evolved rows. Every column is present, every rejected
    row names its filter and reason, each step's accounting balances; the acceptance rate per filter is printed."""
    from thresher.generators import EvolInstruct, Respond
    from thresher.generators.evol_instruct import RULES

    # sampling hotter than the reference's 0.7 / top_p 0.5, at which the 135M model mostly copies its demonstrations;
    # Chinese costs SmolLM2 two to three tokens a character, so its replies need larger budgets to end uncut
    zh = language == "zh"
    target = int(os.environ.get("THRESHER_E2E_TASKS") or E2E_TASKS[language])
    backend = {"kind": "openai", "base_url": llama_server, "model": "smollm2", "max_concurrency": 4, "timeout": 120}
    pipe = Pipeline(f"grow-{language}")
    pipe.add(SelfInstruct(
        backend=backend, language=language, num_instructions=target, requests_per_batch=4, max_requests=8 * target,
        max_tokens=400 if zh else 200, instance_max_tokens=192 if zh else 64, temperature=1.0, top_p=0.95,
    ), name="self_instruct")  # fmt: skip
    pipe.add(EvolInstruct(backend=backend, language=language, rounds=2, max_tokens=96 if zh else 48,
                          answer_max_tokens=80 if zh else 40, batch_size=32), name="evol", after=["self_instruct"])  # fmt: skip
    pipe.add(Respond(backend=backend, max_tokens=64 if zh else 32), name="answer", after=["evol"])
    t0 = time.perf_counter()
    result = pipe.run(tmp_path / "run", progress=False)
    seconds = time.perf_counter() - t0
    rec = result.steps["self_instruct"]
    counts = rec.metrics["counts"]
    out = result.table("self_instruct")
    assert out.schema == OUTPUT_SCHEMA
    tasks = len(set(out.column("task_id").to_pylist()))
    assert tasks >= target
    assert all(out.column(c).null_count == 0 for c in ("id", "instruction", "input", "output", "demonstrations"))
    rejected = result.rejected("self_instruct")
    assert all(rejected.column("reason").to_pylist()) and all(rejected.column("filter").to_pylist())
    assert rec.candidates == rec.rows_out + rec.rows_rejected + rec.rows_failed
    # EvolInstruct: each row evolved twice; rounds, operations and parents say where each row came from (an evolved
    # row is a new task: it keeps its parent's id, not the parent's Self-Instruct lineage)
    evol = result.steps["evol"]
    evolved, evol_rejected = result.table("evol"), result.rejected("evol")
    assert evol.candidates == 2 * out.num_rows == evol.rows_out + evol.rows_rejected + evol.rows_failed
    for column in ("parent_id", "evol_round", "evol_operation"):
        assert column in evolved.column_names and column in evol_rejected.column_names
    parents = set(out.column("id").to_pylist()) | set(evolved.column("id").to_pylist())
    assert set(evolved.column("parent_id").to_pylist()) <= parents
    evol_reasons = evol_rejected.column("reason").to_pylist()
    assert all(r.split(":", 1)[0] in RULES for r in evol_reasons)
    answered = result.steps["answer"]
    assert answered.rows_in == evolved.num_rows == answered.rows_out + answered.rows_failed
    if answered.rows_out:
        assert result.table("answer").column("output").null_count == 0
    print(f"\n{seconds:.0f} s in all\n" + acceptance_report(counts, language))
    rules = Counter(r.split(":", 1)[0] for r in evol_reasons)
    print(f"  EvolInstruct: {evolved.num_rows} of {evol.candidates} evolutions accepted; rejected by "
          f"{dict(rules)}; {evol.rows_failed} failed; Respond answered {answered.rows_out}")
