"""Embedding near-dedup: rows whose cosine similarity is at least a threshold are duplicates; one row of each group
stays.

How. Every row gets a unit vector (`thresher.filters.embedding`: the text embedded through a cached backend, or a
vector column). Every pair at cosine >= `threshold` is found with FAISS: an exact flat inner-product range search
below `exact_below` rows, an inverted file (IVF) above
it (FAISS k-means cells, each row compared with the rows of its `nprobe` nearest cells). A pair counts when either row finds the other, which is what lifts an approximate index's
recall. Groups are then either the connected components of the pair graph (a chain a~b~c is one group) or built
greedily: rows are walked best first (highest `score`, or row order) and a row goes when a row already kept is its
duplicate. The survivor of a group is its best row. Every row gets `dup_group`, `nearest_kept_id` and
`nearest_similarity`; a removed row's reason names the kept row and the cosine.

Re-thresholding costs no embedding: in a run the step stores its vectors in its step folder (`vectors.npy`), and
`rethreshold(run_dir, step, threshold)` (or `thresher rethreshold RUN STEP --threshold 0.85`) repeats only the
search and the grouping on them. Re-running the step itself embeds nothing either: the vectors are in the request
cache.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from thresher.errors import ConfigError, PipelineError, StepError
from thresher.filters.embedding import (
    DEFAULT_TEXT,
    EmbeddingStep,
    faiss_module,
    order_by_score,
    row_ids,
    score_values,
)
from thresher.pipelines import GlobalFilter, runtime, secret

if TYPE_CHECKING:
    from thresher.pipelines.execute import StepResult

INDEXES: tuple[str, ...] = ("auto", "flat", "ivf")
GROUPINGS: tuple[str, ...] = ("components", "greedy")
VECTORS_FILE = "vectors.npy"
_QUERY_BATCH = 8192  # rows per search call or matrix product: bounds the memory of one step
_TRAIN_PER_CELL = 40  # k-means sample: rows per cell (FAISS warns below 39)


@dataclass
class DuplicatePairs:
    """Pairs of rows at cosine >= threshold (i < j, each pair once) and how they were found."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray
    threshold: float
    index: str
    stats: dict[str, Any] = field(default_factory=dict)


