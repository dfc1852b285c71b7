"""Batch API mode (`thresher.llms.batch`) against the scripted server's Files and Batches endpoints: one job for a
whole step, split files, failed lines, expired and cancelled jobs, re-asks in a second stage, a SIGKILL after
submission then a re-run that submits nothing, vllm-file round trips, cost at batch prices, estimate and CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from thresher.errors import BackendError, BatchPending, ConfigError
from thresher.llms import make_backend
from thresher.llms.batch import Ledger, OpenAIBatch, split_lines
from thresher.llms.testing import FaultServer, Rule
from thresher.llms.testing_batch import answer_file

PRICES = {"prompt": 3.0, "completion": 12.0}  # USD per 1M tokens online; batch: half


def spec(server: FaultServer, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "batch": True,
            "batch_poll_interval": 0.01, "batch_poll_max": 0.05, "prices": PRICES, **kw}  # fmt: skip


def write_rows(path: Path, n: int, mark: dict[int, str] | None = None) -> Path:
    mark = mark or {}
    path.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"question {i}{mark.get(i, '')}"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def respond_pipeline(rows: Path, backend: dict[str, Any], batch_size: int = 10) -> Any:
    from thresher.data.steps import Load
    from thresher.generators import Respond
    from thresher.pipelines.dag import Pipeline

    pipe = Pipeline("batch")
    pipe.add(Load(path=rows), name="load")
    pipe.add(Respond(backend=backend, max_tokens=16, batch_size=batch_size), name="respond", after=["load"])
    return pipe


def routes(server: FaultServer) -> dict[str, int]:
    return dict(server.stats()["routes"])


def test_a_whole_step_is_one_job_and_costs_half_the_online_price(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", 40)
    res = respond_pipeline(rows, spec(fault), batch_size=10).run(tmp_path / "run", progress=False)
    got = routes(fault)
    # 4 row batches of 10, one job: one upload, one job, no online completion
    assert got["POST /v1/files"] == 1 and got["POST /v1/batches"] == 1
    assert "POST /v1/chat/completions" not in got and fault.stats()["batch_lines"] == 40
    out = res.table("respond")
    assert sorted(out.column("output").to_pylist()) == sorted(f"reply to: question {i}" for i in range(40))
    m = res.metrics("respond")
    assert (m["batches"], m["batch_requests"], m["requests"]) == (1, 40, 0)
    # the server counts words: "question i" is 2 prompt tokens, "reply to: question i" 4 completion tokens
    assert (m["prompt_tokens"], m["completion_tokens"]) == (80, 160)
    batch_cost = m["cost_usd"]
    assert batch_cost == pytest.approx((80 * 1.5 + 160 * 6.0) / 1e6)

    # the same step online, same prices, fresh cache: twice the cost, one HTTP call per row
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "online.sqlite"))
    fault.reset()
    online = {k: v for k, v in spec(fault).items() if k not in ("batch", "batch_poll_interval", "batch_poll_max")}
    res2 = respond_pipeline(rows, online).run(tmp_path / "run-online", progress=False)
    m2 = res2.metrics("respond")
    assert m2["cost_usd"] == pytest.approx(2 * batch_cost)
    assert routes(fault) == {"POST /v1/chat/completions": 40}
    assert res2.table("respond").column("output").to_pylist() == out.column("output").to_pylist()

    # the request cache is shared: a batch re-run pays nothing and sends nothing
    monkeypatch.setenv("THRESHER_CACHE", str(isolated_cache))
    fault.reset()
    respond_pipeline(rows, spec(fault), batch_size=10).run(tmp_path / "run3", progress=False)
    assert routes(fault) == {}


def test_files_split_to_the_request_and_byte_limits(fault: FaultServer, isolated_cache: Path, tmp_path: Path) -> None:
    fault.configure(batch_max_requests=7)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(20)]
    b = make_backend(spec(fault, batch_max_requests=7, batch_dir=str(tmp_path / "b")))
    res = b.chat(convs, max_tokens=8)
    assert [r.text for r in res] == [f"reply to: question {i}" for i in range(20)]
    assert routes(fault)["POST /v1/batches"] == 3  # 7 + 7 + 6
    lines = [rec.lines for rec in Ledger(tmp_path / "b" / "ledger.jsonl").records.values()]
    assert lines == [7, 7, 6]

    # bytes: each line is ~190 bytes; 500 bytes per file holds two
    fault.reset()
    convs = [[{"role": "user", "content": f"another question {i}"}] for i in range(5)]
    b2 = make_backend(spec(fault, batch_max_bytes=1024, batch_dir=str(tmp_path / "c")))
    one = len(json.dumps({"custom_id": "k" * 32, "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "fake-model", "messages": convs[0], "max_tokens": 8}})) + 1  # fmt: skip
    per_file = 1024 // one
    b2.chat(convs, max_tokens=8)
    assert routes(fault)["POST /v1/batches"] == -(-5 // per_file)
    assert split_lines([b"x" * 10] * 5, 2, 1024) == [[b"x" * 10] * 2, [b"x" * 10] * 2, [b"x" * 10]]
    assert split_lines([b"x" * 10] * 5, 100, 25) == [[b"x" * 10] * 2, [b"x" * 10] * 2, [b"x" * 10]]

    # a file over the server's limit is refused with its reason: the split is what keeps jobs under it
    fault.reset()
    big = make_backend(spec(fault, batch_dir=str(tmp_path / "d")))
    with pytest.raises(BackendError, match="at most 7 are allowed"):
        big.chat([[{"role": "user", "content": f"third {i}"}] for i in range(8)], max_tokens=8)


def test_failed_lines_fail_their_rows_with_the_reason(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", 12, {3: " [[fail]]", 8: " [[400]]"})
    res = respond_pipeline(rows, spec(fault)).run(tmp_path / "run", progress=False)
    failed = {r["id"]: r["error"] for r in res.failed("respond").to_pylist()}
    assert sorted(failed) == ["r3", "r8"]
    assert "Batch API job batch_" in failed["r3"] and "HTTP 500" in failed["r3"]
    assert "HTTP 400" in failed["r8"]
    assert res.table("respond").num_rows == 10
    assert "POST /v1/chat/completions" not in routes(fault)  # on_batch_error=fail: nothing online
    # a new run (its own ledger) pays only for the two that failed: the others are in the request cache
    fault.reset()
    again = respond_pipeline(rows, spec(fault)).run(tmp_path / "run2", progress=False)
    assert (routes(fault)["POST /v1/batches"], fault.stats()["batch_lines"]) == (1, 2)
    assert again.metrics("respond")["batch_requests"] == 2 and again.table("respond").num_rows == 10


@pytest.mark.parametrize("on_error", ["fail", "online"])
def test_an_expired_job_fails_or_goes_online(fault: FaultServer, tmp_path: Path, isolated_cache: Path, on_error: str) -> None:
    fault.configure(batch_outcome="expired")
    b = make_backend(spec(fault, on_batch_error=on_error, batch_dir=str(tmp_path / "b")))
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(10)]
    res = b.chat(convs, max_tokens=8)
    assert fault.stats()["batch_lines"] == 5  # the scripted server runs the first half before the window ends
    if on_error == "fail":
        assert [r.error is None for r in res] == [True] * 5 + [False] * 5
        assert all("batch_expired" in (r.error or "") for r in res[5:])
        assert "POST /v1/chat/completions" not in routes(fault)
    else:
        assert all(r.error is None for r in res)
        assert [r.text for r in res] == [f"reply to: question {i}" for i in range(10)]
        assert routes(fault)["POST /v1/chat/completions"] == 5  # the expired half, online
        assert b.usage.cost_usd == pytest.approx((5 * 2 * 1.5 + 5 * 4 * 6 + 5 * 2 * 3 + 5 * 4 * 12) / 1e6)


def test_a_reask_of_invalid_json_goes_out_as_a_second_stage(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    b = make_backend(spec(fault, batch_dir=str(tmp_path / "b")))
    convs = [[{"role": "user", "content": "fine"}], [{"role": "user", "content": "prose please [[badjson]]"}]]
    res = b.chat(convs, max_tokens=30, response_format=schema)
    assert all(r.error is None for r in res), [r.error for r in res]
    assert [isinstance(r.parsed[0], dict) for r in res] == [True, True]
    assert routes(fault)["POST /v1/batches"] == 2  # the re-ask needs the first answer: a second job
    assert b.usage.reasks == 1 and b.usage.batch_requests == 3


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from thresher.data.steps import Load
    from thresher.generators import Respond
    from thresher.pipelines.dag import Pipeline

    base_url, work = sys.argv[1], Path(sys.argv[2])
    backend = {"kind": "openai", "base_url": base_url, "model": "fake-model", "batch": True,
               "batch_poll_interval": 0.02, "batch_poll_max": 0.05, "batch_max_requests": 25,
               "prices": {"prompt": 3.0, "completion": 12.0}}
    pipe = Pipeline("kill9")
    pipe.add(Load(path=work / "rows.jsonl"), name="load")
    pipe.add(Respond(backend=backend, max_tokens=16, batch_size=20), name="respond", after=["load"])
    pipe.run(work / "run", progress=False)
    """
)


