"""DEITA's score-first, diversity-aware selection: best rows first, each kept only if it is not too close to a kept one.

How. Rows are walked by a score column, highest first (ties in row order). A row is kept when its cosine similarity
to every row kept so far is at most `threshold`, until `budget` rows are kept; the rest are over budget. The kept
rows live in a FAISS inner-product index that grows with them, so the work is rows x kept, never rows x rows. Rows
are taken in blocks: one index search gives each row of a block its nearest row kept before the block, and a small
block x block product covers the rows kept inside it, in order, so the decisions are exactly those of the
one-row-at-a-time walk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from thresher.errors import ConfigError
from thresher.filters.embedding import (
    DEFAULT_TEXT,
    EmbeddingStep,
    faiss_module,
    order_by_score,
    row_ids,
    score_values,
)
from thresher.pipelines import GlobalFilter, runtime, secret

_BLOCK = 256  # rows decided per index search


class DiversitySelect(EmbeddingStep, GlobalFilter):
    """Keep the best-scored rows that are at most `threshold` cosine-similar to every row kept before them, up to
    `budget` rows (DEITA: threshold 0.9, budget 6,000; see the module docstring).

    score: the column to rank by (highest first). threshold: the largest cosine to a kept row a new row may have.
    budget: rows to keep (None: no limit, only the diversity rule). text / vectors / embedder / language: where the
    vectors come from (see `thresher.filters.embedding`). Every row gets `diversity_rank` (its place in score
    order, 0 first), and the rows it was compared with `diversity_similarity` and `diversity_nearest_id` (its
    highest cosine to a row kept before it, and that row; null for the first row and for rows over budget).
    """

    inputs = ()
    outputs = ("diversity_rank", "diversity_similarity", "diversity_nearest_id")
    VERSION = "1"

    def __init__(
        self,
        *,
        score: str = "deita_score",
        threshold: float = 0.9,
        budget: int | None = 6000,
        text: Sequence[str] = DEFAULT_TEXT,
        vectors: str | None = None,
        embedder: Mapping[str, Any] | Any | None = None,
        language: str = "en",
        threads: int | None = runtime(None),
        api_key: str | None = secret(),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.score = score
        self.threshold = threshold
        self.budget = budget
        self.text = text
        self.vectors = vectors
        self.embedder = embedder
        self.language = language
        self.threads = threads
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def reads(self) -> tuple[str, ...]:
        return (*self.vector_reads(), self.score)

    def check(self) -> None:
        name = type(self).__name__
        self.check_cosine("threshold")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ConfigError(f"{name}: budget must be a positive number of rows or None (no limit), got {b!r}")
        if not isinstance(self.score, str) or not self.score:
            raise ConfigError(f"{name}: score must name the column to rank by, got {self.score!r}")
        super().check()

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        name = type(self).__name__
        scores = score_values(table, self.score, name)
        x = self.row_vectors(table)
        res = diverse_walk(x, order_by_score(scores), float(self.threshold), self.budget, threads=self.threads)
        ids = row_ids(table)
        t, budget = self.threshold, self.budget
        reasons: list[str | None] = []
        for r in range(table.num_rows):
            if res.keep[r]:
                reasons.append(None)
            elif res.over_budget[r]:
                reasons.append(f"over budget: {budget} rows with higher {self.score} were kept first")
            else:
                near = ids[res.nearest[r]]
                reasons.append(f"too similar to kept row {near!r}: cosine {float(res.similarity[r]):.4f} > {t}")
        n_kept = int(res.keep.sum())
        self.stats_ = {
            "kept": n_kept,
            "too_similar": int((~res.keep & ~res.over_budget).sum()),
            "over_budget": int(res.over_budget.sum()),
        }
        compared = res.nearest >= 0
        columns = {
            "diversity_rank": pa.array(res.rank, pa.int64()),
            "diversity_similarity": pa.array(res.similarity.astype(np.float64), pa.float64(), mask=~compared),
            "diversity_nearest_id": pa.array([ids[k] if k >= 0 else None for k in res.nearest.tolist()], pa.string()),
        }
        return pa.array(res.keep, pa.bool_()), reasons, columns


class WalkResult:
    """Per row: kept, over budget, rank in score order, highest cosine to a row kept before it and that row."""

    def __init__(self, n: int) -> None:
        self.keep = np.zeros(n, dtype=bool)
        self.over_budget = np.zeros(n, dtype=bool)
        self.rank = np.zeros(n, dtype=np.int64)
        self.similarity = np.full(n, np.nan, dtype=np.float32)
        self.nearest = np.full(n, -1, dtype=np.int64)


def diverse_walk(
    vectors: np.ndarray, order: np.ndarray, threshold: float, budget: int | None, *, threads: int | None = None
) -> WalkResult:
    """The walk of the module docstring over unit `vectors` in `order` (row positions, best first)."""
    faiss = faiss_module(threads)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(order)
    out = WalkResult(n)
    out.rank[order] = np.arange(n)
    if n == 0:
        return out
    d = x.shape[1]
    index = faiss.IndexFlatIP(d)
    kept_rows: list[int] = []
    limit = n if budget is None else int(budget)
    thr = np.float32(threshold)
    for a in range(0, n, _BLOCK):
        block = order[a : a + _BLOCK]
        if len(kept_rows) >= limit:
            out.over_budget[order[a:]] = True
            break
        xb = x[block]
        if index.ntotal:
            dist, idx = index.search(xb, 1)
            prev_sim = dist[:, 0]
            prev_row = np.asarray(kept_rows, dtype=np.int64)[idx[:, 0]]
        else:
            prev_sim = np.full(len(block), -np.inf, dtype=np.float32)
            prev_row = np.full(len(block), -1, dtype=np.int64)
        gram = xb @ xb.T
        local: list[int] = []  # positions in the block kept so far
        for k in range(len(block)):
            r = int(block[k])
            if len(kept_rows) + len(local) >= limit:
                out.over_budget[block[k:]] = True
                out.over_budget[order[a + len(block) :]] = True
                break
            s, who = prev_sim[k], int(prev_row[k])
            if local:
                g = gram[k, local]
                m = int(np.argmax(g))
                if g[m] > s:
                    s, who = g[m], int(block[local[m]])
            if who >= 0:
                out.similarity[r] = s
                out.nearest[r] = who
            if s > thr:
                continue
            out.keep[r] = True
            local.append(k)
        if local:
            index.add(xb[local])
            kept_rows.extend(int(block[k]) for k in local)
    return out