def find_pairs(
    vectors: np.ndarray,
    threshold: float,
    *,
    index: str = "auto",
    exact_below: int = 20_000,
    nlist: int | None = None,
    nprobe: int = 8,
    seed: int = 0,
    threads: int | None = None,
) -> DuplicatePairs:
    """Every pair of rows of `vectors` (unit rows, float32) with inner product >= `threshold`.

    index "flat": exact, FAISS IndexFlatIP range search. "ivf": approximate; FAISS k-means (seeded, on a sample)
    splits the rows into `nlist` cells (None: about 2 sqrt(rows)), each row lives in its nearest cell and is
    compared with every row of its `nprobe` nearest cells, cell by cell as one matrix product (BLAS), so the
    work is about rows x nprobe x rows/nlist inner products; a pair counts when either row finds the other.
    "auto": "flat" below `exact_below` rows, "ivf" from there on. The cosines returned are exact in every mode."""
    faiss = faiss_module(threads)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0] if x.ndim == 2 else 0
    kind = ("flat" if n < exact_below else "ivf") if index == "auto" else index
    if kind not in ("flat", "ivf"):
        raise ConfigError(f"unknown index {index!r}; valid: {list(INDEXES)}")
    stats: dict[str, Any] = {"index": kind, "rows": n}
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return DuplicatePairs(empty, empty, np.zeros(0, dtype=np.float32), float(threshold), kind, stats)
    thr = np.float32(threshold)
    t0 = time.perf_counter()
    if kind == "flat":
        i, j = _flat_pairs(faiss, x, thr)
    else:
        cells = max(1, min(nlist or ivf_cells(n), n // 4 or 1))
        i, j = _ivf_pairs(faiss, x, thr, cells, min(nprobe, cells), seed, stats)
        stats.update(nlist=cells, nprobe=min(nprobe, cells))
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    # each pair once (found from both sides, or from one); its cosine recomputed so both sides agree exactly
    _, first = np.unique(lo * n + hi, return_index=True)
    lo, hi = lo[first], hi[first]
    s = np.einsum("ij,ij->i", x[lo], x[hi]) if len(lo) else np.zeros(0, dtype=np.float32)
    keep = s >= thr
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    stats["pairs"] = int(keep.sum())
    return DuplicatePairs(lo[keep], hi[keep], s[keep].astype(np.float32), float(threshold), kind, stats)


def _flat_pairs(faiss: Any, x: np.ndarray, thr: np.float32) -> tuple[np.ndarray, np.ndarray]:
    n, d = x.shape
    ix = faiss.IndexFlatIP(d)
    ix.add(x)
    # FAISS keeps inner products above the radius; one float32 step below the threshold keeps those equal to it
    radius = float(np.nextafter(thr, np.float32(-np.inf)))
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for a in range(0, n, _QUERY_BATCH):
        q = x[a : a + _QUERY_BATCH]
        lims, dist, ids = ix.range_search(q, radius)
        rows = np.repeat(np.arange(a, a + len(q), dtype=np.int64), np.diff(lims.astype(np.int64)))
        ids = ids.astype(np.int64, copy=False)
        ok = (ids != rows) & (dist >= thr) & (ids >= 0)
        src.append(rows[ok])
        dst.append(ids[ok])
    return np.concatenate(src), np.concatenate(dst)


def _ivf_pairs(
    faiss: Any, x: np.ndarray, thr: np.float32, cells: int, nprobe: int, seed: int, stats: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    n, d = x.shape
    t0 = time.perf_counter()
    train_n = min(n, cells * _TRAIN_PER_CELL)
    sample = x if train_n == n else x[np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))]
    km = faiss.Kmeans(d, cells, niter=10, seed=seed, spherical=True, max_points_per_centroid=_TRAIN_PER_CELL)
    km.train(sample)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    stats["train_seconds"] = round(time.perf_counter() - t0, 3)
    # each row's nprobe nearest cells, nearest first; the first is the row's own cell
    t0 = time.perf_counter()
    probes = np.empty((n, nprobe), dtype=np.int64)
    for a in range(0, n, _QUERY_BATCH):
        sims = x[a : a + _QUERY_BATCH] @ centroids.T
        if nprobe < cells:
            part = np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe]
        else:
            part = np.broadcast_to(np.arange(cells), sims.shape).copy()
        best = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        probes[a : a + len(sims)] = np.take_along_axis(part, best, axis=1)
    stats["assign_seconds"] = round(time.perf_counter() - t0, 3)
    home = probes[:, 0]
    members = np.argsort(home, kind="stable")
    member_bounds = np.searchsorted(home[members], np.arange(cells + 1))
    flat_cells = probes.ravel()
    askers = np.argsort(flat_cells, kind="stable")
    asker_bounds = np.searchsorted(flat_cells[askers], np.arange(cells + 1))
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    compared = 0
    for c in range(cells):
        m = members[member_bounds[c] : member_bounds[c + 1]]
        if not len(m):
            continue
        q_all = askers[asker_bounds[c] : asker_bounds[c + 1]] // nprobe  # rows that probe this cell
        xm = x[m]
        for a in range(0, len(q_all), _QUERY_BATCH):
            q = q_all[a : a + _QUERY_BATCH]
            qi, mj = np.nonzero((x[q] @ xm.T) >= thr)
            src.append(q[qi])
            dst.append(m[mj])
        compared += len(q_all) * len(m)
    stats["inner_products"] = compared
    i, j = np.concatenate(src), np.concatenate(dst)
    ok = i != j
    return i[ok], j[ok]


#: searches each cluster's rows (row numbers into the vectors) with `find_pairs(vectors[rows], threshold, **search)`
#: and returns their pairs in the clusters' order: one after another here, or elsewhere (the Ray runner: a task each)
ClusterSearch = Callable[[list[np.ndarray], float, dict[str, Any]], list[DuplicatePairs]]


