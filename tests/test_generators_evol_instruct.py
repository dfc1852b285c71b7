"""EvolInstruct: each operation's prompt, every elimination rule on a crafted reply, failed rows back unchanged in
the next round, lineage, Chinese mode, accounting, resume (in-process and after SIGKILL), and an end-to-end run on
the real llama.cpp server followed by Respond."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from llm_servers import kill_9_and_rerun

from thresher.errors import ConfigError, StepError
from thresher.generators import EvolInstruct, Respond
from thresher.generators.evol_instruct import (
    DATA_FORMATS,
    OPERATIONS,
    RULES,
    equality_verdict,
    is_refusal,
    latest_versions,
    only_stop_words,
    prompt_markers,
    text_length,
)
from thresher.llms.testing import FaultServer, Rule
from thresher.pipelines import Pipeline
from thresher.pipelines.runner import open_run

pytestmark = pytest.mark.usefixtures("isolated_cache")

#: what the scripted evolver appends for each operation, found by a phrase of that operation's template
EN_OPS = {
    "add_constraints": ("one more constraint", "+constraints"),
    "deepen": ("widen and deepen", "+deeper"),
    "concretize": ("general concepts", "+concrete"),
    "increase_reasoning": ("reasoning in several steps", "+steps"),
    "complicate_input": ("as input data the task", "+data"),
    "in_breadth": ("#Created Prompt#", "+breadth"),
}
ZH_OPS = {
    "add_constraints": ("再加一项约束", "+约束"),
    "deepen": ("加深、拓宽", "+加深"),
    "concretize": ("更具体的概念", "+具体"),
    "increase_reasoning": ("多步推理", "+推理"),
    "complicate_input": ("作为任务必须处理的输入数据", "+数据"),
    "in_breadth": ("#新提示#", "+新题"),
}
LONG_ANSWER = "A full answer that walks through the task, names what matters and ends with a clear result."


def en_script() -> list[Rule]:
    given = r"#Given Prompt#:\n(.*?)\n\n#(?:Rewritten|Created) Prompt#:"
    tagged = r"(?s)#Given Prompt#:\n([^\n]*\[{}\][^\n]*)\n\n#"
    return [
        # the evolver, crafted replies first
        Rule(match=tagged.format("copy"), reply=r"Rewritten Prompt: \1", name="copy"),
        Rule(match=tagged.format("empty"), reply="  ", name="empty"),
        Rule(match=tagged.format("long"), reply=r"\1 and then", finish_reason="length", name="long"),
        Rule(match=tagged.format("same"), reply=r"\1", name="same"),
        *(Rule(match=rf"(?s){key}.*{given}", reply=rf"\1 {suffix}", name=op) for op, (key, suffix) in EN_OPS.items()),
        # the equality question
        Rule(match=r"(?s)Compare the two instructions.*Second instruction:\n[^\n]*\[equal\]", reply="Equal", name="eq"),
        Rule(match=r"(?s)Compare the two instructions.*Second instruction:\n[^\n]*\[unclear\]", reply="Hmm.",
             name="unclear"),
        Rule(match="Compare the two instructions", reply="Not Equal", name="not_eq"),
        # the answers
        Rule(match=r"\[sorry\]", role="last_user", reply="Sorry, I cannot help with that.", name="sorry"),
        Rule(match=r"\[longsorry\]", role="last_user", reply="Sorry for the wait! " + "word " * 80, name="longsorry"),
        Rule(match=r"\[stop\]", role="last_user", reply="It is what it is, and that is that!", name="stop"),
        Rule(match=r"\[flaky\].*\+constraints", role="last_user", reply="Sorry, no.", name="flaky"),
        Rule(match=r"\+", role="last_user", reply=LONG_ANSWER, name="answer"),
    ]


def spec(server: FaultServer, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "retry_base_delay": 0.01,
            "max_retries": 1, **kw}


def rows(*instructions: str, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "instruction": t, "input": "", "output": "seed answer"}
            for i, t in enumerate(instructions)]


def rule_of(reason: str) -> str:
    return reason.split(":", 1)[0]


def test_each_operation_sends_its_own_prompt(fault: FaultServer) -> None:
    fault.configure(script=en_script())
    data = rows(*(f"Name {i} rivers." for i in range(30)))
    res = EvolInstruct(backend=spec(fault), rounds=2, seed=1).apply(data)
    assert res.rows_out == 60 and res.rows_rejected == 0 and res.rows_failed == 0
    ops = res.output.column("evol_operation").to_pylist()
    assert set(ops) == set(OPERATIONS)  # every operation is drawn
    for row in res.output.to_pylist():
        # the evolver saw the prompt of the operation the row names, and only that one
        assert row["instruction"].endswith(EN_OPS[row["evol_operation"]][1])
        assert row["input"] == "" and row["output"] == LONG_ANSWER
    hits = fault.stats()["script"]["hits"]
    assert {op: hits.get(op, 0) for op in OPERATIONS} == dict(Counter(ops))
    # the draw is the seed's: another seed, other operations
    other = EvolInstruct(backend=spec(fault), rounds=2, seed=2).apply(data)
    assert other.output.column("evol_operation").to_pylist() != ops
    # complicate_input names a data format, drawn per row and round too
    fault.reset()
    EvolInstruct(backend=spec(fault), rounds=1, operations=["complicate_input"]).apply(data[:6])
    prompts = [b["messages"][0]["content"] for b in fault.stats()["bodies"] if "#Given Prompt#:" in json.dumps(b)]
    assert len(prompts) == 6 and all("$" not in p for p in prompts)  # every placeholder filled
    formats = [next(f for f in DATA_FORMATS["en"] if f"Put {f} into" in p) for p in prompts]
    assert len(set(formats)) > 1


def test_every_elimination_rule_on_a_crafted_reply(fault: FaultServer) -> None:
    fault.configure(script=en_script())
    tags = ["copy", "empty", "long", "same", "equal", "sorry", "stop", "longsorry", "unclear", "plain"]
    data = rows(*(f"Describe a lake [{t}]" for t in tags))
    step = EvolInstruct(backend=spec(fault), rounds=1)
    res = step.apply(data)
    reasons = dict(zip(res.rejected.column("id").to_pylist(), res.rejected.column("reason").to_pylist(), strict=True))
    by_tag = {t: reasons.get(f"r{i}-evol1") for i, t in enumerate(tags)}
    assert {t: rule_of(r) for t, r in by_tag.items() if r} == {
        "copy": "copies_prompt", "empty": "empty", "long": "truncated", "same": "no_information_gain",
        "equal": "no_information_gain", "sorry": "refusal", "stop": "only_stop_words",
    }  # fmt: skip
    assert "'rewritten prompt'" in by_tag["copy"]
    assert "identical to its parent" in by_tag["same"] and "judged it equal" in by_tag["equal"]
    assert "6 words (< 80)" in by_tag["sorry"]
    # a long answer that says sorry, an unclear equality verdict and a plain row pass
    assert sorted(res.output.column("id").to_pylist()) == ["r7-evol1", "r8-evol1", "r9-evol1"]
    assert set(res.rejected.column("rejected_by").to_pylist()) == {"evol_instruct"}
    m = res.metrics
    assert m["rejected_by_rule"] == {r: (2 if r == "no_information_gain" else 1) for r in RULES}
    assert m["accepted"] == 3 and m["unclear_equality"] == 1
    # checks run cheapest first: rows an instruction rule removed were neither judged nor answered
    script = fault.stats()["script"]["hits"]
    assert script.get("eq", 0) == 1 and script.get("not_eq", 0) + script.get("unclear", 0) == 5
    assert sum(script.get(k, 0) for k in ("sorry", "stop", "longsorry", "answer")) == 5
    # rejected rows keep what was made, for a look at why
    copy_row = res.rejected.filter(pa.compute.equal(res.rejected.column("id"), "r0-evol1")).to_pylist()[0]
    assert copy_row["instruction"].startswith("Rewritten Prompt:") and copy_row["parent_id"] == "r0"


def _flaky_id(step: EvolInstruct) -> str:
    """An id whose row draws add_constraints in round 1 and another operation in round 2."""
    ops = step._ops()
    for k in range(200):
        rid = f"flaky{k}"
        first, second = (ops[step.rng("op", rid, r).randrange(len(ops))] for r in (1, 2))
        if first == "add_constraints" and second != "add_constraints":
            return rid
    raise AssertionError("no such id")


def test_a_failed_row_goes_back_unchanged_and_lineage_is_kept(fault: FaultServer) -> None:
    fault.configure(script=en_script())
    step = EvolInstruct(backend=spec(fault), rounds=2, seed=4)
    flaky = _flaky_id(step)
    data = [
        {"id": "plain", "instruction": "Plan a picnic.", "input": "for six people", "system": "Be brief.",
         "history": [["hi", "hello"]], "score": 0.5},
        {"id": flaky, "instruction": "Sort a list [flaky]", "input": ""},
        {"id": "down", "instruction": "Summarise [[fail]] this", "input": ""},
        {"id": "blank", "instruction": "  ", "input": ""},
    ]  # fmt: skip
    res = step.apply(data)
    out = {r["id"]: r for r in res.output.to_pylist()}
    # lineage: round 2 evolves round 1's version; system and history come along; other columns do not
    one, two = out["plain-evol1"], out["plain-evol2"]
    assert (one["parent_id"], two["parent_id"], one["evol_round"], two["evol_round"]) == ("plain", "plain-evol1", 1, 2)
    assert one["instruction"].startswith("Plan a picnic.\nfor six people ") and one["input"] == ""
    assert two["instruction"].startswith(one["instruction"] + " ")
    assert one["system"] == "Be brief." and one["history"] == [["hi", "hello"]] and "score" not in one
    # the flaky row: refused in round 1, so round 2 evolves the input again, not the rejected text
    rejected = {r["id"]: r for r in res.rejected.to_pylist()}
    assert rule_of(rejected[f"{flaky}-evol1"]["reason"]) == "refusal"
    assert rejected[f"{flaky}-evol1"]["instruction"] == "Sort a list [flaky] +constraints"
    again = out[f"{flaky}-evol2"]
    assert again["parent_id"] == flaky and again["instruction"].startswith("Sort a list [flaky] +")
    assert again["evol_operation"] != "add_constraints"
    # a request that fails for good fails its row in each round; an empty input row fails once, in round 1
    failed = {r["id"]: r for r in res.failed.to_pylist()}
    assert set(failed) == {"down-evol1", "down-evol2", "blank-evol1"}
    assert "row id='down', round 2, evolving" in failed["down-evol2"]["error"] and "500" in failed["down-evol2"]["error"]
    assert "the instruction is empty" in failed["blank-evol1"]["error"]
    assert res.rows_out + res.rows_rejected + res.rows_failed == 4 + 3  # 2 rounds x 3 rows + blank once
    assert sorted(latest_versions(res.output).column("id").to_pylist()) == [f"{flaky}-evol2", "plain-evol2"]


def test_responder_answers_and_ids_must_be_unique(fault: FaultServer) -> None:
    fault.configure(script=[*en_script()[:-1], Rule(match=r"\+", role="last_user", reply="a", name="answer")])
    responder = spec(fault, model="answer-model")
    res = EvolInstruct(backend=spec(fault), responder=responder, rounds=1).apply(rows("Name a bird."))
    models = [b["model"] for b in fault.stats()["bodies"]]
    assert models == ["fake-model", "fake-model", "answer-model"]  # evolve, equality, answer
    assert res.metrics["by_model"]["responder"]["requests"] == 1
    # no responder: the backend answers, as one backend object (usage counted once)
    alone = EvolInstruct(backend=spec(fault), rounds=1).apply(rows("Name a tree."))
    assert alone.metrics["requests"] == 3 and "by_model" not in alone.metrics
    assert (EvolInstruct(backend=spec(fault)).fingerprint()
            == EvolInstruct(backend=spec(fault), responder=spec(fault)).fingerprint())
    with pytest.raises(StepError, match="share the id 'r0'"):
        EvolInstruct(backend=spec(fault)).apply([{"id": "r0", "instruction": "a"}, {"id": "r0", "instruction": "b"}])


def zh_script() -> list[Rule]:
    given = r"#给定提示#：\n(.*?)\n\n#(?:改写|新)提示#："
    return [
        Rule(match=r"(?s)#给定提示#：\n([^\n]*\[抄\][^\n]*)\n\n#", reply=r"改写提示：\1", name="copy"),
        *(Rule(match=rf"(?s){key}.*{given}", reply=rf"\1{suffix}", name=op) for op, (key, suffix) in ZH_OPS.items()),
        Rule(match=r"(?s)比较下面两条指令.*第二条指令：\n[^\n]*\[同\]", reply="相同", name="eq"),
        Rule(match="比较下面两条指令", reply="不同。", name="not_eq"),
        Rule(match=r"\[歉\]", role="last_user", reply="抱歉，我无法回答这个问题。", name="sorry"),
        Rule(match=r"\[长歉\]", role="last_user", reply="抱歉久等。" + "这是一段很长的回答内容" * 12, name="longsorry"),
        Rule(match=r"\[虚\]", role="last_user", reply="嗯，这个嘛……就是这样吧！", name="stop"),
        Rule(match=r"\+", role="last_user", reply="春天的湖面很平静，岸边开满了花。", name="answer"),
    ]


def test_chinese_mode_uses_chinese_prompts_and_filters(fault: FaultServer) -> None:
    fault.configure(script=zh_script())
    tags = ["抄", "同", "歉", "虚", "长歉", "好"]
    data = rows(*(f"描写一个湖[{t}]" for t in tags))
    res = EvolInstruct(backend=spec(fault), rounds=1, language="zh").apply(data)
    reasons = {r["id"]: r["reason"] for r in res.rejected.to_pylist()}
    assert {t: rule_of(reasons[f"r{i}-evol1"]) for i, t in enumerate(tags) if f"r{i}-evol1" in reasons} == {
        "抄": "copies_prompt", "同": "no_information_gain", "歉": "refusal", "虚": "only_stop_words",
    }  # fmt: skip
    assert "characters (< 120)" in reasons["r2-evol1"]
    assert sorted(res.output.column("id").to_pylist()) == ["r4-evol1", "r5-evol1"]
    for row in res.output.to_pylist():
        assert row["instruction"].endswith(ZH_OPS[row["evol_operation"]][1])
    prompts = [b["messages"][0]["content"] for b in fault.stats()["bodies"]]
    assert all("Given Prompt" not in p and "Compare" not in p for p in prompts)
    # the English rule would not have caught the Chinese refusal: no "sorry", and few "words"
    assert not is_refusal("抱歉，我无法回答这个问题。", "en") and is_refusal("抱歉，我无法回答这个问题。", "zh")


def test_rule_helpers() -> None:
    assert is_refusal("Sorry, " + "word " * 78) and not is_refusal("Sorry, " + "word " * 79)  # 79 vs 80 words
    assert not is_refusal("I cannot do that.")  # the paper's rule needs the word "sorry"
    assert is_refusal("I'm SORRY.", max_length=2) is False and is_refusal("SORRY.", max_length=2)
    assert text_length("抱歉，我 can't 做到 42", "zh") == 7 and text_length("抱歉，我 can't", "en") == 2
    assert is_refusal("对不起" + "好" * 116, "zh") and not is_refusal("对不起" + "好" * 117, "zh")
    assert only_stop_words("") and only_stop_words("...!?") and only_stop_words("It is what it is, and that's that.")
    assert not only_stop_words("It is blue.") and not only_stop_words("42")
    assert only_stop_words("嗯，这个嘛……就是这样吧！", "zh") and only_stop_words("我们 and 你们", "zh")
    assert not only_stop_words("这是湖。", "zh") and not only_stop_words("the lake", "zh")
    assert prompt_markers(["#Given Prompt#: x\n#Rewritten Prompt#:", 'not "#Created Prompt#" or # a #']) == (
        "#rewritten prompt#", "#created prompt#", "rewritten prompt", "#given prompt#", "created prompt",
        "given prompt",
    )  # fmt: skip
    assert equality_verdict("Not Equal") is False and equality_verdict(" equal.") is True
    assert equality_verdict("They are equal, not equal in length") is True and equality_verdict("Maybe") is None
    assert equality_verdict("不同", "zh") is False and equality_verdict("相同。", "zh") is True
    assert equality_verdict("不相同", "zh") is False and equality_verdict("Ｎｏｔ Ｅｑｕａｌ") is False


def test_shipped_markers_are_what_the_copy_rule_looks_for() -> None:
    from thresher.pipelines.prompts import load_prompt

    for lang, want in (("en", {"given prompt", "rewritten prompt", "created prompt"}),
                       ("zh", {"给定提示", "改写提示", "新提示"})):
        step = EvolInstruct(language=lang)
        texts = [load_prompt("generators", "evol_instruct", n, lang).text for n in step._names() if n != "equality"]
        assert set(prompt_markers(texts)) == want | {f"#{w}#" for w in want}


def test_check_and_fingerprint(fault: FaultServer, tmp_path: Path) -> None:
    base = EvolInstruct(backend=spec(fault))
    with pytest.raises(ConfigError, match=r"unknown operation 'mutate'.*valid"):
        base.clone(operations=["deepen", "mutate"]).check()
    with pytest.raises(ConfigError, match="unknown language 'fr'"):
        base.clone(language="fr").check()
    with pytest.raises(ConfigError, match="rounds must be a positive integer"):
        base.clone(rounds=0).check()
    bad = tmp_path / "deepen.txt"
    bad.write_text("Deepen $instruction")
    with pytest.raises(ConfigError, match="the 'deepen' template takes exactly \\[\\]"):
        base.clone(prompts={"deepen": bad}).check()
    with pytest.raises(ConfigError, match="no template 'deep'"):
        base.clone(prompts={"deep": bad}).check()
    good = tmp_path / "concretize.txt"
    good.write_text("Make #Given Prompt# concrete, #Thing# by #Thing#.")
    custom = base.clone(prompts={"concretize": good})
    custom.check()
    before = custom.fingerprint()
    assert before != base.fingerprint()
    good.write_text("Make #Given Prompt# more concrete.")  # an edited template re-runs the step
    assert custom.fingerprint() != before
    assert base.fingerprint() == base.clone(batch_size=3, max_concurrency=2).fingerprint()
    assert base.fingerprint() != base.clone(language="zh").fingerprint()
    assert base.fingerprint() != base.clone(operations=["deepen"]).fingerprint()


def test_user_template_markers_join_the_copy_rule(fault: FaultServer, tmp_path: Path) -> None:
    frame = tmp_path / "in_depth.txt"
    frame.write_text("Harder, please: $method\n#Old Task#:\n$instruction\n#New Task#:\n")
    fault.configure(script=[
        Rule(match=r"(?s)#Old Task#:\n(.*?)\n#New Task#", reply=r"New task: \1, in detail", name="evolve"),
        Rule(match="Compare the two", reply="Not Equal", name="eq"),
        Rule(match=".", role="last_user", reply=LONG_ANSWER, name="answer"),
    ])  # fmt: skip
    res = EvolInstruct(backend=spec(fault), rounds=1, operations=["deepen"], prompts={"in_depth": frame}).apply(
        rows("Name a cloud.")
    )
    assert res.rows_rejected == 1 and res.rejected.column("reason")[0].as_py().startswith("copies_prompt: ")
    assert "'new task'" in res.rejected.column("reason")[0].as_py()


# ---- resume ------------------------------------------------------------------------------------------


def write_rows(path: Path, n: int) -> None:
    tags = ["", "", "", " [sorry]", "", " [equal]", "", " [stop]"]
    path.write_text("".join(
        json.dumps({"id": f"q{i}", "instruction": f"Explain topic {i}{tags[i % len(tags)]}", "input": ""}) + "\n"
        for i in range(n)
    ))  # fmt: skip


def evol_pipeline(server: FaultServer, data: Path, **kw: Any) -> Pipeline:
    from thresher.data.steps import Load

    pipe = Pipeline("evolve")
    pipe.add(Load(path=data), name="load")
    params = {"backend": spec(server, max_concurrency=8), "rounds": 3, "batch_size": 8, **kw}
    pipe.add(EvolInstruct(**params), name="evol", after=["load"])
    return pipe


def evolved_locally_and_on_ray(server: FaultServer, tmp_path: Path, run_dir: str | Path) -> tuple[Any, Any]:
    """The same 20 rows evolved by a local run (in tmp_path/local) and by a Ray run in `run_dir` (one actor): both
    runs, after checking that the Ray run asked the server what the local run asked and gave the same tables."""
    server.configure(script=en_script())
    write_rows(tmp_path / "rows.jsonl", 20)
    local = evol_pipeline(server, tmp_path / "rows.jsonl", cache=False).run(tmp_path / "local", progress=False)
    asked_locally = server.stats()["total"]
    server.reset()
    pipe = evol_pipeline(server, tmp_path / "rows.jsonl", cache=False)
    pipe.ray_options = {"actors": 1}
    on_ray = pipe.run(run_dir, progress=False, runner="ray")
    assert server.stats()["total"] == asked_locally > 0
    for side in ("table", "rejected", "failed"):
        assert getattr(on_ray, side)("evol").equals(getattr(local, side)("evol")), side
    return local, on_ray


def test_a_crash_resumes_without_redoing_accepted_work(fault: FaultServer, tmp_path: Path) -> None:
    """The step dies after its 5th batch's requests were answered but before that batch was committed: the rerun
    rebuilds every lineage's current version from the committed rows, asks only what the torn batch had not been
    answered (none: its answers are in the request cache), and ends with the rows of an unbroken run."""
    fault.configure(script=en_script())
    write_rows(tmp_path / "rows.jsonl", 20)
    reference = evol_pipeline(fault, tmp_path / "rows.jsonl").run(tmp_path / "ref", progress=False)
    total = fault.stats()["total"]
    fault.reset()
    os.environ["THRESHER_CACHE"] = str(tmp_path / "other-cache.sqlite")
    try:
        pipe = evol_pipeline(fault, tmp_path / "rows.jsonl")
        step = pipe.nodes["evol"].step
        batches = step.generate_batches

        def crash_at_5(tables: list[pa.Table], checkpoint: Any) -> Any:
            for k, batch in enumerate(batches(tables, checkpoint)):
                if k == 5:
                    raise RuntimeError("crash at batch 5")
                yield batch

        step.generate_batches = crash_at_5  # type: ignore[method-assign]
        with pytest.raises(Exception, match="crash at batch 5"):
            pipe.run(tmp_path / "run", progress=False)
        del step.generate_batches
        result = pipe.run(tmp_path / "run", progress=False)
    finally:
        del os.environ["THRESHER_CACHE"]
    rec = result.steps["evol"]
    assert rec.resumed_from_batch == 5  # 3 batches a round: rounds 1 and 2 of 3 were partly done
    assert fault.stats()["total"] == total  # nothing asked twice
    for side in ("table", "rejected", "failed"):
        assert getattr(result, side)("evol").to_pylist() == getattr(reference, side)("evol").to_pylist()
    assert rec.candidates == 60 == rec.rows_out + rec.rows_rejected + rec.rows_failed
    # the manifest counts what the committed batches paid for; the torn batch's answers were paid before the crash
    # and came from the cache after it
    torn = rec.metrics["cache_hits"] - reference.steps["evol"].metrics["cache_hits"]
    assert torn > 0 and rec.metrics["requests"] + torn == total


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from thresher.data.steps import Load
    from thresher.generators import EvolInstruct
    from thresher.pipelines.dag import Pipeline

    base_url, work = sys.argv[1], Path(sys.argv[2])
    pipe = Pipeline("kill9")
    pipe.add(Load(path=work / "rows.jsonl"), name="load")
    backend = {"kind": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 8}
    pipe.add(EvolInstruct(backend=backend, rounds=2, batch_size=8), name="evol", after=["load"])
    pipe.run(work / "run", progress=False)
    """
)


