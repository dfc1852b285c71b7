"""The Respond step: configuration from YAML-able specs, fingerprints, per-row errors, secrets that never leak,
and a pipeline killed with `kill -9` half-way that re-sends at most `max_concurrency` requests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from llm_servers import kill_9_when

from thresher.errors import ConfigError
from thresher.generators import Respond, row_messages
from thresher.llms import LlamaCpp, OpenAICompatible, make_backend
from thresher.llms.testing import FaultServer
from thresher.pipelines import Generator

pytestmark = pytest.mark.usefixtures("isolated_cache")
REPO = Path(__file__).resolve().parent.parent


def spec(server: FaultServer, **kw: object) -> dict[str, object]:
    return {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "retry_base_delay": 0.01, **kw}


def test_row_messages_follow_the_alpaca_layout() -> None:
    msgs = row_messages("Summarise.", "Some text.", None, [["hi", "hello"]], system_prompt="Be brief.")
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Summarise.\nSome text."},
    ]
    assert row_messages("Q", "", "Own system")[0] == {"role": "system", "content": "Own system"}


def test_specs_and_fingerprints(fault: FaultServer) -> None:
    a = Respond(backend=spec(fault, max_concurrency=8), api_key="sk-one")
    knobs = a.clone(
        backend=spec(fault, max_concurrency=64, base_url="http://127.0.0.1:9/v1", timeout=5),
        api_key="sk-two",
        batch_size=7,
    )
    assert a.fingerprint() == knobs.fingerprint()  # where, how fast and which key: not what
    assert a.fingerprint() != a.clone(backend=spec(fault, model="other")).fingerprint()
    assert a.fingerprint() != a.clone(temperature=0.1).fingerprint()
    assert "sk-one" not in repr(a) and a.public_params()["api_key"] == "***"
    assert isinstance(make_backend(None), LlamaCpp) and isinstance(make_backend(spec(fault)), OpenAICompatible)
    with pytest.raises(ConfigError, match="valid kinds"):
        make_backend({"kind": "gpt5"})
    with pytest.raises(ConfigError, match="no parameter"):
        make_backend({"kind": "openai", "model": "m", "temprature": 1})
    with pytest.raises(ConfigError, match="must not be written in a spec"):
        Respond(backend={"kind": "openai", "model": "m", "api_key": "sk-x"}).check()
    with pytest.raises(ConfigError, match="no API key"):
        Respond(backend={"kind": "openai", "model": "gpt-4o-mini", "api_key_env": "THRESHER_TEST_NO_SUCH_KEY"}).check()


def test_recipe_yaml_builds_the_step(fault: FaultServer, tmp_path: Path) -> None:
    from thresher.pipelines.recipe import dump_recipe, recipe_from_text

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}", "input": "", "output": None}) + "\n" for i in range(3)))
    recipe = f"""
name: respond
steps:
  load:
    step: Load
    params: {{path: {data}}}
  answer:
    step: Respond
    params:
      backend: {{kind: openai, base_url: "{fault.base_url}", model: fake-model}}
      max_tokens: 16