def sharded_pairs(vectors: np.ndarray, threshold: float, *, shards: int, seed: int = 0, threads: int | None = None,
                  search_clusters: ClusterSearch | None = None, **search: Any) -> DuplicatePairs:  # fmt: skip
    """The pairs within k-means clusters only, for inputs whose one index would not fit in memory (the semantic
    dedup of NeMo Curator): the rows split into `shards` clusters (FAISS spherical k-means, seeded, trained on a
    sample), and each cluster is searched on its own with `find_pairs` (`search`: its index options), by
    `search_clusters` when given (the clusters are independent, so they may be searched in parallel), else one
    after another. A pair whose rows fall in two clusters is not found; at a high threshold such pairs are rare,
    since a near duplicate is nearly always closest to its twin's centroid. Work and index memory go with the
    largest cluster."""
    faiss = faiss_module(threads)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0] if x.ndim == 2 else 0
    k = max(1, min(int(shards), n // _TRAIN_PER_CELL or 1))
    t0 = time.perf_counter()
    if k > 1:
        train_n = min(n, k * 256)
        sample = x if train_n == n else x[np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))]
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, max_points_per_centroid=256)
        km.train(sample)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        label = np.concatenate([np.argmax(x[a : a + _QUERY_BATCH] @ centroids.T, axis=1)
                                for a in range(0, n, _QUERY_BATCH)]) if n else np.zeros(0, np.int64)  # fmt: skip
    else:
        label = np.zeros(n, dtype=np.int64)
    cluster_s = time.perf_counter() - t0
    src, dst, sims = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    sizes = np.bincount(label, minlength=k) if n else np.zeros(k, np.int64)
    kinds: set[str] = set()
    clusters = [np.flatnonzero(label == c) for c in range(k)]
    options = {"seed": seed, "threads": threads, **search}
    if search_clusters is None:
        found = [find_pairs(x[rows], threshold, **options) for rows in clusters]
    else:
        found = search_clusters(clusters, float(threshold), options)
    for rows, p in zip(clusters, found, strict=True):
        kinds.add(p.index)
        src.append(rows[p.i])
        dst.append(rows[p.j])
        sims.append(p.sim)
    i, j, sim = np.concatenate(src), np.concatenate(dst), np.concatenate(sims)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((hi, lo))  # the order find_pairs gives: by first row, then second
    kind = "+".join(sorted(kinds)) or "flat"
    stats: dict[str, Any] = {"index": kind, "rows": n, "shards": k,
             "largest_shard": int(sizes.max()) if n else 0, "cluster_seconds": round(cluster_s, 3),
             "pairs": len(lo), "cluster_search": getattr(search_clusters, "__name__", "given") if search_clusters else "sequential"}  # fmt: skip
    return DuplicatePairs(lo[order], hi[order], sim[order], float(threshold), kind, stats)


def ivf_cells(n: int) -> int:
    """IVF cells for n rows: about 2 sqrt(n), at least 1."""
    return max(1, int(2 * math.sqrt(n)))


@dataclass
class Grouping:
    """What dedup decided for each row (arrays aligned with the rows)."""

    keep: np.ndarray  # bool
    group: np.ndarray  # int64, -1 for a row with no duplicate
    nearest_kept: np.ndarray  # int64 row of the kept duplicate, -1 for kept rows
    similarity: np.ndarray  # float32 cosine to it, NaN for kept rows
    chained: np.ndarray  # bool: in the same component but below the threshold to the survivor


def group_rows(
    vectors: np.ndarray, pairs: DuplicatePairs, *, grouping: str = "components", priority: np.ndarray | None = None
) -> Grouping:
    """Groups and survivors from the pairs. `priority`: row positions best first (None: row order)."""
    n = len(vectors)
    rank = np.empty(n, dtype=np.int64)
    order = np.arange(n, dtype=np.int64) if priority is None else np.asarray(priority, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    group = np.full(n, -1, dtype=np.int64)
    nearest = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan, dtype=np.float32)
    chained = np.zeros(n, dtype=bool)
    if not len(pairs.i):
        return Grouping(keep, group, nearest, sim, chained)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if grouping == "components":
        graph = coo_matrix((np.ones(len(pairs.i), dtype=np.int8), (pairs.i, pairs.j)), shape=(n, n)).tocsr()
        _, label = connected_components(graph, directed=False)
        # the survivor of each component: its row of lowest rank
        best_rank = np.full(label.max() + 1, n, dtype=np.int64)
        np.minimum.at(best_rank, label, rank)
        survivor = order[best_rank[label]]
        sizes = np.bincount(label)
        in_group = sizes[label] > 1
        removed = in_group & (survivor != np.arange(n))
        keep[removed] = False
        nearest[removed] = survivor[removed]
        rows = np.flatnonzero(removed)
        sim[rows] = np.einsum("ij,ij->i", vectors[rows], vectors[survivor[rows]])
        chained[rows] = sim[rows] < np.float32(pairs.threshold)
        group[in_group] = survivor[in_group]
    elif grouping == "greedy":
        both_i = np.concatenate([pairs.i, pairs.j])
        both_j = np.concatenate([pairs.j, pairs.i])
        both_s = np.concatenate([pairs.sim, pairs.sim])
        by = np.lexsort((both_j, both_i))
        both_i, both_j, both_s = both_i[by], both_j[by], both_s[by]
        starts = np.searchsorted(both_i, np.arange(n + 1))
        linked = np.flatnonzero(np.diff(starts) > 0)
        for r in linked[np.argsort(rank[linked], kind="stable")].tolist():
            nb = both_j[starts[r] : starts[r + 1]]
            ok = keep[nb] & (rank[nb] < rank[r])
            if ok.any():
                s = both_s[starts[r] : starts[r + 1]]
                s_ok = np.where(ok, s, -np.inf)
                best = int(np.argmax(s_ok))
                keep[r] = False
                nearest[r] = nb[best]
                sim[r] = s[best]
        removed = ~keep
        group[removed] = nearest[removed]
        group[np.unique(nearest[removed])] = np.unique(nearest[removed])
    else:
        raise ConfigError(f"unknown grouping {grouping!r}; valid: {list(GROUPINGS)}")
    # groups numbered 0, 1, ... in the order of their survivors' rows
    has = group >= 0
    if has.any():
        _, group[has] = np.unique(group[has], return_inverse=True)
    return Grouping(keep, group, nearest, sim, chained)


