"""RougeFilter and RougePool: rouge_score's ROUGE-L decisions and scores, exactly, online, for English and Chinese."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from rouge_score import rouge_scorer, tokenize

from thresher.data import Load
from thresher.errors import ConfigError
from thresher.filters import RougeFilter
from thresher.filters.rouge import RougePool, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_f1(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def candidates(shared: Path) -> list[str]:
    """Instructions from the cherry-llm test sets, the LLaMA-Factory demo, Self-Instruct's user-oriented tasks
    (which repeat cherry-llm's sinstruct set: exact copies to reject) and the first Alpaca rows of cherry-llm."""
    texts: list[str] = []
    for name, key in (("koala_test_set.jsonl", "prompt"), ("lima_test_set.jsonl", "conversations"),
                      ("sinstruct_test_set.jsonl", "instruction"), ("vicuna_test_set.jsonl", "text"),
                      ("wizardlm_test_set.jsonl", "Instruction")):  # fmt: skip
        texts += [r[key] for r in _jsonl(shared / "cherry-llm" / name)]
    texts += [r["instruction"] for r in json.loads((shared / "llama-factory-demo" / "alpaca_en_demo.json").read_text())]
    texts += [r["instruction"] for r in _jsonl(shared / "self-instruct" / "user_oriented_instructions.jsonl")]
    texts += [r["instruction"] for r in json.loads((shared / "cherry-llm" / "cherry_alpaca_5_percent.json").read_text())][:900]
    # rouge_score's pure-Python LCS takes seconds on a pair of 2,000-token chat logs: the reference below would
    # spend minutes there, so the longest prompts (a few dozen chat transcripts, not instructions) stay out
    return [t for t in texts if len(tokenize.tokenize(t, None)) <= 256]


def reference_stream(texts: list[str], pool_start: list[str], threshold: float) -> list[tuple[float, int]]:
    """rouge_score's online filter: each text's (max F1 against the pool, first pool index reaching it); a text
    at or under the threshold joins the pool. Pool texts are scored by rouge_score in decreasing order of the
    bound 2*overlap/(m+n) and skipped once that bound is below the best score found: a pool text's LCS with the
    candidate is at most their multiset token overlap, so a skipped text cannot reach the max (the brute-force
    test below checks this reference against rouge_score over every pair)."""
    pool: list[str] = []
    lens: list[int] = []
    postings: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def add(text: str, tokens: list[str]) -> None:
        for tok, k in Counter(tokens).items():
            postings[tok].append((len(pool), k))
        pool.append(text)
        lens.append(len(tokens))

    for t in pool_start:
        add(t, tokenize.tokenize(t, None))
    out = []
    for text in texts:
        tokens = tokenize.tokenize(text, None)
        overlap: dict[int, int] = defaultdict(int)
        for tok, k in Counter(tokens).items():
            for j, kj in postings.get(tok, ()):
                overlap[j] += min(k, kj)
        order = sorted(((2 * o / (len(tokens) + lens[j]), j) for j, o in overlap.items()), key=lambda b: (-b[0], b[1]))
        best, best_j = 0.0, 0
        for bound, j in order:
            if bound < best - 1e-12:
                break
            f = rouge_f1(text, pool[j])
            if f > best or (f == best and j < best_j):
                best, best_j = f, j
        out.append((best, best_j))
        if best <= threshold:
            add(text, tokens)
    return out


def brute_force_stream(texts: list[str], pool_start: list[str], threshold: float) -> list[tuple[float, int]]:
    """The same, scoring every pool text with rouge_score, as Self-Instruct does."""
    pool = list(pool_start)
    out = []
    for text in texts:
        scores = [rouge_f1(text, p) for p in pool]
        best = max(scores)
        out.append((best, scores.index(best)))
        if best <= threshold:
            pool.append(text)
    return out


# ---- tokenization -----------------------------------------------------------------------------------------


def test_tokens_are_rouge_scores(shared_data: Path) -> None:
    texts = [*candidates(shared_data)[:1500],
        "", "   ", "İstanbul", "5 KELVIN: 5K", "naïve café — résumé", "snake_case and CamelCase", "x²+y²=z²",
        "tabs\tand\nnewlines", "ＡＢＣ１２３ fullwidth", "über-cool 42nd", "a.b,c;d", "Ǆemal ǅ ǆ",
    ]  # fmt: skip
    for t in texts:
        expected = tokenize.tokenize(t, None)
        assert rouge_tokens(t) == expected, t
        # "cjk" adds one token per CJK character between them (each was a separator to rouge_score)
        assert [x for x in rouge_tokens(t, "cjk") if x.isascii()] == expected, t
    assert rouge_tokens(None) == [] and rouge_tokens(None, "cjk") == []
    with pytest.raises(ConfigError, match="valid choices: rouge_score, cjk"):
        rouge_tokens("x", "jieba")


def test_cjk_tokens_are_characters_and_punctuation_is_dropped() -> None:
    text = "请用Python写3个例子：「春天」、東京タワー・서울。"
    assert rouge_tokens(text, "cjk") == ["请", "用", "python", "写", "3", "个", "例", "子", "春", "天",
                                         "東", "京", "タ", "ワ", "ー", "서", "울"]  # fmt: skip
    assert rouge_tokens(text) == ["python", "3"]  # rouge_score keeps only ASCII letters and digits
    assert rouge_tokens("Ｐｙｔｈｏｎ１２３ 々〇", "cjk") == ["々", "〇"]  # fullwidth forms are dropped, as rouge_score does


# ---- the pool -----------------------------------------------------------------------------------------------


def test_pool_edges_and_ties() -> None:
    pool = RougePool()
    assert pool.nearest("anything") == (0.0, -1) and pool.nearest_over("anything", 0.7) == (0.0, -1)
    assert pool.add("Write a poem about cats.") == 0
    assert pool.add("List three fruits.") == 1
    assert pool.add("write a POEM about cats!") == 2  # the same tokens as text 0
    assert len(pool) == 3 and pool.texts[2] == "write a POEM about cats!"
    assert pool.nearest("Nothing shared here") == (0.0, 0)  # every score is 0: the first text reaches it
    assert pool.nearest("") == (0.0, 0) and pool.nearest(None) == (0.0, 0)
    assert pool.nearest("Write a poem about cats") == (1.0, 0)  # the first of two equal texts
    score, idx = pool.nearest("Write a poem about dogs")
    # rouge_score's own floating point: 2*P*R/(P+R) with P = R = 0.8 is 0.8000000000000002, not 0.8
    assert idx == 0 and score == rouge_f1("Write a poem about dogs", pool.texts[0]) == 0.8000000000000002
    # the decision only: above the threshold, an exact score above it; otherwise nothing above it
    s, i = pool.nearest_over("Write a poem about dogs", 0.7)
    assert s > 0.7 and s == rouge_f1("Write a poem about dogs", pool.texts[i])
    # ... so rouge_score's `> 0.8` rejects it, and so does the pool
    assert pool.nearest_over("Write a poem about dogs", 0.8)[0] > 0.8
    s, i = pool.nearest_over("Write a poem about dogs", 0.81)
    assert s <= 0.81
    assert pool.nearest_over("List three colours", 0.9) == (0.0, -1)  # no text could pass 0.9
    with pytest.raises(ConfigError, match="valid choices"):
        RougePool("words")


@pytest.mark.parametrize("seed", [0, 1])
def test_pool_matches_rouge_score_on_long_and_repetitive_texts(seed: int) -> None:
    """Lengths around the 64-token word boundary and far past it, a small vocabulary (many repeats and ties)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(9)]
    pool = RougePool()
    texts = []
    for _ in range(80):
        n = rng.choice([1, 2, 7, 40, 63, 64, 65, 100, 128, 129, 200])
        texts.append(" ".join(rng.choice(words) for _ in range(n)))
        pool.add(texts[-1])
    for _ in range(20):
        m = rng.choice([1, 5, 63, 64, 65, 127, 128, 129, 190])
        cand = " ".join(rng.choice(words) for _ in range(m))
        scores = [rouge_f1(cand, t) for t in texts]
        best = max(scores)
        assert pool.nearest(cand) == (best, scores.index(best))
        s, i = pool.nearest_over(cand, 0.5)
        assert (s > 0.5) == (best > 0.5)
        if s > 0.5:
            assert s == scores[i]


# ---- fidelity on real instructions -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fidelity_streamed_against_the_seed_tasks(shared_data: Path) -> None:
    seeds_path = shared_data / "self-instruct" / "seed_tasks.jsonl"
    seeds = [r["instruction"] for r in _jsonl(seeds_path)]
    assert len(seeds) == 175
    texts = candidates(shared_data)
    assert len(texts) >= 3000
    table = pa.table({"id": [f"c{i}" for i in range(len(texts))], "instruction": texts})
    res = RougeFilter(reference=str(seeds_path), threshold=0.7).apply(table)
    assert res.rows_in == res.rows_out + res.rows_rejected == len(texts)
    got: dict[str, tuple[float, str | None, bool]] = {}
    for side, kept in ((res.output, True), (res.rejected, False)):
        for row in side.select(["id", "rouge_l_max", "rouge_l_nearest"]).to_pylist():
            got[row["id"]] = (row["rouge_l_max"], row["rouge_l_nearest"], kept)

    expected = reference_stream(texts, seeds, 0.7)
    pool = list(seeds)  # the reference's own pool, grown by its own decisions
    mismatches = []
    for i, (text, (best, j)) in enumerate(zip(texts, expected, strict=True)):
        score, nearest, kept = got[f"c{i}"]
        want_nearest = pool[j] if best > 0 else None
        if kept != (best <= 0.7) or score != best or nearest != want_nearest:
            mismatches.append((i, text[:60], score, best, nearest, want_nearest))
        assert abs(score - best) <= 1e-9
        if best <= 0.7:
            pool.append(text)
    assert not mismatches, mismatches[:5]
    n_rejected = sum(best > 0.7 for best, _ in expected)
    assert n_rejected == res.rows_rejected and n_rejected >= 250  # the user-oriented tasks repeat a test set
    assert sum(0.5 < best <= 0.7 for best, _ in expected) > 0  # and some near misses were kept


@pytest.mark.slow
def test_reference_stream_equals_brute_force_rouge_score(shared_data: Path) -> None:
    """The pruned reference above against rouge_score on every pair, for the first candidates."""
    seeds = [r["instruction"] for r in _jsonl(shared_data / "self-instruct" / "seed_tasks.jsonl")]
    texts = candidates(shared_data)[:150]
    assert reference_stream(texts, seeds, 0.7) == brute_force_stream(texts, seeds, 0.7)


# ---- Chinese ----------------------------------------------------------------------------------------------------

# (original, near-copy) written for this test: reworded, reordered or padded by a few characters
CHINESE_PAIRS = [
    ("请写一首关于春天的诗。", "请写一首关于春天的短诗。"),
    ("把下面这段话翻译成英文。", "请把下面这段话翻译成英文。"),
    ("列出三种健康的早餐食物。", "列出三种健康的早餐食品。"),
    ("解释一下什么是机器学习。", "请解释一下什么是机器学习？"),
    ("给我推荐五本适合初学者的编程书籍。", "给我推荐五本适合初学者阅读的编程书籍。"),
    ("总结这篇文章的主要观点。", "总结一下这篇文章的主要观点。"),
    ("写一封邮件，向客户道歉延迟发货。", "写一封邮件向客户道歉，因为延迟发货了。"),
    ("用Python写一个函数，计算列表的平均值。", "用Python写一个函数来计算列表的平均值。"),
    ("比较猫和狗作为宠物的优缺点。", "比较一下猫和狗作为宠物的优点和缺点。"),
    ("为一家咖啡店想一个有创意的名字。", "为一家新开的咖啡店想一个有创意的名字。"),
    ("東京タワーの高さは何メートルですか。", "東京タワーの高さは何メートルでしょうか。"),
    ("서울에서 가볼 만한 곳을 추천해 주세요.", "서울에서 가볼 만한 곳을 몇 군데 추천해 주세요."),
]
# different tasks that share a few characters with the originals: kept under both tokenizers
CHINESE_OTHERS = ["计算一个圆的面积，半径为五厘米。", "描述一下你最喜欢的季节和原因。", "如何在家里种植西红柿？"]


class _CJKTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text, "cjk")


def test_cjk_rejects_chinese_near_copies_that_rouge_score_lets_through() -> None:
    originals = [a for a, _ in CHINESE_PAIRS]
    rows = [{"id": f"n{i}", "instruction": b} for i, (_, b) in enumerate(CHINESE_PAIRS)]
    rows += [{"id": f"o{i}", "instruction": t} for i, t in enumerate(CHINESE_OTHERS)]

    cjk = RougeFilter(reference=originals, tokenizer="cjk").apply(rows)
    assert sorted(cjk.rejected.column("id").to_pylist()) == sorted(f"n{i}" for i in range(len(CHINESE_PAIRS)))
    assert sorted(cjk.output.column("id").to_pylist()) == [f"o{i}" for i in range(len(CHINESE_OTHERS))]
    # each near-copy's nearest text is its own original, at rouge_score's F1 over the same character tokens
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CJKTokenizer())
    for row in cjk.rejected.to_pylist():
        original, copy = CHINESE_PAIRS[int(row["id"][1:])]
        assert row["rouge_l_nearest"] == original
        assert row["rouge_l_max"] == scorer.score(copy, original)["rougeL"].fmeasure > 0.7
        assert "> 0.7 with reference text" in row["reason"]

    # rouge_score's own tokenizer sees nothing in these texts but "python": every near-copy scores 0 and passes,
    # except the pair whose only token is "python" (1.0: any two such texts would look identical)
    plain = RougeFilter(reference=originals).apply(rows)
    assert plain.rejected.column("id").to_pylist() == ["n7"] and plain.rejected.column("rouge_l_max")[0].as_py() == 1.0
    assert set(plain.output.column("rouge_l_max").to_pylist()) == {0.0}


# ---- the filter step ----------------------------------------------------------------------------------------


def test_in_batch_near_copy_is_rejected_and_rejected_rows_do_not_join_the_pool() -> None:
    a = "a b c d e f g h i j"
    a_copy = "a b c d e f g h x y"  # LCS 8 of 10 with a: 0.8
    close_to_copy = "k l c d e f g h x y"  # 0.8 with a_copy, 0.6 with a: kept, since a_copy never joined
    rows = [{"id": "r0", "instruction": a}, {"id": "r1", "instruction": a_copy},
            {"id": "r2", "instruction": close_to_copy}, {"id": "r3", "instruction": None},
            {"id": "r4", "instruction": a}]  # fmt: skip
    res = RougeFilter(threshold=0.7).apply(rows)
    assert res.output.column("id").to_pylist() == ["r0", "r2", "r3"]
    assert res.rejected.column("id").to_pylist() == ["r1", "r4"]
    assert res.output.column("rouge_l_max").to_pylist() == [0.0, pytest.approx(0.6), 0.0]
    assert res.output.column("rouge_l_nearest").to_pylist() == [None, a, None]
    r1, r4 = res.rejected.to_pylist()
    assert r1["rouge_l_max"] == pytest.approx(0.8) and r1["rouge_l_nearest"] == a
    assert r1["reason"] == f"ROUGE-L F1 0.8000 > 0.7 with row 'r0': {a!r}"
    assert r4["rouge_l_max"] == 1.0 and r4["rejected_by"] == "rouge_filter"
    # the batch size of the caller does not matter: the filter sees the table in order
    assert RougeFilter(threshold=0.9).apply(rows).rows_rejected == 1


def test_reference_from_a_file(tmp_path: Path) -> None:
    ref = tmp_path / "pool.jsonl"
    ref.write_text("\n".join(json.dumps({"instruction": t, "input": "", "output": "x"}) for t in
                             ["Write a haiku about autumn leaves.", "Name the capital of France."]) + "\n")  # fmt: skip
    rows = [{"id": "a", "instruction": "Write a haiku about autumn leaves falling."},
            {"id": "b", "instruction": "Explain how a rainbow forms."}]  # fmt: skip
    step = RougeFilter(reference=str(ref))
    res = step.apply(rows)
    assert res.rejected.column("id").to_pylist() == ["a"]
    assert "reference text 0" in res.rejected.column("reason")[0].as_py()
    assert step.metrics()["reference_texts"] == 2
    # the file counts by its name and content: an edit changes the fingerprint, a move to another folder does not
    fp = step.fingerprint()
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "pool.jsonl"
    moved.write_bytes(ref.read_bytes())
    assert RougeFilter(reference=str(moved)).fingerprint() == fp
    ref.write_text(ref.read_text().replace("France", "Spain"))
    assert RougeFilter(reference=str(ref)).fingerprint() != fp
    with pytest.raises(ConfigError, match="has no column 'prompt'"):
        RougeFilter(reference=str(ref), column="prompt").apply([{"prompt": "x"}])
    with pytest.raises(ConfigError, match="does not exist"):
        RougeFilter(reference=str(tmp_path / "missing.jsonl")).apply(rows)


def test_parameters_are_checked_before_any_row() -> None:
    rows = [{"instruction": "x"}]
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\]"):
        RougeFilter(threshold=70).apply(rows)
    with pytest.raises(ConfigError, match="valid choices: rouge_score, cjk"):
        RougeFilter(tokenizer="chars").apply(rows)
    with pytest.raises(ConfigError, match="reference must be None, a list of texts or the path"):
        RougeFilter(reference=42).apply(rows)  # type: ignore[arg-type]


def test_in_a_pipeline_equals_on_its_own_and_is_cached(tmp_path: Path, shared_data: Path) -> None:
    seeds = shared_data / "self-instruct" / "seed_tasks.jsonl"
    data = shared_data / "llama-factory-demo" / "alpaca_en_demo.json"
    rows = Load(path=str(data), limit=300).apply().output
    standalone = RougeFilter(reference=str(seeds), threshold=0.5).apply(rows)
    pipe = Load(path=str(data), limit=300) >> RougeFilter(reference=str(seeds), threshold=0.5)
    run = pipe.run(tmp_path / "run", progress=False)
    assert run.executed == ["load", "rouge_filter"]
    out, rejected = run.table("rouge_filter"), run.rejected("rouge_filter")
    assert out.column("id").to_pylist() == standalone.output.column("id").to_pylist()
    assert rejected.column("reason").to_pylist() == standalone.rejected.column("reason").to_pylist()
    assert out.num_rows + rejected.num_rows == 300 and rejected.num_rows > 0
    assert np.all(np.array(out.column("rouge_l_max").to_pylist()) <= 0.5)
    again = pipe.run(tmp_path / "run", progress=False)
    assert again.cached == ["load", "rouge_filter"]
