"""Cherry LLM's brief-experience selection: a few typical rows from every region of the data.

How. The rows' vectors (`thresher.filters.embedding`) are split into `k` clusters by FAISS k-means (seeded,
spherical, since the vectors are unit length). In each cluster, the rows whose score (Cherry: the model's
perplexity on the row) lies between two quantiles of that cluster's scores (the 25th and 75th, inclusive; numpy's
linear interpolation) are sorted by score, and `per_cluster` of them are picked at evenly spaced positions
(`np.linspace(0, m - 1, per_cluster)` rounded down), so the picks cover the middle of the cluster's range rather
than its extremes. A cluster with fewer middle rows gives them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from thresher.errors import ConfigError, StepError
from thresher.filters.embedding import DEFAULT_TEXT, EmbeddingStep, faiss_module, score_values
from thresher.pipelines import GlobalFilter, runtime, secret


class KMeansSample(EmbeddingStep, GlobalFilter):
    """Per k-means cluster, `per_cluster` evenly spaced rows among those whose `score` lies between the cluster's
    `quantiles` (see the module docstring; Cherry: k=100, 10 per cluster, perplexity, 25th-75th).

    k: clusters. per_cluster: rows picked per cluster. score: the column ranked within clusters. quantiles: (low,
    high), fractions in [0, 1]. seed / niter: k-means seed and iterations. text / vectors / embedder / language:
    where the vectors come from. Every row gets `cluster`.
    """

    inputs = ()
    outputs = ("cluster",)
    VERSION = "1"

    def __init__(
        self,
        *,
        k: int = 100,
        per_cluster: int = 10,
        score: str = "perplexity",
        quantiles: Sequence[float] = (0.25, 0.75),
        seed: int = 0,
        niter: int = 20,
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
        self.k = k
        self.per_cluster = per_cluster
        self.score = score
        self.quantiles = quantiles
        self.seed = seed
        self.niter = niter
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
        self.check_positive("k", "per_cluster", "niter")
        q = self.quantiles
        if (
            isinstance(q, str)
            or not isinstance(q, (list, tuple))
            or len(q) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in q)
            or not 0.0 <= q[0] <= q[1] <= 1.0
        ):
            raise ConfigError(f"{name}: quantiles must be (low, high) with 0 <= low <= high <= 1, got {q!r}")
        if not isinstance(self.score, str) or not self.score:
            raise ConfigError(f"{name}: score must name the column ranked within clusters, got {self.score!r}")
        super().check()

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        name = type(self).__name__
        scores = score_values(table, self.score, name)
        x = self.row_vectors(table)
        n = table.num_rows
        if n < self.k:
            raise StepError(f"{name}: {n} rows cannot make k={self.k} clusters; lower k to at most {n}")
        faiss = faiss_module(self.threads)
        km = faiss.Kmeans(x.shape[1], self.k, niter=self.niter, seed=self.seed, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        cluster = assign[:, 0].astype(np.int64)
        keep = np.zeros(n, dtype=bool)
        reasons: list[str | None] = [None] * n
        lo_q, hi_q = float(self.quantiles[0]), float(self.quantiles[1])
        span = f"{lo_q:g}-{hi_q:g} quantile range"
        for c in range(self.k):
            rows = np.flatnonzero(cluster == c)
            if not len(rows):
                continue
            s = scores[rows]
            lo, hi = np.quantile(s, [lo_q, hi_q])
            middle = rows[(s >= lo) & (s <= hi)]
            middle = middle[np.argsort(scores[middle], kind="stable")]
            if len(middle) <= self.per_cluster:
                picks = middle
            else:
                picks = middle[np.unique(np.linspace(0, len(middle) - 1, self.per_cluster).astype(np.int64))]
            keep[picks] = True
            in_middle = set(middle.tolist())
            for r in rows.tolist():
                if keep[r]:
                    continue
                if r in in_middle:
                    reasons[r] = (
                        f"cluster {c}: {self.score} {scores[r]:.4g} is within the cluster's {span} "
                        f"[{lo:.4g}, {hi:.4g}] but not one of its {self.per_cluster} evenly spaced picks"
                    )
                else:
                    reasons[r] = f"cluster {c}: {self.score} {scores[r]:.4g} is outside the cluster's {span} [{lo:.4g}, {hi:.4g}]"
        sizes = np.bincount(cluster, minlength=self.k)
        self.stats_ = {"clusters": int((sizes > 0).sum()), "kept": int(keep.sum()), "largest_cluster": int(sizes.max())}
        return pa.array(keep, pa.bool_()), reasons, {"cluster": pa.array(cluster, pa.int64())}