class NearDedup(EmbeddingStep, GlobalFilter):
    """Drop rows whose embedding is within cosine `threshold` of a better row (see the module docstring).

    threshold: cosine at or above which two rows are duplicates (0.9). text: the columns embedded, joined
    (instruction + input); vectors: a column that already holds each row's vector (then nothing is embedded).
    embedder: an embedding backend spec or object (None: bundled all-MiniLM-L6-v2, or the multilingual encoder for
    language="zh"). index: "auto" (exact below `exact_below` rows, IVF above), "flat" (exact) or "ivf" (see
    `find_pairs`); nlist/nprobe: IVF cells (None: about 2 sqrt(rows)) and the cells each row is compared with.
    grouping: "components" (chains join groups) or "greedy" (best first, a row goes
    only when a kept row is its duplicate). score: the column whose highest value survives a group (None: the first
    row). seed: IVF training sample and k-means seed. shards: for inputs too large for one index, split the rows
    into this many k-means clusters and dedup within each (`sharded_pairs`; None: one index over all rows).
    """

    inputs = ()
    outputs = ("dup_group", "nearest_kept_id", "nearest_similarity")
    VERSION = "1"
    #: vectors handed over by `rethreshold` (read from a run directory): used instead of embedding
    preset_vectors_: np.ndarray | None = None

    def __init__(
        self,
        *,
        threshold: float = 0.9,
        text: Sequence[str] = DEFAULT_TEXT,
        vectors: str | None = None,
        embedder: Mapping[str, Any] | Any | None = None,
        language: str = "en",
        index: str = "auto",
        exact_below: int = 20_000,
        nlist: int | None = None,
        nprobe: int = 8,
        grouping: str = "components",
        score: str | None = None,
        seed: int = 0,
        shards: int | None = None,
        store_vectors: bool = runtime(True),
        threads: int | None = runtime(None),
        api_key: str | None = secret(),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.threshold = threshold
        self.text = text
        self.vectors = vectors
        self.embedder = embedder
        self.language = language
        self.index = index
        self.exact_below = exact_below
        self.nlist = nlist
        self.nprobe = nprobe
        self.grouping = grouping
        self.score = score
        self.seed = seed
        self.shards = shards
        self.store_vectors = store_vectors
        self.threads = threads
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def reads(self) -> tuple[str, ...]:
        return (*self.vector_reads(), *((self.score,) if self.score else ()))

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        if params.get("shards") is None:  # unsharded: left out, so runs made before the option keep their fingerprints
            params.pop("shards", None)
        return params

    def check(self) -> None:
        name = type(self).__name__
        self.check_cosine("threshold")
        if self.index not in INDEXES:
            raise ConfigError(f"{name}: unknown index {self.index!r}; valid: {list(INDEXES)}")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"{name}: unknown grouping {self.grouping!r}; valid: {list(GROUPINGS)}")
        self.check_positive("exact_below", "nprobe")
        if self.shards is not None:
            self.check_positive("shards")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, int) or self.nlist < 1):
            raise ConfigError(f"{name}: nlist must be a positive integer or None (about 2 sqrt(rows)), got {self.nlist!r}")
        if self.score is not None and (not isinstance(self.score, str) or not self.score):
            raise ConfigError(f"{name}: score must be a column name or None (the first row survives), got {self.score!r}")
        super().check()

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        name = type(self).__name__
        scores = score_values(table, self.score, name) if self.score else None
        t0 = time.perf_counter()
        x = self.row_vectors(table)
        embed_s = time.perf_counter() - t0
        self._store(x)
        search: dict[str, Any] = {"index": self.index, "exact_below": self.exact_below, "nlist": self.nlist,
                                  "nprobe": self.nprobe, "seed": self.seed, "threads": self.threads}  # fmt: skip
        if self.shards is not None:
            # the Ray runner sets cluster_search_: one task per cluster over the vectors file
            pairs = sharded_pairs(x, float(self.threshold), shards=self.shards,
                                  search_clusters=getattr(self, "cluster_search_", None), **search)  # fmt: skip
        else:
            pairs = find_pairs(x, float(self.threshold), **search)
        g = group_rows(x, pairs, grouping=self.grouping, priority=None if scores is None else order_by_score(scores))
        ids = row_ids(table)
        t = self.threshold
        reasons: list[str | None] = []
        kept_ids: list[str | None] = []
        for r in range(table.num_rows):
            k = int(g.nearest_kept[r])
            if k < 0:
                reasons.append(None)
                kept_ids.append(None)
                continue
            kept_ids.append(ids[k])
            s = float(g.similarity[r])
            if g.chained[r]:
                reasons.append(
                    f"near duplicate of kept row {ids[k]!r}: cosine {s:.4f} to it, linked through rows at cosine "
                    f">= {t} (group {int(g.group[r])})"
                )
            else:
                reasons.append(f"near duplicate of kept row {ids[k]!r}: cosine {s:.4f} >= {t}")
        self.stats_ = {
            **pairs.stats,
            "embed_seconds": round(embed_s, 3),
            "groups": len(np.unique(g.group[g.group >= 0])),
            "removed": int((~g.keep).sum()),
        }
        sim = pa.array(g.similarity.astype(np.float64), pa.float64(), mask=np.isnan(g.similarity))
        columns = {
            "dup_group": pa.array(g.group, pa.int64(), mask=g.group < 0),
            "nearest_kept_id": pa.array(kept_ids, pa.string()),
            "nearest_similarity": sim,
        }
        return pa.array(g.keep, pa.bool_()), reasons, columns

    # ---- vectors kept for re-thresholding -------------------------------------------------------

    def row_vectors(self, table: pa.Table) -> np.ndarray:
        preset = getattr(self, "preset_vectors_", None)
        if preset is not None:
            if len(preset) != table.num_rows:
                raise StepError(
                    f"{type(self).__name__}: {len(preset)} stored vectors for {table.num_rows} rows; run the step again"
                )
            return np.ascontiguousarray(preset, dtype=np.float32)
        return super().row_vectors(table)

    def _uses_embedder(self) -> bool:
        return getattr(self, "preset_vectors_", None) is None and super()._uses_embedder()

    def _store(self, x: np.ndarray) -> None:
        folder = self.workdir_
        if folder is None or not self.store_vectors or getattr(self, "preset_vectors_", None) is not None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{VECTORS_FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, x)
        os.replace(tmp, folder / VECTORS_FILE)