def test_kill_9_mid_evolution_resends_at_most_max_concurrency(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    fault.configure(script=en_script(), latency=0.02)
    write_rows(tmp_path / "rows.jsonl", 48)
    script = tmp_path / "evolve.py"
    script.write_text(KILL_SCRIPT)
    run = kill_9_and_rerun(fault, script, tmp_path, isolated_cache, "evol", inputs=["rows.jsonl"])
    assert run.committed >= 1 and 0 <= run.resent <= 8  # max_concurrency
    got, want = open_run(tmp_path / "run"), open_run(tmp_path / "ref" / "run")
    for side in ("table", "rejected", "failed"):
        assert getattr(got, side)("evol").to_pylist() == getattr(want, side)("evol").to_pylist()
    assert got.steps["evol"].candidates == want.steps["evol"].candidates == 96
    assert got.steps["evol"].resumed_from_batch == run.committed


# ---- end to end on the real server ----------------------------------------------------------------------


E2E_INSTRUCTIONS = [
    "Name three fruits.", "What is the capital of France?", "Write a haiku about rain.", "Explain what a noun is.",
    "Give two tips for sleeping well.", "Add 17 and 25.", "Describe the colour blue.", "What do bees make?",
    "List three farm animals.", "Why is the sky blue?", "Write one sentence about the sea.",
    "Suggest a name for a cat.", "What is 9 times 7?", "Translate 'hello' into French.", "Name a planet.",
    "What does a thermometer measure?", "Give an example of a verb.", "Describe a sunny day.",
    "What is the opposite of cold?", "Name a musical instrument.",
]  # fmt: skip


@pytest.mark.slow
def test_end_to_end_on_the_real_server_then_respond(llama_server: str, tmp_path: Path) -> None:
    """EvolInstruct runs 2 rounds on 20 instructions with the bundled SmolLM2-135M behind llama.cpp's OpenAI server,
    then Respond answers the evolved rows twice and keeps the longer answer. Every column is present, every rejected
    row says which rule removed it, and the accounting balances; the pass rate of each rule is printed."""
    from thresher.data.steps import Load

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "input": "", "output": None}) + "\n"
                            for t in E2E_INSTRUCTIONS))
    backend = {"kind": "openai", "base_url": llama_server, "model": "smollm2", "max_concurrency": 4, "timeout": 120}
    pipe = Pipeline("e2e")
    pipe.add(Load(path=data), name="load")
    pipe.add(EvolInstruct(backend=backend, rounds=2, max_tokens=48, answer_max_tokens=40, batch_size=20),
             name="evol", after=["load"])
    pipe.add(Respond(backend=backend, n=2, pick="longest", max_tokens=32, temperature=0.8), name="answer",
             after=["evol"])
    t0 = time.perf_counter()
    result = pipe.run(tmp_path / "run", progress=False)
    seconds = time.perf_counter() - t0
    rec = result.steps["evol"]
    out, rejected, failed = result.table("evol"), result.rejected("evol"), result.failed("evol")
    assert rec.candidates == 40 == out.num_rows + rejected.num_rows + failed.num_rows
    for column in ("id", "instruction", "input", "output", "system", "history", "parent_id", "evol_round",
                   "evol_operation"):
        assert column in out.column_names and column in rejected.column_names
    reasons = rejected.column("reason").to_pylist()
    assert all(rule_of(r) in RULES and len(r) > len(rule_of(r)) + 2 for r in reasons)
    assert set(rejected.column("rejected_by").to_pylist()) <= {"evol"}
    # lineage holds together: a round-2 row's parent is an input or an accepted round-1 row
    ids = set(out.column("id").to_pylist())
    inputs = set(result.table("load").column("id").to_pylist())
    for row in out.to_pylist():
        assert row["parent_id"] in (inputs if row["evol_round"] == 1 else inputs | ids)
        assert row["output"] and row["instruction"]
    answered = result.steps["answer"]
    assert answered.rows_in == out.num_rows == answered.rows_out + answered.rows_failed
    # the rates, per round and per rule (each rule sees only the attempts the earlier rules let through)
    print(f"\nEvolInstruct e2e, SmolLM2-135M on llama.cpp: {seconds:.0f} s; {out.num_rows}/40 evolutions accepted, "
          f"{rejected.num_rows} rejected, {failed.num_rows} failed")
    counts = Counter(rule_of(r) for r in reasons)
    left = 40 - failed.num_rows
    for rule in RULES:
        print(f"  {rule:20s} saw {left:2d}, rejected {counts[rule]:2d}, pass rate {1 - counts[rule] / max(left, 1):.0%}")
        left -= counts[rule]
    by_round = Counter(out.column("evol_round").to_pylist())
    print(f"  accepted per round: {dict(sorted(by_round.items()))}; operations: "
          f"{dict(Counter(out.column('evol_operation').to_pylist()))}")
