"""Decontaminate on the cherry-llm Alpaca rows against all five cherry-llm test sets, with planted copies and
paraphrases: which ones n-grams catch, which need the embedding route; Chinese by characters; bad benchmark files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest

from thresher.errors import ConfigError, RecordError
from thresher.filters import Decontaminate


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def benchmarks(shared: Path) -> list:
    d = shared / "cherry-llm"
    return [
        str(d / "koala_test_set.jsonl"),  # prompt/completion layout: read as records
        str(d / "sinstruct_test_set.jsonl"),  # Self-Instruct layout: instruction, instances
        {"path": str(d / "vicuna_test_set.jsonl"), "fields": ["text"]},  # no known layout: name the text keys
        {"path": str(d / "wizardlm_test_set.jsonl"), "fields": ["Instruction"]},
        {"path": str(d / "lima_test_set.jsonl"), "fields": ["conversations"]},  # a string, not a message list
    ]


def alpaca(shared: Path, limit: int | None = None) -> list[dict]:
    rows = json.loads((shared / "cherry-llm" / "cherry_alpaca_5_percent.json").read_text())[:limit]
    return [{"id": f"a{i}", **r} for i, r in enumerate(rows)]


def planted(shared: Path) -> tuple[list[dict], dict[str, tuple[str, int]]]:
    """Rows made from benchmark records, and the (file name, record) each must be traced to."""
    d = shared / "cherry-llm"
    koala, vicuna = _jsonl(d / "koala_test_set.jsonl"), _jsonl(d / "vicuna_test_set.jsonl")
    wizard, sinstruct = _jsonl(d / "wizardlm_test_set.jsonl"), _jsonl(d / "sinstruct_test_set.jsonl")
    lima = _jsonl(d / "lima_test_set.jsonl")
    short_koala = next(i for i, r in enumerate(koala) if 4 <= len(r["prompt"].split()) < 8)
    vic = next(i for i, r in enumerate(vicuna) if 8 <= len(r["text"].split()) < 13)
    long_si = next(i for i, r in enumerate(sinstruct) if len(r["instruction"].split()) > 30)
    words = sinstruct[long_si]["instruction"].split()
    rows = [
        # exact copies
        {"id": "p-koala", "instruction": koala[2]["prompt"], "input": "", "output": "..."},
        {"id": "p-koala-short", "instruction": koala[short_koala]["prompt"], "input": "", "output": "..."},
        {"id": "p-vicuna-inside", "instruction": f"Answer briefly. {vicuna[vic]['text']} Use bullet points.",
         "input": "", "output": "..."},
        {"id": "p-wizard-in-output", "instruction": "Repeat the question.", "input": "",
         "output": "The question was: " + wizard[40]["Instruction"]},
        # paraphrases that keep a 13-word run: a new opening, and changed case and punctuation
        {"id": "p-sinstruct-reworded-start", "instruction": "Kindly, " + " ".join(["please", *words[3:]]),
         "input": "", "output": "..."},
        {"id": "p-lima-shouted", "instruction": lima[5]["conversations"][:400].upper().replace(",", " ;"),
         "input": "", "output": "..."},
    ]
    where = {
        "p-koala": ("koala_test_set.jsonl", 3),
        "p-koala-short": ("koala_test_set.jsonl", short_koala + 1),
        "p-vicuna-inside": ("vicuna_test_set.jsonl", vic + 1),
        "p-wizard-in-output": ("wizardlm_test_set.jsonl", 41),
        "p-sinstruct-reworded-start": ("sinstruct_test_set.jsonl", long_si + 1),
        "p-lima-shouted": ("lima_test_set.jsonl", 6),
    }
    return rows, where


# A paraphrase that changes a word every few words keeps no 13-word run: n-grams cannot see it.
VICUNA_1 = "How can I improve my time management skills?"
SYNONYMS = "What are some ways I could get better at managing my time?"


def test_planted_copies_on_the_cherry_test_sets(shared_data: Path) -> None:
    rows, where = planted(shared_data)
    data = alpaca(shared_data) + rows
    step = Decontaminate(benchmarks=benchmarks(shared_data))
    t0 = time.perf_counter()
    res = step.apply(data)
    seconds = time.perf_counter() - t0
    rejected = {r["id"]: r for r in res.rejected.to_pylist()}
    for rid, (name, record) in where.items():
        assert rid in rejected, f"{rid} was not caught"
        r = rejected[rid]
        assert Path(r["benchmark_file"]).name == name and r["benchmark_record"] == record, r["reason"]
        assert r["benchmark_text"] and r["matched_field"] and r["matched_ngram"]
    assert rejected["p-koala"]["reason"].startswith("instruction shares the 13-word n-gram ")
    assert rejected["p-koala-short"]["reason"].startswith("instruction equals ")
    assert rejected["p-vicuna-inside"]["reason"].startswith("instruction contains the whole of ")
    assert rejected["p-wizard-in-output"]["matched_field"] == "output"
    assert rejected["p-lima-shouted"]["matched_ngram"] == rejected["p-lima-shouted"]["matched_ngram"].lower()
    # the real Alpaca rows: only genuine overlaps go (a LIMA prompt asks for the same knight story word for word)
    natural = sorted(r for r in rejected if not r.startswith("p-"))
    print(f"\nDecontaminate: {len(data)} rows against the 5 cherry test sets ({res.metrics['benchmark_texts']} texts) "
          f"in {seconds:.2f} s (index {res.metrics['index_seconds']:.2f} s); natural overlaps: "
          + "; ".join(f"{r}: {rejected[r]['reason'][:90]}" for r in natural))
    assert natural == ["a2996"] and "brave knight" in rejected["a2996"]["matched_ngram"]
    assert res.rows_out + res.rows_rejected == len(data)
    assert set(res.output.column("benchmark_file").to_pylist()) == {None}
    assert seconds < 30


def test_paraphrases_need_the_embedding_route(shared_data: Path) -> None:
    d = shared_data / "cherry-llm"
    data = [*alpaca(shared_data, 200),
            {"id": "p-synonyms", "instruction": SYNONYMS, "input": "", "output": "Plan your day."}]
    bench = [{"path": str(d / "vicuna_test_set.jsonl"), "fields": ["text"]}]
    by_ngrams = Decontaminate(benchmarks=bench).apply(data)
    assert "p-synonyms" in by_ngrams.output.column("id").to_pylist()  # no 13-word run, not the whole question
    res = Decontaminate(benchmarks=bench, embedding_threshold=0.75).apply(data)
    rejected = {r["id"]: r for r in res.rejected.to_pylist()}
    assert "p-synonyms" in rejected, res.output.filter(pa.compute.equal(res.output.column("id"), "p-synonyms"))
    r = rejected["p-synonyms"]
    assert r["benchmark_record"] == 1 and r["benchmark_text"] == VICUNA_1 and r["matched_ngram"] is None
    assert r["reason"].startswith("prompt has cosine similarity ") and r["benchmark_similarity"] >= 0.75
    # every row knows its nearest benchmark prompt's cosine: re-thresholding needs no new embeddings
    sims = res.output.column("benchmark_similarity").to_pylist()
    assert all(s is not None and s < 0.75 for s in sims)
    assert res.metrics["removed_by_embedding"] >= 1


def test_chinese_by_characters(tmp_path: Path) -> None:
    bench = tmp_path / "zh_bench.jsonl"
    question = "请解释为什么天空在白天是蓝色的而日落时会变成红色或橙色"  # 27 characters
    short = "请把下面这句话翻译成英文"  # 12 characters
    bench.write_text("\n".join(json.dumps({"instruction": q}, ensure_ascii=False) for q in (question, short)))
    rows = [
        {"id": "copy-inside", "instruction": f"老师问：{question[:22]}？请简要回答。", "input": ""},  # 22 in a row
        {"id": "short-inside", "instruction": f"任务：{short}：今天天气很好。", "input": ""},  # contains all 12
        {"id": "nineteen", "instruction": f"问题：{question[:19]}。", "input": ""},  # 19 < 20 characters
        {"id": "punctuated", "instruction": "，".join(question[i : i + 5] for i in range(0, 27, 5)), "input": ""},
        {"id": "unrelated", "instruction": "写一首关于春天的诗，要求押韵并且不少于八行。", "input": ""},
    ]
    res = Decontaminate(benchmarks=[str(bench)], fields=["instruction", "input"]).apply(rows)
    rejected = {r["id"]: r for r in res.rejected.to_pylist()}
    assert set(rejected) == {"copy-inside", "short-inside", "punctuated"}
    assert rejected["copy-inside"]["matched_ngram"] == question[:20]
    assert "20-CJK-character n-gram" in rejected["copy-inside"]["reason"]
    assert rejected["short-inside"]["reason"].startswith("instruction contains the whole of ")
    assert rejected["punctuated"]["matched_ngram"] == question[:20]  # punctuation is not a token


def test_benchmarks_count_by_content_and_bad_files_are_named(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "cherry-llm" / "koala_test_set.jsonl"
    a, b = tmp_path / "a" / "koala_test_set.jsonl", tmp_path / "b" / "koala_test_set.jsonl"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copy(src, p)
    assert Decontaminate(benchmarks=[str(a)]).fingerprint() == Decontaminate(benchmarks=[str(b)]).fingerprint()
    b.write_text(src.read_text() + json.dumps({"id": "x", "prompt": "one more"}) + "\n")
    assert Decontaminate(benchmarks=[str(a)]).fingerprint() != Decontaminate(benchmarks=[str(b)]).fingerprint()
    rows = alpaca(shared_data, 5)
    vicuna = shared_data / "cherry-llm" / "vicuna_test_set.jsonl"
    with pytest.raises(ConfigError, match=r"vicuna_test_set.jsonl.*cannot tell the layout.*'fields': \[\.\.\.\]"):
        Decontaminate(benchmarks=[str(vicuna)]).apply(rows)
    with pytest.raises(ConfigError, match=r"has no field\(s\) \['question'\]; its records have: "
                                          r"\['category', 'question_id', 'text'\]"):
        Decontaminate(benchmarks=[{"path": str(vicuna), "fields": ["question"]}]).apply(rows)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(RecordError, match=r"broken.jsonl, line 2"):
        Decontaminate(benchmarks=[{"path": str(broken), "fields": ["text"]}]).apply(rows)
    with pytest.raises(ConfigError, match="does not exist"):
        Decontaminate(benchmarks=[str(tmp_path / "nope.jsonl")]).apply(rows)
    with pytest.raises(ConfigError, match="at least one benchmark"):
        Decontaminate().apply(rows)