"""
    pipe = recipe_from_text(recipe)
    result = pipe.run(tmp_path / "run", progress=False)
    assert result.table("answer").column("output").to_pylist() == ["reply to: Q0", "reply to: Q1", "reply to: Q2"]
    assert "fake-model" in dump_recipe(pipe)


def test_respond_rows_errors_and_metrics(fault: FaultServer) -> None:
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "instruction": ["Say hi", "Explode [[fail]]", "   ", "Say bye"],
            "input": ["", "", "", "politely"],
            "system": [None, None, None, "Be kind."],
            "output": [None, None, None, "kept"],
        }
    )
    step = Respond(backend=spec(fault, max_retries=1), max_tokens=30, temperature=0.0)
    res = step.apply(table)
    assert res.rows_in == 4 and res.rows_out + res.rows_failed == 4
    assert res.output.column("id").to_pylist() == ["a", "d"]
    assert res.output.column("output").to_pylist() == ["reply to: Say hi", "reply to: Say bye politely"]
    errors = dict(zip(res.failed.column("id").to_pylist(), res.failed.column("error").to_pylist(), strict=True))
    assert "row id='b'" in errors["b"] and "HTTP 500" in errors["b"]
    assert "instruction is empty" in errors["c"]
    body = next(b for b in fault.stats()["bodies"] if "bye" in json.dumps(b))
    assert body["messages"][0] == {"role": "system", "content": "Be kind."} and body["temperature"] == 0.0
    m = res.metrics
    assert m["requests"] == 4 and m["completion_tokens"] > 0 and m["errors"] == 1 and "cost_usd" in m
    only = Respond(backend=spec(fault), only_missing=True).apply(table.slice(3, 1))
    assert only.output.column("output").to_pylist() == ["kept"]


def test_api_key_never_reaches_cache_logs_manifest_or_outputs(
    fault: FaultServer,
    tmp_path: Path,
    isolated_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from thresher.pipelines.dag import Pipeline

    env_key, param_key = "sk-env-SECRET-8f3a9c", "sk-param-SECRET-1b7e44"
    monkeypatch.setenv("THRESHER_TEST_KEY", env_key)
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "instruction": f"Q{i}" + (" [[500x1]]" if i == 1 else "")}) + "\n"
            for i in range(6)
        )
    )
    from thresher.data.steps import Load

    pipe = Pipeline("secrets")
    pipe.add(Load(path=data), name="load")
    pipe.add(
        Respond(backend=spec(fault, api_key_env="THRESHER_TEST_KEY"), max_tokens=8), name="env_key", after=["load"]
    )
    pipe.add(Respond(backend=spec(fault), api_key=param_key, max_tokens=9), name="param_key", after=["load"])
    pipe.run(tmp_path / "run", progress=True)
    auth = fault.stats()["authorization"]
    assert auth.get(f"Bearer {env_key}", 0) >= 6 and auth.get(f"Bearer {param_key}", 0) >= 6  # the keys were used
    out, err = capfd.readouterr()
    haystacks = {"logs": caplog.text, "stdout": out, "stderr": err}
    for p in [*(tmp_path / "run").rglob("*"), *isolated_cache.parent.glob(isolated_cache.name + "*")]:
        if p.is_file():
            haystacks[str(p)] = p.read_bytes().decode("latin-1")
    for key in (env_key, param_key):
        for where, text in haystacks.items():
            assert key not in text, f"the API key leaked into {where}"
    assert "SECRET" not in json.dumps(json.loads((tmp_path / "run" / "manifest.json").read_text()))


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from thresher.data.steps import Load
    from thresher.generators import Respond
    from thresher.pipelines.dag import Pipeline

    base_url, work = sys.argv[1], Path(sys.argv[2])
    pipe = Pipeline("kill9")
    pipe.add(Load(path=work / "rows.jsonl"), name="load")
    backend = {"kind": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 64}
    pipe.add(Respond(backend=backend, max_tokens=16, batch_size=500), name="respond", after=["load"])
    pipe.run(work / "run", progress=False)
    """
)


def test_kill_9_mid_step_resends_at_most_max_concurrency(
    fault: FaultServer, tmp_path: Path, isolated_cache: Path
) -> None:
    fault.configure(latency=0.2)
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "instruction": f"question {i}"}) + "\n" for i in range(500))
    )
    script = tmp_path / "run_pipeline.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "THRESHER_CACHE": str(isolated_cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script), fault.base_url, str(tmp_path)]
    first = kill_9_when(subprocess.Popen(cmd, env=env), fault, 250)  # half-way: ~250 answered or in flight
    assert first < 500
    fault.reset()
    subprocess.run(cmd, env=env, check=True, timeout=120)
    second = fault.stats()["total"]
    resent = first + second - 500
    print(f"kill -9 after {first} requests; the rerun sent {second}; re-sent {resent} (max_concurrency 64)")
    assert 0 <= resent <= 64
    import pyarrow.parquet as pq

    out_dir = next((tmp_path / "run" / "steps").glob("respond-*")) / "output"
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("*.parquet"))])
    assert table.num_rows == 500
    assert sorted(table.column("output").to_pylist()) == sorted(f"reply to: question {i}" for i in range(500))


