"""Retrievers over a user corpus: BM25 (English, Chinese) and embeddings (bundled MiniLM, real FAISS), built once and
found again on disk by content; corpora from text files, data files, folders and rows; a user-written retriever
behind the same contract; bad input named by file, row and field."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from thresher.errors import ConfigError, RecordError, StepError
from thresher.rewriters.retrieval import (
    BM25Retriever,
    EmbeddingRetriever,
    Passage,
    Retriever,
    bm25_tokens,
    load_passages,
    make_retriever,
    retrieve_many,
    split_passages,
)
from thresher.rewriters.retrieval import bm25 as bm25_module

FACTS = [
    "Paris is the capital of France and its largest city.",
    "Berlin is the capital of Germany.",
    "The Nile is the longest river in Africa.",
    "Mount Everest is the highest mountain above sea level.",
]
FACTS_ZH = ["北京是中华人民共和国的首都。", "长江是中国最长的河流。", "珠穆朗玛峰是世界最高的山峰。"]


def test_bm25_ranks_the_passage_that_shares_the_rare_words(tmp_path: Path) -> None:
    r = BM25Retriever(corpus=FACTS, index_dir=tmp_path)
    found = r.retrieve("What is the longest river in Africa?", k=2)
    assert isinstance(r, Retriever)
    assert found[0] == Passage(FACTS[2], "corpus row 2", found[0].score) and found[0].score > 0
    assert all(a.score >= b.score for a, b in itertools.pairwise(found))
    assert r.retrieve("zebra quantum", k=3) == []  # nothing shares a word: no passage, not random ones
    assert r.retrieve("", k=3) == []


def test_bm25_chinese_characters_and_bigrams(tmp_path: Path) -> None:
    assert bm25_tokens("长江River") == ["river", "长", "江", "长江"]
    assert bm25_tokens("The cat's toy") == ["cat", "toy"]  # stop words dropped, case folded
    r = BM25Retriever(corpus=FACTS_ZH + FACTS, index_dir=tmp_path)
    assert r.retrieve("中国最长的河流是哪条？", k=1)[0].text == FACTS_ZH[1]
    assert r.retrieve("世界最高的山", k=1)[0].text == FACTS_ZH[2]


def test_the_index_is_built_once_and_keyed_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "facts.txt"
    corpus.write_text("\n\n".join(FACTS), encoding="utf-8")
    index_dir = tmp_path / "indexes"
    builds: list[int] = []
    real = bm25_module.load_passages

    def counting(*a: Any, **k: Any) -> Any:
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bm25_module, "load_passages", counting)
    first = BM25Retriever(corpus=str(corpus), passage_words=10, index_dir=index_dir)
    assert first.retrieve("capital of Germany", k=1)[0].text == FACTS[1]
    key = first.identity()
    again = BM25Retriever(corpus=str(corpus), passage_words=10, index_dir=index_dir)
    assert again.retrieve("capital of Germany", k=1)[0].source == f"{corpus}:3"
    assert len(builds) == 1 and again.identity() == key  # found on disk: not built again
    assert len(list(index_dir.iterdir())) == 1 and not list(index_dir.glob(".*"))  # no temporary folder left
    # a parameter or the content changes the key, and a touch that changes nothing does not
    assert BM25Retriever(corpus=str(corpus), passage_words=10, k1=1.2).identity() != key
    corpus.write_text("\n\n".join(FACTS), encoding="utf-8")
    assert BM25Retriever(corpus=str(corpus), passage_words=10).identity() == key
    corpus.write_text("\n\n".join(FACTS[:3]), encoding="utf-8")
    assert BM25Retriever(corpus=str(corpus), passage_words=10).identity() != key


def test_text_files_are_cut_into_passages_with_their_lines(tmp_path: Path) -> None:
    long = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(30))
    text = f"Title\n\nShort paragraph.\n\n{long}\n\n最后一段。"
    passages = split_passages(text, 40)
    assert passages[0][0].startswith("Title\n\nShort paragraph.\n\nSentence number 0 talks about topic 0. Sentence")
    assert all(len(p.split()) <= 40 for p, _ in passages)
    assert " ".join(p for p, _ in passages).split() == text.split()  # nothing lost, nothing added
    assert passages[-1][0].endswith("topic 29.\n\n最后一段。") and passages[-1][1] == 4
    f = tmp_path / "doc.md"
    f.write_text(text, encoding="utf-8")
    got = load_passages(str(f), passage_words=40)
    assert [s for _, s in got][:2] == [f"{f}:1", f"{f}:5"]


def test_data_files_folders_and_rows(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    folder.mkdir()
    rows = [{"id": "q1", "instruction": "Capital of France?", "output": "Paris."},
            {"id": "q2", "instruction": "Longest river in Africa?", "output": "The Nile."}]  # fmt: skip
    (folder / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (folder / "notes.txt").write_text("Everest is 8,849 metres high.", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\0")
    got = load_passages(str(folder))
    assert got == [("Everest is 8,849 metres high.", f"{folder / 'notes.txt'}:1"),
                   ("Capital of France?\n\nParis.", f"{folder / 'qa.jsonl'} row 0 (id='q1')"),
                   ("Longest river in Africa?\n\nThe Nile.", f"{folder / 'qa.jsonl'} row 1 (id='q2')")]  # fmt: skip
    # a dataset column: a pyarrow table, an HF Dataset
    table = pa.table({"text": FACTS})
    r = BM25Retriever(corpus=table, fields=["text"], index_dir=tmp_path / "i")
    assert r.retrieve("highest mountain", k=1)[0].source == "corpus row 3"
    import datasets

    hf = datasets.Dataset.from_dict({"text": FACTS})
    assert BM25Retriever(corpus=hf, fields=["text"]).identity() == r.identity()  # same rows, same key


def test_bad_corpora_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_passages(str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match=r"unknown file type '\.bin'"):
        (tmp_path / "x.bin").write_bytes(b"1")
        load_passages(str(tmp_path / "x.bin"))
    with pytest.raises(RecordError, match=r"corpus row 1, field 'text': expected text, found int"):
        load_passages([{"text": "ok"}, {"text": 5}], fields=["text"])
    with pytest.raises(RecordError, match=r"corpus row 0 has none of the fields \['body'\]"):
        load_passages([{"text": "ok"}], fields=["body"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(RecordError, match=r"bad.txt is not UTF-8"):
        load_passages(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": ', encoding="utf-8")
    with pytest.raises(RecordError, match=r"broken.jsonl"):
        load_passages(str(broken))
    with pytest.raises(ConfigError, match="has no text to index"):
        BM25Retriever(corpus=["", "  "], index_dir=tmp_path).load()
    with pytest.raises(ConfigError, match="passage_words must be an integer >= 8"):
        BM25Retriever(corpus=FACTS, passage_words=2).identity()


@pytest.mark.slow
def test_embedding_retriever_finds_paraphrases(tmp_path: Path, isolated_cache: Path) -> None:
    r = EmbeddingRetriever(corpus=FACTS, index_dir=tmp_path / "idx")
    found = r.retrieve("Which city is the seat of the French government?", k=2)
    assert found[0].text == FACTS[0] and found[0].score > found[1].score
    many = r.retrieve_many(["tallest peak on Earth", "a river in Egypt"], k=1)
    assert [m[0].text for m in many] == [FACTS[3], FACTS[2]]
    # cached: a second retriever opens the same index without embedding the corpus again
    again = EmbeddingRetriever(corpus=FACTS, index_dir=tmp_path / "idx")
    assert again.identity() == r.identity() and len(list((tmp_path / "idx").iterdir())) == 1
    assert again.retrieve("tallest peak on Earth", k=1)[0].text == FACTS[3]
    assert EmbeddingRetriever(corpus=FACTS, min_score=0.9).retrieve("a river in Egypt", k=3) == []


class Listing:
    """A user-written retriever (a stand-in for a web search): no base class, just the contract."""

    def __init__(self, *, answers: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.answers = answers or {}

    def identity(self) -> dict[str, Any]:
        return {"kind": "listing", "answers": self.answers}

    def retrieve(self, query: str, k: int = 3) -> list[Any]:
        return self.answers.get(query, [])[:k]


def test_a_user_retriever_behind_the_same_contract() -> None:
    spec = {"kind": f"{__name__}:Listing", "answers": {"q": [{"text": "t", "source": "https://example.org", "score": 2}]}}
    r = make_retriever(spec)
    assert isinstance(r, Listing) and isinstance(r, Retriever)
    assert retrieve_many(r, ["q", "other"], 3) == [[Passage("t", "https://example.org", 2.0)], []]
    assert make_retriever(r) is r
    with pytest.raises(ConfigError, match="unknown kind 'web'"):
        make_retriever({"kind": "web"})
    with pytest.raises(ConfigError, match="has no retrieve"):
        make_retriever(object())
    with pytest.raises(ConfigError, match="cannot import"):
        make_retriever({"kind": "no.such.module:Thing"})
    broken = Listing(answers={"q": ["just a string"]})
    with pytest.raises(StepError, match=r"Listing.retrieve, query 'q': passage 0 is 'just a string'"):
        retrieve_many(broken, ["q"], 3)
