"""MIGSelect: the same choices, in the same order, as a plain dense computation of MIG written here; the errors it
gives before and while running; how fast it chooses on 10,000 rows."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from thresher.errors import PipelineError, StepError
from thresher.filters import MIGSelect
from thresher.llms.config import make_embedder

# tags with near-synonyms among them, so the tag graph has edges at 0.9 and more at 0.75
TAGS = [
    "math", "mathematics", "math problem", "mathematical problem", "coding", "programming", "python programming",
    "python coding", "code generation", "generating code", "poetry", "poem writing", "translation",
    "language translation", "summarization", "text summarization", "summarize text", "data analysis",
    "analysis of data", "question answering", "answering questions", "cooking", "recipe", "travel", "history",
    "physics", "chemistry", "biology", "grammar correction", "grammar", "email writing", "writing an email",
]


def tagged_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    tags = [[str(t) for t in rng.choice(TAGS, size=rng.integers(0, 5), replace=False)] for _ in range(n)]
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "instruction": [f"task {i}" for i in range(n)],
        "tags": pa.array(tags, pa.list_(pa.string())),
        "deita_score": rng.uniform(1.0, 30.0, n),
    })


def dense_mig(tags: list[list[str]], scores: np.ndarray, budget: int, similarity: float, exact: bool,
              power: float = 0.8, eps: float = 1e-6) -> tuple[list[int], list[float]]:
    """MIG written out plainly: dense matrices and a full recomputation of every gain at every step."""
    vocab = sorted({t for row in tags for t in row})
    e = make_embedder(None).embed(vocab).astype(np.float64)
    w = e @ e.T
    w[w < similarity] = 0.0
    np.fill_diagonal(w, 1.0)
    p = w / w.sum(axis=0, keepdims=True)
    v = np.zeros((len(tags), len(vocab)))
    for i, row in enumerate(tags):
        distinct = set(row)
        for t in distinct:
            v[i, vocab.index(t)] = scores[i] / len(distinct)
    u = v @ p
    c = np.zeros(len(vocab))
    taken = np.zeros(len(tags), dtype=bool)
    order, gains = [], []
    for _ in range(min(budget, len(tags))):
        if exact:
            gain = ((c + u + eps) ** power - (c + eps) ** power).sum(axis=1)
        else:
            gain = u @ (power * (c + eps) ** (power - 1))
        gain[taken] = -np.inf
        i = int(np.argmax(gain))
        order.append(i)
        gains.append(float(gain[i]))
        taken[i] = True
        c += u[i]
    return order, gains


@pytest.mark.parametrize(("gain", "similarity"), [("gradient", 0.9), ("exact", 0.9), ("gradient", 0.75)])
def test_equals_a_dense_reference_on_500_rows(gain: str, similarity: float) -> None:
    t = tagged_table(500)
    budget = 200
    res = MIGSelect(budget=budget, gain=gain, tag_similarity=similarity).apply(t)
    ours = res.output.sort_by("mig_rank")
    ref_order, ref_gains = dense_mig(t.column("tags").to_pylist(), t.column("deita_score").to_numpy(), budget,
                                     similarity, gain == "exact")
    assert ours.column("id").to_pylist() == [f"r{i}" for i in ref_order]
    assert ours.column("mig_rank").to_pylist() == list(range(1, budget + 1))
    np.testing.assert_allclose(ours.column("mig_gain").to_numpy(), ref_gains, rtol=1e-9)
    assert res.metrics["tag_edges"] > 0  # the graph did propagate
    # a kept row's gain never rises along the order; every row left out had no more than the last kept
    gains = ours.column("mig_gain").to_numpy()
    assert np.all(np.diff(gains) <= 1e-12 * gains[0])
    assert res.rejected.column("mig_gain").to_numpy().max() <= gains[-1] * (1 + 1e-12)
    assert res.rejected.column("mig_rank").null_count == res.rows_rejected
    assert res.rejected.column("reason")[0].as_py().startswith("not selected: MIG's budget of 200 rows was filled")


def test_budget_over_size_and_rows_without_tags() -> None:
    t = tagged_table(40, seed=3)
    res = MIGSelect(budget=100, score=None).apply(t)
    assert res.rows_out == 40 and sorted(res.output.column("mig_rank").to_pylist()) == list(range(1, 41))
    # rows without tags add nothing: they come last, in input order
    out = res.output.sort_by("mig_rank")
    empty = [r["id"] for r in out.to_pylist() if not r["tags"]]
    assert empty and [r["id"] for r in out.to_pylist()[-len(empty):]] == empty
    assert empty == sorted(empty, key=lambda s: int(s[1:]))
    res = MIGSelect(budget=20, score=None).apply(t)
    reasons = [r for r, tags in zip(res.rejected.column("reason").to_pylist(), res.rejected.column("tags").to_pylist(),
                                    strict=True) if not tags]
    assert reasons and all(r.endswith("(the row has no tags, so it adds no information)") for r in reasons)


def test_fails_before_running_without_tags_and_names_bad_rows() -> None:
    t = tagged_table(20)
    with pytest.raises(PipelineError, match=r"needs column\(s\) \['tags'\].*put thresher.scorers.Tagger before it"):
        MIGSelect(budget=5).apply(t.drop_columns(["tags"]))
    with pytest.raises(PipelineError, match=r"\['deita_score'\].*DeitaScorer.*score=None"):
        MIGSelect(budget=5).apply(t.drop_columns(["deita_score"]))
    nulls = t.set_column(2, "tags", pa.array([None, *t.column("tags").to_pylist()[1:]], pa.list_(pa.string())))
    with pytest.raises(StepError, match=r"1 row\(s\) have no 'tags' \(null\): id='r0'"):
        MIGSelect(budget=5).apply(nulls)
    negative = t.set_column(3, "deita_score", pa.array([-1.0, *t.column("deita_score").to_pylist()[1:]]))
    with pytest.raises(StepError, match=r"negative 'deita_score': id='r0'"):
        MIGSelect(budget=5).apply(negative)
    missing = t.set_column(3, "deita_score", pa.array([None, *t.column("deita_score").to_pylist()[1:]]))
    with pytest.raises(StepError, match=r"no value in column 'deita_score' \(null or NaN\): id='r0'"):
        MIGSelect(budget=5).apply(missing)


def test_selection_time_on_10k_rows() -> None:
    t = tagged_table(10_000, seed=1)
    step = MIGSelect(budget=2_000)
    step.apply(t.slice(0, 10))  # load the embedder once, outside the timing
    t0 = time.perf_counter()
    res = step.apply(t)
    total = time.perf_counter() - t0
    print(f"\nMIGSelect 10,000 rows -> 2,000: {total:.2f} s in all, greedy loop {res.metrics['select_seconds']:.2f} s "
          f"({res.metrics['tags']} tags, {res.metrics['tag_edges']} edges)")
    assert res.rows_out == 2_000 and total < 30
