"""NearDedup against exact brute force and semhash, on normalised 384-d vectors with planted near-duplicate groups.

Data (seeded): rows drawn around 1,000 random topic directions (a random pair within a topic has cosine about 0.3,
across topics about 0, as sentence embeddings of unrelated and related instructions do), then 15% of rows replaced
by near copies of other rows, each at a cosine drawn from 0.86-0.995 to its source (so some copies fall below 0.9,
and copies of one source form groups and chains). Threshold 0.9.

- NearDedup: its search (`find_pairs`, the step's defaults: IVF above 20,000 rows, about 2 sqrt(n) cells, 8
  probes) and grouping (connected components), on the vectors as given (embedding is measured by embed.py).
- Truth: every pair at cosine >= 0.9 by brute force (blocked matrix products over all pairs) on the 100k set; on
  the 1M set, every pair involving a seeded sample of rows (`--sample`), brute force against all rows.
- semhash: `SemHash.from_embeddings(vectors, records)` then `self_deduplicate(threshold)` (its default ANN backend,
  usearch HNSW), the same vectors; its neighbour lists give its pairs.
Pair recall = true pairs found / true pairs; precision = found pairs that are true / found pairs (both on the
sample for 1M). Rows removed: how many rows the found pairs remove (components, first row survives) and how many
of those decisions differ from the exact pairs' (100k only).

    python benchmarks/dedup.py [--sizes 100000 1000000] [--sample 2000] [--semhash-1m]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from thresher.filters.near_dedup import find_pairs, group_rows

THRESHOLD = 0.9
_BLOCK = 8192


def planted(n: int, d: int = 384, seed: int = 0, topics: int = 1000, copy_share: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    topic = rng.integers(0, topics, n)
    spread = np.float32(1.5 / np.sqrt(d))
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x[a:b] = centres[topic[a:b]] + spread * rng.standard_normal((b - a, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = int(n * copy_share)
    first_copy = n - copies
    # a copy's source is any earlier row, copies included, so groups and chains form
    for a in range(first_copy, n, 65536):
        b = min(n, a + 65536)
        src = (rng.random(b - a) * np.arange(a, b)).astype(np.int64)
        sigma = np.sqrt(1.0 / rng.uniform(0.86, 0.995, b - a) ** 2 - 1.0).astype(np.float32) / np.float32(np.sqrt(d))
        x[a:b] = x[src] + sigma[:, None] * rng.standard_normal((b - a, d), dtype=np.float32)
        x[a:b] /= np.linalg.norm(x[a:b], axis=1, keepdims=True)
    return np.ascontiguousarray(x[rng.permutation(n)])


def brute_pairs(x: np.ndarray, rows: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Every pair (i < j) at cosine >= THRESHOLD among all rows, or involving one of `rows`."""
    queries = np.arange(len(x)) if rows is None else rows
    out: set[tuple[int, int]] = set()
    thr = np.float32(THRESHOLD)
    for a in range(0, len(queries), _BLOCK):
        q = queries[a : a + _BLOCK]
        for b in range(0, len(x), 65536):
            qi, j = np.nonzero(x[q] @ x[b : b + 65536].T >= thr)
            i, j = q[qi], j + b
            keep = i != j
            out.update(zip(np.minimum(i, j)[keep].tolist(), np.maximum(i, j)[keep].tolist(), strict=True))
    return out


def semhash_pairs(x: np.ndarray) -> tuple[set[tuple[int, int]], float]:
    from semhash import SemHash

    class Given:  # semhash wants an encoder; the vectors are given, so it is never called
        def encode(self, sentences: Any, **kw: Any) -> np.ndarray:
            raise AssertionError("not used")

    t0 = time.perf_counter()
    sh = SemHash.from_embeddings(x, [str(i) for i in range(len(x))], model=Given())
    res = sh.self_deduplicate(threshold=THRESHOLD)
    seconds = time.perf_counter() - t0
    pairs: set[tuple[int, int]] = set()
    neighbours = res._selection_inputs[1]  # (indices, similarities) per row, as self_deduplicate found them
    for i, (idx, sims) in enumerate(neighbours):
        for j, s in zip(np.asarray(idx).tolist(), np.asarray(sims).tolist(), strict=True):
            if j != i and s >= THRESHOLD - 1e-6:
                pairs.add((min(i, j), max(i, j)))
    return pairs, seconds


def recall_precision(found: set[tuple[int, int]], truth: set[tuple[int, int]], rows: np.ndarray | None) -> tuple[float, float]:
    if rows is not None:
        sample = set(rows.tolist())
        found = {p for p in found if p[0] in sample or p[1] in sample}
    hit = len(found & truth)
    return hit / max(1, len(truth)), hit / max(1, len(found))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--sample", type=int, default=2000, help="rows whose pairs are brute-forced on sets over 200k")
    ap.add_argument("--semhash-1m", action="store_true",
                    help="run semhash on sets over 200k rows too (its index build takes tens of minutes on 2 cores)")
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, threshold {THRESHOLD}, 384-d unit vectors with planted near-duplicate groups")
    for n in args.sizes:
        print(f"\n== {n:,} rows ==")
        t0 = time.perf_counter()
        x = planted(n)
        print(f"data: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        pairs = find_pairs(x, THRESHOLD)
        g = group_rows(x, pairs, grouping="components")
        ours_s = time.perf_counter() - t0
        st = pairs.stats
        print(
            f"NearDedup: {ours_s:.1f} s (index {st['index']}, nlist {st.get('nlist')}, nprobe {st.get('nprobe')}; "
            f"train {st.get('train_seconds')} s, assign {st.get('assign_seconds')} s, search total "
            f"{st['search_seconds']} s), {st['pairs']:,} pairs, {int((~g.keep).sum()):,} rows removed"
        )
        found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
        rows = None if n <= 200_000 else np.sort(np.random.default_rng(7).choice(n, args.sample, replace=False))
        t0 = time.perf_counter()
        truth = brute_pairs(x, rows)
        what = "all pairs" if rows is None else f"pairs of {len(rows):,} sampled rows"
        print(f"brute force ({what}): {time.perf_counter() - t0:.1f} s, {len(truth):,} true pairs")
        rec, prec = recall_precision(found, truth, rows)
        print(f"NearDedup pair recall {rec:.4f}, precision {prec:.4f}")
        if rows is None:
            ti, tj = np.array(sorted(truth), dtype=np.int64).reshape(-1, 2).T
            exact = type(pairs)(ti, tj, np.einsum("ij,ij->i", x[ti], x[tj]), THRESHOLD, "flat")
            ge = group_rows(x, exact, grouping="components")
            print(f"rows removed: exact pairs {int((~ge.keep).sum()):,}, NearDedup {int((~g.keep).sum()):,}, "
                  f"decisions that differ {int((ge.keep != g.keep).sum()):,}")  # fmt: skip
        if n > 200_000 and not args.semhash_1m:
            print("semhash: skipped on this size (--semhash-1m runs it)")
            continue
        try:
            sh_pairs, sh_s = semhash_pairs(x)
        except ImportError:
            print("semhash: not installed (pip install -c constraints.txt 'thresher[bench]')")
            continue
        sh_rec, sh_prec = recall_precision(sh_pairs, truth, rows)
        print(f"semhash: {sh_s:.1f} s, pair recall {sh_rec:.4f}, precision {sh_prec:.4f}")
        print(f"ratio: semhash time / NearDedup time = {sh_s / ours_s:.2f}x; recall {rec:.4f} vs {sh_rec:.4f}")


if __name__ == "__main__":
    main()
