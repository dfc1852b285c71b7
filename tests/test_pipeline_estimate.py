"""The cost estimate and max_cost_usd, against the scripted fault server (a real HTTP server that reports usage).

The scripted server counts tokens as whitespace-separated words of the messages' contents and of each reply, so the
estimates here count the same way (`tokenizer="words"`): what is compared is the estimator's structure (requests per
row, rounds, dimensions, prompts rendered on the real rows and on the answers upstream steps give) against what the
run then sent. Its model writes about half of each budget (the estimate's default fill), as real models mostly do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from thresher.data import Load
from thresher.errors import BudgetExceeded, ConfigError
from thresher.generators import EvolInstruct, Respond, SelfInstruct
from thresher.llms.testing import FaultServer, Rule
from thresher.pipelines import Pipeline
from thresher.pipelines.estimate import DryRunBackend, PlannedRequest, token_counter
from thresher.pipelines.runner import open_run
from thresher.scorers import DeitaScorer, LLMJudge, Tagger

pytestmark = pytest.mark.usefixtures("isolated_cache")

TOPICS = [
    "Plan a three-day walking route through the Scottish Highlands.",
    "Describe how a heat pump warms a house in winter.",
    "Give a packing list for a week of camping by a lake.",
    "Translate the shop sign into plain English for tourists.",
    "Decide whether the email below asks for a refund.",
    "Draft a short thank-you note to a retiring teacher.",
    "Compare trains and buses for a daily city commute.",
    "Outline a beginner's weekly plan for learning to swim.",
]
PRICES = {"prompt": 2.0, "completion": 8.0}  # USD per 1M tokens
WORDS18 = " ".join(["and", "show", "each", "step", "with", "a", "short", "worked", "example", "then", "check", "the",
                    "result", "against", "one", "stated", "constraint", "carefully"])  # fmt: skip
ANSWER38 = " ".join(f"point{k}" for k in range(38))
REASON19 = " ".join(f"reason{k}" for k in range(19))


def script() -> list[Rule]:
    """A model that writes about half of each budget: a 20-word evolution (max_tokens 40), 40-word answers (80),
    a 20-word verdict (40); rows keep their own first word, so no two rows ask the same."""
    return [
        Rule(match=r"(?s)#Given Prompt#:\n(\S+)[^\n]*?(\S+)\n\n#", reply=rf"\1 \2 {WORDS18}", name="evolve"),
        Rule(match="Compare the two instructions", reply="Not Equal", name="equal"),
        Rule(match=r"\[The user's request\]", reply=f"4\n{REASON19}", name="judge"),
        Rule(match=r"^(\S+)", role="last_user", reply=rf"Answer for \1 {ANSWER38}", name="answer"),
    ]


def spec(server: FaultServer, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "max_retries": 0, "prices": PRICES,
            **kw}  # fmt: skip


def write_rows(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Task{i:02d}: {TOPICS[i % len(TOPICS)]}", "input": "", "output": ""}) + "\n")
    return path


def grow_pipeline(server: FaultServer, data: Path, **kw: Any) -> Any:
    return (
        Load(path=str(data))
        >> EvolInstruct(backend=spec(server, **kw), rounds=2, max_tokens=40, answer_max_tokens=80, batch_size=8)
        >> Respond(backend=spec(server, **kw), max_tokens=80, batch_size=8)
        >> LLMJudge(backend=spec(server, **kw), dimensions=["accuracy", "helpfulness"], max_tokens=40, batch_size=8)
    )


def test_estimate_is_within_25_percent_of_what_the_run_spent(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=script())
    pipe = grow_pipeline(fault, write_rows(tmp_path / "rows.jsonl", 24))
    t0 = time.perf_counter()
    est = pipe.estimate(tmp_path / "run", tokenizer="words")
    t_est = time.perf_counter() - t0
    assert fault.stats()["total"] == 0  # nothing was sent
    print(f"\n{est}\nestimate took {t_est:.2f}s")
    res = pipe.run(tmp_path / "run", progress=False)
    assert fault.stats()["script"]["unmatched"] == 0
    total_actual = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for name in ("evol_instruct", "respond", "llm_judge"):
        m, e = res.metrics(name), est.step(name)
        assert res.steps[name].rows_out == e.rows_out, name  # every evolution accepted: the estimate's upper bound
        for key in total_actual:
            total_actual[key] += m[key]
        for key in ("requests", "prompt_tokens", "completion_tokens", "cost_usd"):
            ratio = getattr(e, key) / m[key]
            print(f"{name:14s} {key:18s} estimate {getattr(e, key):>10,.4g}  actual {m[key]:>10,.4g}  ratio {ratio:.3f}")
            assert 0.75 <= ratio <= 1.25, (name, key, getattr(e, key), m[key])
    assert total_actual["requests"] == fault.stats()["total"]
    for key, actual in total_actual.items():
        ratio = getattr(est.total, key) / actual
        print(f"{'total':14s} {key:18s} ratio {ratio:.3f}")
        assert 0.75 <= ratio <= 1.25, (key, getattr(est.total, key), actual)
    # once the run is finished, every step is cached in its run directory and costs nothing
    again = pipe.estimate(tmp_path / "run", tokenizer="words")
    assert {s.status for s in again.steps} == {"cached"} and again.total.cost_usd == 0


def test_answer_lengths_are_measured_from_a_pilot_run_in_the_request_cache(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=script())
    data = write_rows(tmp_path / "rows.jsonl", 24)

    def pipe(limit: int | None) -> Any:
        return (Load(path=str(data), limit=limit) >> Respond(backend=spec(fault), max_tokens=80, batch_size=8)
                >> LLMJudge(backend=spec(fault), max_tokens=40, batch_size=8))  # fmt: skip

    guessed = pipe(None).estimate(tokenizer="words", fill=0.1)  # a poor guess of how long answers are
    pipe(8).run(tmp_path / "pilot", progress=False)  # a pilot on the first 8 rows puts real answers in the cache
    measured = pipe(None).estimate(tokenizer="words", fill=0.1)
    fault.reset()
    res = pipe(None).run(tmp_path / "full", progress=False)
    for name in ("respond", "llm_judge"):
        m = res.metrics(name)
        actual = m["completion_tokens"] / m["requests"]  # per answer paid for (the pilot's 8 come from the cache)
        per = {e.status: e.completion_tokens / e.requests for e in (guessed.step(name), measured.step(name))}
        print(f"\n{name}: completion tokens per answer, fill guess {guessed.step(name).completion_tokens / 24:.1f}, "
              f"measured {measured.step(name).completion_tokens / 24:.1f}, actual {actual:.1f}")
        assert 0.75 <= measured.step(name).completion_tokens / 24 / actual <= 1.25, per
        assert guessed.step(name).completion_tokens / 24 / actual < 0.5
    assert measured.step("respond").requests == 24  # answers in the cache are still counted as paid (an upper bound)


def test_self_instruct_estimate_scales_to_num_instructions(fault: FaultServer, tmp_path: Path) -> None:
    si = SelfInstruct(backend=spec(fault), seed_tasks=TOPICS, num_instructions=35, requests_per_batch=5,
                      max_instances=2, instance_max_tokens=60)  # fmt: skip
    est = (si >> Respond(backend=spec(fault), max_tokens=80)).estimate(tokenizer="words")
    first = est.step("self_instruct")
    asks = 10  # 35 tasks at 3.5 a request, in whole batches of 5
    tasks = asks * SelfInstruct.ESTIMATE_TASKS_PER_REQUEST["self_instruct"]
    assert first.requests == pytest.approx(asks + 2 * tasks)  # + a classification and an instance request per task
    assert first.rows_out == round(tasks * SelfInstruct.ESTIMATE_ROWS_PER_TASK)
    assert est.step("respond").requests == pytest.approx(first.rows_out)
    plan = si.estimate_requests([])
    shown = plan[0].messages[0]["content"]
    assert sum(t.rstrip(".") in shown for t in TOPICS) == 8  # the task request rendered on the seeds
    assert fault.stats()["total"] == 0


def si_script() -> list[Rule]:
    """A task model with a steady acceptance: each reply (one of 1,000, picked by a hash of the request) holds three
    new tasks unlike any other, two near-copies of seed tasks (the similarity filter), one for a picture (the
    blacklist) and one too short; two instances a task."""
    replies = []
    for r in range(1000):
        good = [f"Explain term{r}x{k}a term{r}x{k}b term{r}x{k}c term{r}x{k}d to curious beginners" for k in range(3)]
        near = [f"{TOPICS[(r + k) % len(TOPICS)].rstrip('.')} today." for k in range(2)]
        items = [*good, *near, f"Draw a picture of term{r}z.", "Sing loudly."]
        replies.append("\n".join(f"{9 + k}. {t}" for k, t in enumerate(items)))
    return [
        Rule(match=r"Classification task\?\s*$", reply="No", name="clf"),
        Rule(match=r"first an input that fits the task", name="instances",
             reply="Example 1\nInput: alpha\nOutput: one\nExample 2\nInput: beta\nOutput: two"),
        Rule(match=r"numbered \d+ to 15", reply=replies, pick="hash", template=False, name="tasks"),
    ]


def test_self_instruct_estimate_after_a_budget_stop_measures_its_acceptance(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=si_script())

    def pipe(**kw: Any) -> Pipeline:
        b = spec(fault, max_concurrency=1, **kw)
        return Pipeline.from_step(SelfInstruct(backend=b, seed_tasks=TOPICS, num_instructions=40, requests_per_batch=1,
                                               max_instances=2, instance_max_tokens=60, max_tokens=400))  # fmt: skip

    run_dir = tmp_path / "run"
    fresh = pipe().estimate(run_dir, tokenizer="words").step("self_instruct")
    with pytest.raises(BudgetExceeded):
        pipe(max_cost_usd=fresh.cost_usd / 3).run(run_dir, progress=False)
    step_dir = run_dir / open_run(run_dir).steps["self_instruct"].dir
    before = json.loads((step_dir / "_metrics.json").read_text())
    first = fault.stats()["total"]
    rest = pipe().estimate(run_dir, tokenizer="words").step("self_instruct")
    fault.reset()
    res = pipe(max_cost_usd=1.0).run(run_dir, progress=False)
    assert fault.stats()["script"]["unmatched"] == 0
    after = res.metrics("self_instruct")
    whole = first + after["requests"] - before["requests"]
    print(f"\nfresh estimate (assumed acceptance) vs the whole run: requests {fresh.requests:.0f} / {whole} = "
          f"{fresh.requests / whole:.3f}, rows {fresh.rows_out} / {res.steps['self_instruct'].rows_out}")
    assert 0.75 <= fresh.requests / whole <= 1.25
    for key in ("requests", "prompt_tokens", "completion_tokens"):
        actual = after[key] - before[key]
        ratio = getattr(rest, key) / actual
        print(f"after the stop, {key:18s} estimate {getattr(rest, key):>8,.0f}  actual {actual:>8,}  ratio {ratio:.3f}")
        assert 0.75 <= ratio <= 1.25, (key, getattr(rest, key), actual)
    assert res.steps["self_instruct"].rows_out == pytest.approx(rest.rows_out, rel=0.25)


def test_scorers_say_their_requests_without_sending(fault: FaultServer) -> None:
    rows = [{"id": f"r{i}", "instruction": f"Task{i}: {t}", "input": "", "output": "An answer.", "parent_id": None}
            for i, t in enumerate(TOPICS)]  # fmt: skip
    tagger = Tagger(backend=spec(fault), max_tokens=64).estimate_requests(rows, tokenizer="words")
    assert len(tagger) == 8 and all(q.max_tokens == 64 for q in tagger)
    assert "Task3" in tagger[3].messages[-1]["content"]
    deita = DeitaScorer(backend=spec(fault), method="expected").estimate_requests(rows, tokenizer="words")
    assert len(deita) == 16  # complexity and quality per row
    judge = LLMJudge(backend=spec(fault), dimensions=["accuracy", "helpfulness"]).estimate_requests(rows)
    assert len(judge) == 16 and all(isinstance(q, PlannedRequest) for q in judge)
    assert fault.stats()["total"] == 0


def test_token_counters_and_the_dry_run_backend() -> None:
    assert token_counter("words").count("a b  c") == 3
    chars = token_counter("chars4")
    assert chars.count("abcdefgh") == 2 and chars.messages([{"role": "user", "content": "abcd"}]) == 3 + 3 + 1
    assert token_counter("auto").name in ("chars4", "tiktoken:o200k_base")
    with pytest.raises(ConfigError, match="tokenizer"):
        token_counter("bpe")
    dry = DryRunBackend(None, param="backend", counter=token_counter("words"), fill=0.5)
    got = dry.chat([[{"role": "user", "content": "hi"}]], max_tokens=40, n=2,
                   response_format={"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}})
    assert got[0].parsed is not None and isinstance(got[0].parsed[0]["tags"], list)
    assert dry.requests[0].n == 2 and dry.requests[0].max_tokens == 40


def budget_pipeline(server: FaultServer, data: Path, cache: Path, **kw: Any) -> Any:
    b = spec(server, cache=str(cache), max_concurrency=2, **kw)
    return (
        Load(path=str(data))
        >> Respond(backend=b, max_tokens=80, batch_size=4)
        >> LLMJudge(backend=b, dimensions=["accuracy"], max_tokens=40, batch_size=4)
    )


def test_max_cost_usd_stops_the_run_and_a_larger_budget_resumes(fault: FaultServer, tmp_path: Path) -> None:
    fault.configure(script=script())
    data = write_rows(tmp_path / "rows.jsonl", 24)
    # the whole run costs ~$0.011 (24 answers and 24 verdicts): a budget of a third stops it inside Respond
    full_cost = budget_pipeline(fault, data, tmp_path / "a.sqlite").estimate(tokenizer="words").total.cost_usd
    small = full_cost / 3
    warned = budget_pipeline(fault, data, tmp_path / "a.sqlite", max_cost_usd=small).estimate(tokenizer="words")
    assert len(warned.warnings) == 1 and "reached in step 'respond'" in warned.warnings[0]
    assert "warning: max_cost_usd" in warned.table()
    with pytest.raises(BudgetExceeded, match="max_cost_usd"):
        budget_pipeline(fault, data, tmp_path / "a.sqlite", max_cost_usd=small).run(tmp_path / "b", progress=False)
    stopped = fault.stats()["total"]
    run = open_run(tmp_path / "b")
    assert run.steps["respond"].status == "failed" and "max_cost_usd" in (run.steps["respond"].error or "")
    committed = run.table("respond").num_rows if (tmp_path / "b" / run.steps["respond"].dir / "output").is_dir() else 0
    assert 0 < committed < 24 and stopped < 24 + 2  # stopped inside Respond; in flight at most max_concurrency more
    # a larger budget resumes: committed batches are not redone and no paid answer is asked for again
    fault.reset()
    res = budget_pipeline(fault, data, tmp_path / "a.sqlite", max_cost_usd=1.0).run(tmp_path / "b", progress=False)
    assert res.steps["respond"].resumed_from_row == committed
    resumed = fault.stats()["total"]
    assert stopped + resumed == 48  # 24 answers + 24 verdicts, each paid once over the two runs
    # the same rows as a run without a budget (its own request cache, so it asks everything again)
    fault.reset()
    plain = budget_pipeline(fault, data, tmp_path / "c.sqlite").run(tmp_path / "c", progress=False)
    assert fault.stats()["total"] == 48
    cols = ["id", "instruction", "output", "judge_accuracy"]
    assert res.table("llm_judge").select(cols).to_pylist() == plain.table("llm_judge").select(cols).to_pylist()
    assert res.steps["llm_judge"].rows_out == 24
    assert res.steps["respond"].rows_failed == 0 and res.steps["llm_judge"].rows_failed == 0  # nothing lost


def test_max_cost_usd_needs_prices(fault: FaultServer) -> None:
    from thresher.llms import make_backend

    with pytest.raises(ConfigError, match="needs prices"):
        make_backend({"kind": "openai", "base_url": fault.base_url, "model": "m", "max_cost_usd": 1.0})
    with pytest.raises(ConfigError, match="positive"):
        make_backend({"kind": "openai", "base_url": fault.base_url, "model": "m", "prices": PRICES, "max_cost_usd": 0})


def test_cli_run_estimate_prints_the_table_and_sends_nothing(fault: FaultServer, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from thresher.cli import main

    data = write_rows(tmp_path / "rows.jsonl", 12)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: est\nsteps:\n  load:\n    step: Load\n    params: {path: " + json.dumps(str(data)) + "}\n"
        "  respond:\n    step: Respond\n    params:\n      backend: {kind: openai, base_url: " + json.dumps(fault.base_url)
        + ", model: m, prices: {prompt: 2.0, completion: 8.0}, max_cost_usd: 5}\n      max_tokens: 100\n",
        encoding="utf-8",
    )
    out = CliRunner().invoke(main, ["run", str(recipe), "--estimate", "--out", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    line = next(row for row in out.output.splitlines() if row.startswith("respond"))
    assert line.split()[1:4] == ["12", "12", "12"]  # rows in, rows out, requests
    assert "total" in out.output and fault.stats()["total"] == 0


def test_cli_run_stops_at_the_budget_with_a_clear_message(fault: FaultServer, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from thresher.cli import main

    fault.configure(script=script())
    data = write_rows(tmp_path / "rows.jsonl", 12)
    recipe = tmp_path / "r.yaml"
    backend = "{kind: openai, base_url: " + json.dumps(fault.base_url) + ", model: m, max_concurrency: 1, "
    recipe.write_text(
        "name: est\nsteps:\n  load:\n    step: Load\n    params: {path: " + json.dumps(str(data)) + "}\n"
        "  respond:\n    step: Respond\n    params:\n      backend: " + backend
        + "prices: {prompt: 2.0, completion: 8.0}, max_cost_usd: 0.0003}\n      max_tokens: 80\n      batch_size: 4\n",
        encoding="utf-8",
    )
    out = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run"), "-q"])
    assert out.exit_code == 1 and "stopped:" in out.output and "max_cost_usd=0.0003 reached" in out.output
    assert 0 < fault.stats()["total"] < 12