@pytest.mark.slow
def test_respond_with_the_embedded_default() -> None:
    pytest.importorskip("llama_cpp")
    res = Respond(max_tokens=4, temperature=0.0).apply(pa.table({"instruction": ["Name a colour.", "Say hi."]}))
    assert res.rows_out == 2 and all(res.output.column("output").to_pylist())
    assert res.metrics["requests"] == 2


def test_request_window_stays_full_across_batch_boundaries(fault: FaultServer, tmp_path: Path) -> None:
    """A step of many batches keeps max_concurrency requests in flight, not one batch's worth that drains to zero
    at every batch end: with 16 rows per batch and a window of 24, the server must see 24 at once."""
    from thresher.pipelines import Pipeline

    fault.configure(latency=0.15)
    n, bs, window = 192, 16, 24
    table = pa.table({"id": [f"r{i}" for i in range(n)], "instruction": [f"question {i}" for i in range(n)]})
    pipe = Pipeline()
    src = pipe.add(_Rows(rows=table.to_pylist()), name="rows")
    pipe.add(Respond(backend=spec(fault, max_concurrency=window), max_tokens=8, batch_size=bs), name="answer",
             after=[src])
    result = pipe.run(tmp_path / "run", progress=False)
    st = fault.stats()
    assert st["peak_in_flight"] == window  # more than one batch (16) in flight, never more than the window
    assert result.table("answer").column("output").to_pylist() == [f"reply to: question {i}" for i in range(n)]


class _Rows(Generator):
    outputs = ("id", "instruction")

    def __init__(self, *, rows: list[dict[str, str]]):
        self.rows = rows

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        return pa.Table.from_pylist(self.rows)


# ---- n candidates per row -------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_n", [False, True])
def test_respond_n_candidates_and_the_pick_rule(fault: FaultServer, ignore_n: bool) -> None:
    """n samples per row; `pick` keeps the first, the longest (the first of equals), or all of them (`outputs`, with
    `output` = the first). A server that answers one choice whatever n asks (llama.cpp's) is asked for the rest, with
    seed + sample index, so seeded samples differ."""
    from thresher.llms.testing import Rule

    fault.configure(ignore_n=ignore_n, script=[
        Rule(match="tie", role="last_user", reply=["four", "five", "nine"]),
        Rule(match=".", role="last_user", reply=["short", "the longest answer", "a mid answer"]),
    ])  # fmt: skip
    table = pa.table({"id": ["a", "b", "t"], "instruction": ["Q1", "Q2 [[fail]]", "tie"]})
    got = {}
    for pick in ("first", "longest", "all"):
        res = Respond(backend=spec(fault, max_retries=0), n=3, pick=pick, temperature=0.9, seed=0).apply(table)
        assert res.rows_out == 2 and res.failed.column("id").to_pylist() == ["b"]  # a failed request fails the row
        got[pick] = res.output
    assert got["first"].column("output").to_pylist() == ["short", "four"]
    assert got["longest"].column("output").to_pylist() == ["the longest answer", "four"]
    assert got["all"].column("output").to_pylist() == ["short", "four"]
    assert got["all"].column("outputs").to_pylist() == [["short", "the longest answer", "a mid answer"],
                                                        ["four", "five", "nine"]]
    assert "outputs" not in got["first"].column_names
    # one request per row, or one per sample where n is ignored; the later picks found every sample in the cache
    # (the failing row is asked again each time: failures are not cached)
    assert fault.stats()["total"] == (2 * 3 if ignore_n else 2) + 3


def test_respond_n_parameters_and_fingerprints(fault: FaultServer) -> None:
    one = Respond(backend=spec(fault))
    # n=1 keeps the fingerprint Respond had before `n` existed: pick cannot matter then, unless it adds `outputs`
    assert one.fingerprint() == one.clone(pick="longest").fingerprint()
    assert one.fingerprint() != one.clone(pick="all").fingerprint()
    assert one.fingerprint() != one.clone(n=2).fingerprint() != one.clone(n=2, pick="longest").fingerprint()
    assert one.clone(pick="all").writes() == ("output", "outputs") and one.writes() == ("output",)
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        one.clone(n=0).check()
    with pytest.raises(ConfigError, match=r"unknown pick 'best'.*'longest'"):
        one.clone(pick="best").check()
    with pytest.raises(ConfigError, match="at temperature 0"):
        one.clone(n=2, temperature=0.0).check()
