"""LLMJudge, DeitaScorer and Tagger end to end against the real llama.cpp server (bundled SmolLM2-135M) in one
pipeline run: every row accounted for, scores on their scales, and the per-step figures printed (the score
distributions, replies without a score, the tags found) so the 135M model's behaviour can be read off a test run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thresher.data.steps import Load
from thresher.pipelines import Pipeline
from thresher.scorers import DeitaScorer, LLMJudge, Tagger

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


def sample_rows(shared_data: Path) -> list[dict[str, str]]:
    demo = json.loads((shared_data / "llama-factory-demo" / "alpaca_en_demo.json").read_text())
    rows = [{k: demo[i][k] for k in ("instruction", "input", "output")} for i in (1, 3, 8)]
    rows.append({"instruction": "What is 7 times 8?", "input": "", "output": "7 times 8 is 54."})  # a wrong answer
    return [{**r, "output": r["output"][:400]} for r in rows]


def test_judge_deita_and_tagger_on_the_bundled_model(llama_server: str, shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(shared_data)))
    # llama.cpp's server refuses a json_schema response_format (json_mode auto would step down after one refusal);
    # {"type": "json_object", "schema": ...} is the form it turns into a grammar
    served = {"kind": "openai", "base_url": llama_server, "model": "smollm2", "max_concurrency": 2,
              "json_mode": "object+schema"}  # fmt: skip
    pipe = Pipeline("score")
    pipe.add(Load(path=str(data)), name="load")
    pipe.add(LLMJudge(backend=served, expected_scores=True, max_tokens=24), name="judge", after=["load"])
    pipe.add(DeitaScorer(backend=served), name="deita", after=["load"])
    pipe.add(Tagger(backend=served, max_tokens=128), name="tagger", after=["load"])
    run = pipe.run(tmp_path / "run", progress=False)

    for name in ("judge", "deita", "tagger"):
        rec = run.steps[name]
        assert rec.rows_in == 4 and rec.rows_in == rec.rows_out + rec.rows_failed and rec.rows_rejected == 0
        print(f"\n[{name}] rows out {rec.rows_out}, failed {rec.rows_failed}, {rec.seconds:.1f} s")
        if rec.rows_failed:
            for err in run.failed(name).column("error").to_pylist():
                print(f"  failed: {err[:200]}")

    judge = run.table("judge").to_pylist()
    for r in judge:
        assert 0 <= r["judge_accuracy"] <= 5
        assert r["judge_accuracy_expected"] is None or 0 <= r["judge_accuracy_expected"] <= 5
        print(f"  judge {r['instruction'][:40]!r}: {r['judge_accuracy']} (expected {r['judge_accuracy_expected']})")
    print("  judge figures:", run.metrics("judge")["dimensions"])

    deita = run.table("deita").to_pylist()
    assert deita, "the server's top_logprobs gave no DEITA score at all"
    for r in deita:
        assert 1 <= r["deita_complexity"] <= 6 and 1 <= r["deita_quality"] <= 6
        assert r["deita_score"] == pytest.approx(r["deita_complexity"] * r["deita_quality"])
        print(f"  deita {r['instruction'][:40]!r}: complexity {r['deita_complexity']:.3f}, "
              f"quality {r['deita_quality']:.3f}")  # fmt: skip
    print("  deita figures:", run.metrics("deita")["deita"])

    tagged = run.table("tagger").to_pylist()
    for r in tagged:
        assert r["n_tags"] == len(r["tags"])
        print(f"  tags {r['instruction'][:40]!r}: {r['tags']}")
    figures = run.metrics("tagger")["tags"]
    print("  tag figures:", figures)
    assert sum(figures["vocabulary"].values()) == sum(r["n_tags"] for r in tagged)