def _start_and_kill_after_submission(server: FaultServer, work: Path, cache: Path) -> tuple[list[str], dict[str, str]]:
    """Run KILL_SCRIPT in `work` with jobs that never finish; SIGKILL it once its jobs are in the ledger."""
    server.configure(batch_polls=10**9)
    script = work / "run_pipeline.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "THRESHER_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script), server.base_url, str(work)]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while server.stats()["routes"].get("GET /v1/batches/:id", 0) < 2:  # both jobs created and polled
        assert proc.poll() is None, "the run ended before its jobs finished"
        assert time.monotonic() < deadline, "no batch job polled within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return cmd, env


def test_sigkill_after_submission_then_a_rerun_submits_nothing_new(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    write_rows(tmp_path / "rows.jsonl", 50)
    cmd, env = _start_and_kill_after_submission(fault, tmp_path, isolated_cache)
    first = routes(fault)
    assert (first["POST /v1/files"], first["POST /v1/batches"]) == (2, 2)  # 25 + 25 requests
    ledger_path = next((tmp_path / "run" / "steps").glob("respond-*/batches/ledger.jsonl"))
    assert len(Ledger(ledger_path).live()) == 2

    fault.configure(batch_polls=1)
    fault.reset()
    subprocess.run(cmd, env=env, check=True, timeout=120)
    second = routes(fault)
    print(f"killed after {first}; the re-run made {second}")
    assert "POST /v1/files" not in second and "POST /v1/batches" not in second
    assert "POST /v1/chat/completions" not in second
    assert second["GET /v1/batches/:id"] == 2
    from thresher.pipelines.runner import open_run

    run = open_run(tmp_path / "run")
    out = run.table("respond").column("output").to_pylist()
    assert sorted(out) == sorted(f"reply to: question {i}" for i in range(50))
    m = run.metrics("respond")
    assert m["cost_usd"] == pytest.approx((100 * 1.5 + 200 * 6.0) / 1e6)
    assert [r.collected for r in Ledger(ledger_path).records.values()] == [True, True]


def test_a_job_lost_between_creation_and_its_ledger_line_is_found_by_its_file(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    write_rows(tmp_path / "rows.jsonl", 30)
    cmd, env = _start_and_kill_after_submission(fault, tmp_path, isolated_cache)
    ledger_path = next((tmp_path / "run" / "steps").glob("respond-*/batches/ledger.jsonl"))
    # as if the kill came after POST /batches answered and before its line was written
    kept = [ln for ln in ledger_path.read_text().splitlines() if json.loads(ln)["event"] != "created"]
    ledger_path.write_text("".join(ln + "\n" for ln in kept))
    assert len(Ledger(ledger_path).orphans()) == 2
    fault.configure(batch_polls=1)
    fault.reset()
    subprocess.run(cmd, env=env, check=True, timeout=120)
    second = routes(fault)
    assert "POST /v1/batches" not in second and "POST /v1/files" not in second
    assert second["GET /v1/batches"] == 1  # the list that found them
    from thresher.pipelines.runner import open_run

    assert open_run(tmp_path / "run").table("respond").num_rows == 30


def test_batches_command_lists_and_cancels(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    from thresher.cli import main

    write_rows(tmp_path / "rows.jsonl", 30)
    cmd, env = _start_and_kill_after_submission(fault, tmp_path, isolated_cache)
    listed = CliRunner().invoke(main, ["batches", str(tmp_path / "run")])
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("in_progress") == 2 and "batch_" in listed.output
    cancelled = CliRunner().invoke(main, ["batches", str(tmp_path / "run"), "--cancel", "--json"])
    assert [r["status"] for r in json.loads(cancelled.output)] == ["cancelling", "cancelling"]
    # the re-run collects the cancelled jobs: what they answered (the first half of each) is kept, the rest fails
    fault.configure(batch_polls=1)
    subprocess.run(cmd, env=env, check=True, timeout=120)
    from thresher.pipelines.runner import open_run

    run = open_run(tmp_path / "run")
    assert run.table("respond").num_rows == 25 // 2 + 5 // 2  # jobs of 25 and 5 requests
    errors = run.failed("respond").column("error").to_pylist()
    assert all("batch_cancelled" in e for e in errors) and len(errors) == 16
    shown = json.loads(CliRunner().invoke(main, ["batches", str(tmp_path / "run"), "--json"]).output)
    assert [r["status"] for r in shown] == ["cancelled", "cancelled"]
    assert sum(r["completed"] for r in shown) == 14 and sum(r["failed"] for r in shown) == 16
    assert sum(r["cost_usd"] for r in shown) == pytest.approx(run.metrics("respond")["cost_usd"])


def test_vllm_file_mode_stops_then_collects_the_output_file(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", 12, {5: " [[400]]"})
    backend = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "fake-model", "batch": "vllm-file",
               "prices": PRICES}  # fmt: skip
    with pytest.raises(BatchPending, match=r"vllm\.entrypoints\.openai\.run_batch") as stop:
        respond_pipeline(rows, backend).run(tmp_path / "run", progress=False)
    inputs = list((tmp_path / "run").glob("steps/respond-*/batches/*.input.jsonl"))
    assert len(inputs) == 1 and inputs[0].name in str(stop.value)
    lines = [json.loads(x) for x in inputs[0].read_text().splitlines()]
    assert len(lines) == 12 and {x["url"] for x in lines} == {"/v1/chat/completions"}
    # a second run before the output exists submits nothing new and stops again
    with pytest.raises(BatchPending):
        respond_pipeline(rows, backend).run(tmp_path / "run", progress=False)
    assert len(list((tmp_path / "run").glob("steps/respond-*/batches/*.input.jsonl"))) == 1
    # the GPU box's part: vllm run-batch answers the file (here the scripted server does)
    answer_file(inputs[0], inputs[0].with_name(inputs[0].name.replace(".input.", ".output.")), fault.base_url)
    res = respond_pipeline(rows, backend).run(tmp_path / "run", progress=False)
    assert res.table("respond").num_rows == 11
    assert "HTTP 400" in res.failed("respond").column("error").to_pylist()[0]
    assert res.metrics("respond")["cost_usd"] == pytest.approx((11 * 2 * 1.5 + 11 * 4 * 6.0) / 1e6)


def test_estimate_prices_batch_mode_at_batch_prices(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", 24)
    online = {k: v for k, v in spec(fault).items() if not k.startswith("batch")}
    batch_est = respond_pipeline(rows, spec(fault)).estimate(tmp_path / "a").step("respond")
    online_est = respond_pipeline(rows, online).estimate(tmp_path / "b").step("respond")
    assert batch_est.requests == online_est.requests == 24
    assert batch_est.cost_usd == pytest.approx(online_est.cost_usd / 2)
    custom = spec(fault, batch_prices={"prompt": 1.0, "completion": 1.0})
    est = respond_pipeline(rows, custom).estimate(tmp_path / "c").step("respond")
    assert est.cost_usd == pytest.approx((est.prompt_tokens + est.completion_tokens) / 1e6)
    assert routes(fault) == {}  # an estimate sends nothing


def test_config_and_the_steps_that_refuse_batch_mode(fault: FaultServer) -> None:
    from thresher.generators import EvolInstruct, SelfInstruct
    from thresher.generators.responder import Respond

    b = make_backend(spec(fault))
    assert isinstance(b, OpenAIBatch) and b.identity() == make_backend({"kind": "openai", "model": "fake-model"}).identity()
    assert b.request_prices() == {"prompt": 1.5, "completion": 6.0}
    for bad, match in (({"batch": "slurm"}, r"batch must be"), ({"on_batch_error": "retry"}, r"on_batch_error"),
                       ({"batch_max_bytes": 10}, r"batch_max_bytes")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            make_backend(spec(fault, **bad))
    with pytest.raises(ConfigError, match=r"SelfInstruct: backend runs in Batch API mode.*depends on the answers"):
        SelfInstruct(backend=spec(fault), num_instructions=4).check()
    Respond(backend=spec(fault)).check()
    EvolInstruct(backend=spec(fault), rounds=1).check()


def _online_and_batch(fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Any) -> tuple[Any, Any, dict[str, int]]:
    """`run(spec, folder)` with the online backend, then in batch mode, each with a fresh request cache; the batch
    run's HTTP calls by route."""
    out = []
    for mode in ("online", "batch"):
        monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / f"{mode}.sqlite"))
        backend = spec(fault) if mode == "batch" else {k: v for k, v in spec(fault).items() if not k.startswith("batch")}
        fault.reset()
        out.append(run(backend, tmp_path / mode))
    return out[0], out[1], routes(fault)


def test_evol_instruct_rounds_in_batch_mode_give_what_online_gives(
    fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_generators_evol_instruct import en_script, rows

    from thresher.generators import EvolInstruct

    fault.configure(script=en_script())
    data = rows(*(f"Name {i} rivers." for i in range(12)), "Say it [sorry].", "Keep it [equal].")
    online, batch, got = _online_and_batch(
        fault, tmp_path, monkeypatch, lambda b, _: EvolInstruct(backend=b, rounds=2, seed=3).apply(data))
    for side in ("output", "rejected", "failed"):
        assert getattr(batch, side).to_pylist() == getattr(online, side).to_pylist(), side
    assert online.rows_rejected > 0  # the comparison covers elimination, not only accepted rows
    # per round: evolve, then equality check and answer; every request went out in a job
    assert "POST /v1/chat/completions" not in got and got["POST /v1/batches"] >= 4
    assert batch.metrics["batch_requests"] == online.metrics["requests"]


def test_respond_then_judge_in_batch_mode_give_what_online_gives(
    fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thresher.scorers import LLMJudge

    fault.configure(script=[Rule(match=r"(?s)\[The user's request\]\n[^\n]*[02468]\b", reply="Score: 4.5\nFine."),
                            Rule(match=r"\[The user's request\]", reply="2\nWrong.")], unmatched="echo")  # fmt: skip
    rows = write_rows(tmp_path / "rows.jsonl", 30)

    def run(backend: dict[str, Any], folder: Path) -> Any:
        pipe = respond_pipeline(rows, backend)
        pipe.add(LLMJudge(backend=backend, dimensions=["accuracy", "helpfulness"], batch_size=8), name="judge",
                 after=["respond"])  # fmt: skip
        return pipe.run(folder, progress=False)

    online, batch, got = _online_and_batch(fault, tmp_path, monkeypatch, run)
    for side in ("table", "rejected", "failed"):
        assert getattr(batch, side)("judge").to_pylist() == getattr(online, side)("judge").to_pylist(), side
    assert sorted(batch.table("judge").column("judge_accuracy").to_pylist()) == [2.0] * 15 + [4.5] * 15
    # one job per step: 30 answers, then 60 judgements (two dimensions) once every answer was there
    assert (got["POST /v1/batches"], fault.stats()["batch_lines"]) == (2, 90)
    assert batch.metrics("judge")["cost_usd"] == pytest.approx(online.metrics("judge")["cost_usd"] / 2)


def test_tagger_a_whole_table_step_with_reasks_in_batch_mode(
    fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thresher.data.steps import Load
    from thresher.pipelines.dag import Pipeline
    from thresher.scorers import Tagger

    def tags(*names: str) -> dict[str, Any]:
        return {"tags": [{"tag": n, "explanation": "because"} for n in names]}

    fault.configure(script=[Rule(match=r"\[Request\]\nR1\b", json=tags("Math", "Poem Writing")),
                            Rule(match=r"\[Request\]\nR2\b", json=tags("mathematics", "History")),
                            Rule(match=r"\[Request\]\nR3\b", reply="I think it is about math.")])  # fmt: skip
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"R{i} a request", "output": "x"}) + "\n"
                            for i in (1, 2, 3)))  # fmt: skip

    def run(backend: dict[str, Any], folder: Path) -> Any:
        pipe = Pipeline("tags")
        pipe.add(Load(path=rows), name="load")
        embedder = {"kind": "openai", "base_url": fault.base_url, "model": "emb"}  # unused: no merging
        pipe.add(Tagger(backend=backend, embedder=embedder, merge_similarity=None, min_count=1), name="tag",
                 after=["load"])  # fmt: skip
        return pipe.run(folder, progress=False)

    online, batch, got = _online_and_batch(fault, tmp_path, monkeypatch, run)
    for side in ("table", "failed"):
        assert getattr(batch, side)("tag").to_pylist() == getattr(online, side)("tag").to_pylist(), side
    assert batch.failed("tag").column("id").to_pylist() == ["r3"]  # never JSON, even when re-asked
    # the first answers, then a re-ask of R3, then the second re-ask: each needs the answer before it
    assert "POST /v1/chat/completions" not in got and got["POST /v1/batches"] == 3
    assert batch.metrics("tag")["reasks"] == online.metrics("tag")["reasks"] == 2


def test_realign_with_two_samples_per_request_in_batch_mode(
    fault: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    from test_rewriters_realign import GOOD_MATH, MATH, SHORT_MATH, at

    from thresher.rewriters import ReAlign

    fault.configure(script=[Rule(match=at("Q1"), reply=[SHORT_MATH, GOOD_MATH]), Rule(match=at("Q2"), reply="72.")])
    table = pa.table({"id": ["r1", "r2"], "instruction": ["Q1: How many clips?", "Q2: And now?"], "output": [MATH, MATH]})
    online, batch, got = _online_and_batch(
        fault, tmp_path, monkeypatch, lambda b, _: ReAlign(backend=b, task="math_problem", n=2).apply(table))
    assert batch.output.to_pylist() == online.output.to_pylist()
    assert batch.output.column("output").to_pylist()[0] == GOOD_MATH  # the longer of the two samples of one line
    assert batch.output.column("realign_status").to_pylist()[1] != "rewritten"  # "72." fails a check
    assert (got["POST /v1/batches"], fault.stats()["batch_lines"]) == (1, 2)  # n=2: one line asks for both samples


def test_batch_mode_needs_the_request_cache(fault: FaultServer, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", 3)
    with pytest.raises(ConfigError, match="batch mode needs the request cache"):
        respond_pipeline(rows, spec(fault, cache=False)).run(tmp_path / "run", progress=False)
    assert routes(fault) == {}


def test_max_cost_usd_stops_before_the_next_job(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    from thresher.errors import BudgetExceeded
    from thresher.scorers import LLMJudge

    fault.configure(script=[Rule(match=r"\[The user's request\]", reply="Score: 4\nFine.")], unmatched="echo")
    rows = write_rows(tmp_path / "rows.jsonl", 20)

    def pipe(budget: float) -> Any:
        backend = spec(fault, max_cost_usd=budget)
        p = respond_pipeline(rows, backend)
        p.add(LLMJudge(backend=backend), name="judge", after=["respond"])
        return p

    respond_cost = (20 * 2 * 1.5 + 20 * 4 * 6.0) / 1e6
    with pytest.raises(BudgetExceeded, match="max_cost_usd"):
        pipe(respond_cost / 2).run(tmp_path / "run", progress=False)
    assert routes(fault)["POST /v1/batches"] == 1  # Respond's job ran (nothing was spent before it); the judge's did not
    fault.reset()
    res = pipe(1.0).run(tmp_path / "run", progress=False)
    assert routes(fault)["POST /v1/batches"] == 1 and res.table("judge").num_rows == 20
    assert res.metrics("respond")["cost_usd"] == pytest.approx(respond_cost)


@pytest.mark.parametrize("on_error", ["fail", "online"])
def test_a_failed_job_fails_every_row_or_sends_them_online(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path, on_error: str
) -> None:
    fault.configure(batch_outcome="failed")
    rows = write_rows(tmp_path / "rows.jsonl", 6)
    res = respond_pipeline(rows, spec(fault, on_batch_error=on_error)).run(tmp_path / "run", progress=False)
    if on_error == "fail":
        errors = res.failed("respond").column("error").to_pylist()
        assert len(errors) == 6 and all("(failed): the job failed: the job failed (batch_outcome='failed')" in e
                                        for e in errors)  # fmt: skip
    else:
        assert res.table("respond").num_rows == 6 and routes(fault)["POST /v1/chat/completions"] == 6


def test_the_server_validates_a_job_file_line_by_line(fault: FaultServer) -> None:
    from thresher.llms.batch import BatchApi
    from thresher.llms.limits import RetryPolicy

    api = BatchApi(fault.base_url, None, None, RetryPolicy(0), 10.0)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    bad = [line, line, {**line, "custom_id": "b", "url": "/v1/completions"}, {**line, "custom_id": "c", "body": {}}]
    up = api.upload("bad.jsonl", "".join(json.dumps(x) + "\n" for x in bad).encode() + b"not json\n")
    job = api.json("POST", "/batches", {"input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"})  # fmt: skip
    assert job["status"] == "validating"
    done = api.json("GET", f"/batches/{job['id']}")
    assert done["status"] == "failed"
    assert [e["line"] for e in done["errors"]["data"]] == [2, 3, 4, 5]
    assert "used twice" in done["errors"]["data"][0]["message"]
    with pytest.raises(BackendError, match="completion_window must be '24h'"):
        api.json("POST", "/batches", {"input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                                      "completion_window": "1h"})  # fmt: skip


def test_two_calls_at_once_share_one_job(fault: FaultServer, tmp_path: Path, isolated_cache: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fault.configure(batch_polls=3)
    b = make_backend(spec(fault, batch_dir=str(tmp_path / "b")))
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(10)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: b.chat(c, max_tokens=8), [convs, convs[5:]]))
    assert [r.text for r in got[0]] == [f"reply to: question {i}" for i in range(10)]
    assert [r.text for r in got[1]] == [f"reply to: question {i}" for i in range(5, 10)]
    jobs = routes(fault)["POST /v1/batches"]
    # the second call found its requests in the first call's job (or the other way round): each line asked once
    assert fault.stats()["batch_lines"] == 10 and jobs in (1, 2)
    assert b.usage.batch_requests == 10 and b.usage.prompt_tokens == 20