def rethreshold(run_dir: str | os.PathLike[str], step: str, threshold: float, **overrides: Any) -> StepResult:
    """NearDedup's decisions at another `threshold` (and any other `overrides`, e.g. grouping="greedy") for the
    step named `step` in the run in `run_dir`, from the vectors it stored: nothing is embedded. Returns the
    output, rejected and failed tables with their counts; the run directory is left as it was."""
    from thresher.pipelines.registry import resolve
    from thresher.pipelines.runner import open_run

    run = open_run(run_dir)
    if step not in run.steps:
        raise PipelineError(f"{run_dir}: no step named {step!r}; steps: {list(run.steps)}")
    rec = run.steps[step]
    module, _, cls_name = rec.step.rpartition(".")
    cls = resolve(f"{module}:{cls_name}")
    if not issubclass(cls, NearDedup):
        raise PipelineError(f"{run_dir}: step {step!r} is a {cls_name}, not a NearDedup; only NearDedup re-thresholds")
    path = Path(run.run_dir) / rec.dir / VECTORS_FILE
    if not path.is_file():
        raise PipelineError(
            f"{run_dir}: step {step!r} stored no vectors ({path} is missing): it has not finished, or ran with "
            "store_vectors=False"
        )
    params = {k: v for k, v in rec.params.items() if k not in cls._secret_params}
    params.update(threshold=threshold, **overrides)
    dedup = cls(**params)
    parents = run.parents(step)
    if len(parents) != 1:
        raise PipelineError(f"{run_dir}: step {step!r} has {len(parents)} inputs; NearDedup takes one")
    table = run.table(parents[0])
    dedup.preset_vectors_ = np.load(path, mmap_mode="r")
    return dedup.apply(table)
