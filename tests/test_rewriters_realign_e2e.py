"""ReAlign end to end against the real llama.cpp server (bundled SmolLM2-135M) on Natural Questions rows from the
ReAlign project's factuality set, with evidence from a real BM25 index over a small local corpus built here from
the ChatGPT answers in ../shared/data: every row is either rewritten or carries the reason it was kept, and the
share rewritten and kept per check is printed, so the small model's behaviour can be read off a test run.

The rows are open questions (the ReAlign data labels them open_qa), so the task is fixed (`task="open_qa"`): the
classifier has its own evaluation. The response to rewrite is the gold short answer ("the 1830s"), which the open
QA format asks to back with facts: the evidence and the answer check (a number must survive) both matter there.
`THRESHER_E2E_ROWS` changes the number of rows (default 15: about 2-3 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from thresher.data.steps import Load
from thresher.pipelines import Pipeline
from thresher.rewriters import BM25Retriever, ReAlign

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


def nq_rows(path: Path) -> list[dict[str, str]]:
    return [{"id": f"nq{r['id']}", "instruction": r["items"][0]["value"], "input": "", "output": r["items"][1]["value"]}
            for r in json.loads(path.read_text(encoding="utf-8"))]  # fmt: skip


def test_realign_on_nq_rows_with_bm25_evidence(llama_server: str, shared_data: Path, tmp_path: Path) -> None:
    n_rows = int(os.environ.get("THRESHER_E2E_ROWS", "15"))
    realign = shared_data / "realign"
    rows = nq_rows(realign / "nq_factuality_100.json")[:n_rows]
    data = tmp_path / "nq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # the corpus: ChatGPT's answers to all 100 questions, as an alpaca JSONL file a user might have
    corpus = tmp_path / "corpus" / "chatgpt_answers.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps(r) + "\n" for r in nq_rows(realign / "nq_factuality_100_ChatGPT_response.json")),
                      encoding="utf-8")  # fmt: skip
    retriever = BM25Retriever(corpus=str(corpus.parent), fields=["output"], index_dir=tmp_path / "indexes")

    served = {"kind": "openai", "base_url": llama_server, "model": "smollm2", "max_concurrency": 4}
    pipe = Pipeline("realign")
    pipe.add(Load(path=str(data)), name="load")
    pipe.add(ReAlign(backend=served, task="open_qa", retriever=retriever, top_k=2, n=2, max_tokens=96),
             name="realign", after=["load"])  # fmt: skip
    run = pipe.run(tmp_path / "run", progress=False)

    rec = run.steps["realign"]
    print(f"\n[realign] {rec.rows_in} rows in, {rec.rows_out} out, {rec.rows_failed} failed, {rec.seconds:.1f} s")
    if rec.rows_failed:
        for err in run.failed("realign").column("error").to_pylist():
            print(f"  failed: {err[:200]}")
    assert rec.rows_in == n_rows == rec.rows_out and rec.rows_failed == 0 and rec.rows_rejected == 0
    out = run.table("realign").to_pylist()
    by_id = {r["id"]: r for r in rows}
    verdicts: Counter[str] = Counter()
    own_answer_first = 0
    for r in out:
        status = r["realign_status"]
        assert status == "rewritten" or status.startswith("kept: "), status
        if status == "rewritten":
            verdicts["rewritten"] += 1
            assert r["output_original"] == by_id[r["id"]]["output"] and r["output"] != r["output_original"]
        else:
            rule, _, why = status[len("kept: ") :].partition(": ")
            assert rule in ("truncated", "length", "code", "answer", "scaffolding") and why, status
            verdicts[rule] += 1
            assert r["output"] == by_id[r["id"]]["output"] and r["output_original"] is None
        assert r["realign_evidence"], f"{r['id']}: no evidence for an open_qa row"
        own_answer_first += r["realign_evidence"][0]["source"].endswith(f"(id={r['id']!r})")
    # BM25 finds the ChatGPT answer to the same question first for most rows
    assert own_answer_first >= 0.7 * n_rows, own_answer_first
    m = run.metrics("realign")
    assert m["rewritten"] == verdicts["rewritten"] and sum(m["kept_by"].values()) == n_rows - verdicts["rewritten"]
    print(f"  rewritten: {verdicts['rewritten']}/{n_rows} ({verdicts['rewritten'] / n_rows:.0%})")
    for rule in ("truncated", "length", "code", "answer", "scaffolding"):
        print(f"  kept by {rule}: {verdicts[rule]}/{n_rows} ({verdicts[rule] / n_rows:.0%})")
    print(f"  evidence: its own question's ChatGPT answer ranked first for {own_answer_first}/{n_rows} rows")
    for r in out[:3]:
        print(f"  {r['id']} {r['instruction'][:50]!r}: {r['realign_status'][:120]}\n    -> {r['output'][:200]!r}")
