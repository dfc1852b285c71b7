"""MIGSelect: MIG's greedy selection (Chen et al., arXiv 2504.13835), which maximises the information of the kept set
in a graph of InsTag tags, so a selection weighs quality and tag coverage at once.

How. Tags are the graph's nodes: the distinct tags of the `tags` column (sorted), embedded (the bundled
all-MiniLM-L6-v2 by default) and joined by an edge wherever their cosine similarity is >= `tag_similarity` (0.9),
weighted by that similarity (a tag's own weight is 1); each column of that matrix is then divided by its sum, so
the propagation matrix P spreads a unit of information over a tag and its near-synonyms. A row's vector is its
quality (`score`, DEITA's quality x complexity by default) spread evenly over its distinct tags, v = score/|tags| on
each; its information in the graph is u = v P. The set's information is E(S) = sum over tags of phi(sum of u over
S), with the concave phi(x) = (x + 1e-6)^0.8: a tag already well covered adds less, so diversity is rewarded.
Selection is greedy: the row with the largest gain joins, its u is added, the gains change, and so on until
`budget` rows. `gain="gradient"` is the gain MIG's sampler uses, the first-order change u . phi'(c) at the current
per-tag information c; `gain="exact"` is the true marginal gain sum(phi(c + u) - phi(c)).

Why it is fast. U (rows x tags) is sparse: a row touches its own tags and their near-synonyms. Selecting a row
changes c only on the tags that row touches, so only the rows sharing one of those tags need new gains: they are
recomputed, all at once, from U's compressed rows (numpy gathers and `reduceat`), and the next row is one `argmax`.
Gains never grow (phi' falls as c grows), so a row's gain when it is chosen is the largest left. Ties go to the
row earlier in the input.

Every row gets `mig_rank` (1 = chosen first; null for rows left out) and `mig_gain` (the gain it was chosen with,
or, for a row left out, its gain when the budget was filled), so a kept row says why it was kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import ConfigError, StepError
from thresher.filters.select import row_names, score_array
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime
from thresher.pipelines.step import GlobalFilter

GAINS: tuple[str, ...] = ("gradient", "exact")
_BLOCK = 2048  # tags per block of the similarity product (a block x all-tags float64 matrix at a time)


def tag_graph(vectors: np.ndarray, similarity: float) -> Any:
    """MIG's propagation matrix (scipy CSC, tags x tags): cosine of unit `vectors` where >= `similarity`, 1 on the
    diagonal, each column divided by its sum. Built block by block, so the dense tags x tags matrix never exists."""
    from scipy import sparse

    e = np.asarray(vectors, dtype=np.float64)
    n = len(e)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.ones(n)]
    for lo in range(0, n, _BLOCK):
        sims = e[lo : lo + _BLOCK] @ e.T
        r, c = np.nonzero(sims >= similarity)
        off = r + lo != c  # a tag's own weight is 1 (unit vectors), set above
        rows.append(r[off] + lo)
        cols.append(c[off])
        vals.append(sims[r[off], c[off]])
    w = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    w.sum_duplicates()
    sums = np.asarray(w.sum(axis=0)).ravel()
    return (w @ sparse.diags(1.0 / sums)).tocsc()


class MIGSelect(ModelStep, GlobalFilter):
    """Keep `budget` rows chosen greedily by MIG's information gain (see the module docstring).

    score: the quality column (DEITA's `deita_score` by default; any non-negative score column), or None to give
    every row quality 1 (tag coverage alone). tags: the column of InsTag tags (thresher.scorers.Tagger writes it);
    a row with no tags adds no information and is chosen last. tag_similarity: the cosine at which two tags are
    joined in the graph (0.9). power, epsilon: phi(x) = (x + epsilon)^power (0.8, 1e-6). gain: "gradient" (MIG's
    sampler) or "exact" (the true marginal gain). embedder: the tag embedding model (None: bundled MiniLM).
    """

    inputs = ("id", "tags")
    outputs = ("mig_rank", "mig_gain")
    model_params = {"embedder": "embed"}
    VERSION = "1"

    def __init__(
        self,
        *,
        budget: int = 1000,
        score: str | None = "deita_score",
        tags: str = "tags",
        tag_similarity: float = 0.9,
        power: float = 0.8,
        epsilon: float = 1e-6,
        gain: str = "gradient",
        embedder: Mapping[str, Any] | Any | None = None,
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.budget = budget
        self.score = score
        self.tags = tags
        self.tag_similarity = tag_similarity
        self.power = power
        self.epsilon = epsilon
        self.gain = gain
        self.embedder = embedder
        self.cache = cache
        self.progress = progress

    def reads(self) -> tuple[str, ...]:
        return ("id", self.tags) if self.score is None else ("id", self.tags, self.score)

    def missing_columns_hint(self, missing: Sequence[str]) -> str:
        hints = []
        if self.tags in missing:
            hints.append(
                f"MIGSelect needs InsTag tags per row in {self.tags!r}: put thresher.scorers.Tagger before it "
                "(it writes `tags`), or name your tag column with tags=..."
            )
        if self.score is not None and self.score in missing:
            hints.append(
                f"MIGSelect weighs rows by the quality column {self.score!r}: put thresher.scorers.DeitaScorer "
                "before it (it writes `deita_score`), name another score column with score=..., or set score=None "
                "to weigh every row the same"
            )
        return " ".join(hints)

    def check(self) -> None:
        name = type(self).__name__
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
            raise ConfigError(f"{name}: budget must be an integer >= 0 (rows to keep), got {self.budget!r}")
        if self.score is not None and (not isinstance(self.score, str) or not self.score):
            raise ConfigError(f"{name}: score must be a column name or None, got {self.score!r}")
        if not isinstance(self.tags, str) or not self.tags:
            raise ConfigError(f"{name}: tags must be a column name, got {self.tags!r}")
        for key, low, high, open_low in (("tag_similarity", -1.0, 1.0, False), ("power", 0.0, 1.0, True)):
            v = getattr(self, key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if open_low else v >= low)
            if not ok or v > high:
                raise ConfigError(f"{name}: {key} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], "
                                  f"got {v!r}")
        e = self.epsilon
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0 or not math.isfinite(e):
            raise ConfigError(f"{name}: epsilon must be a number > 0, got {e!r}")
        if self.gain not in GAINS:
            raise ConfigError(f"{name}: unknown gain {self.gain!r}; valid choices: {', '.join(GAINS)}")
        super().check()

    # ---- phi ------------------------------------------------------------------------------------

    def _phi(self, x: np.ndarray) -> np.ndarray:
        return np.power(x + self.epsilon, self.power)

    def _dphi(self, x: np.ndarray) -> np.ndarray:
        return self.power * np.power(x + self.epsilon, self.power - 1.0)

    # ---- the rows -------------------------------------------------------------------------------

    def _row_tags(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(row of each (row, tag) pair, tag index of each pair, the sorted vocabulary), one pair per distinct tag
        of a row."""
        name = type(self).__name__
        col = table.column(self.tags)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not (
            pa.types.is_string(col.type.value_type) or pa.types.is_large_string(col.type.value_type)
            or pa.types.is_null(col.type.value_type)
        ):
            raise StepError(f"{name}: column {self.tags!r} must hold lists of tag strings (Tagger's `tags`), "
                            f"found {col.type}")
        nulls = np.flatnonzero(np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False)))
        if len(nulls):
            raise StepError(
                f"{name}: {len(nulls)} row(s) have no {self.tags!r} (null): {row_names(table, nulls)}; tag every "
                "row (Tagger sends rows it could not tag to `failed`, never a null), or drop these rows first"
            )
        lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = pc.list_flatten(col).cast(pa.string())
        rows = np.repeat(np.arange(len(col)), lengths)
        if flat.null_count:
            bad = np.unique(rows[np.asarray(pc.is_null(flat).to_numpy(zero_copy_only=False))])
            raise StepError(f"{name}: null tags inside {self.tags!r} in row(s) {row_names(table, bad)}")
        vocab = sorted(set(flat.to_pylist()))
        index = pa.array(vocab, pa.string())
        tag = np.asarray(pc.index_in(flat, value_set=index).to_numpy(zero_copy_only=False), dtype=np.int64)
        # a tag said twice in one row counts once
        pair = np.unique(rows * max(1, len(vocab)) + tag)
        return pair // max(1, len(vocab)), pair % max(1, len(vocab)), vocab

    def information(self, table: pa.Table) -> tuple[Any, list[str], np.ndarray]:
        """(U, the vocabulary, the scores): U is the rows x tags matrix (scipy CSR) of each row's propagated
        information, v P, as the module docstring defines it."""
        from scipy import sparse

        name = type(self).__name__
        n = table.num_rows
        pair_row, pair_tag, vocab = self._row_tags(table)
        if self.score is None:
            scores = np.ones(n)
        else:
            scores = score_array(table, self.score, name)
            neg = np.flatnonzero(scores < 0)
            if len(neg):
                raise StepError(
                    f"{name}: {len(neg)} row(s) have a negative {self.score!r}: {row_names(table, neg)}; MIG spreads a "
                    "non-negative quality over tags (rescale the score, or pick another column)"
                )
        if not vocab:
            return sparse.csr_matrix((n, 0)), vocab, scores
        n_tags = np.bincount(pair_row, minlength=n)
        v = sparse.csr_matrix((scores[pair_row] / n_tags[pair_row], (pair_row, pair_tag)), shape=(n, len(vocab)))
        vectors = self.model("embedder").embed(vocab)
        p = tag_graph(vectors, float(self.tag_similarity))
        self.graph_edges_ = int((p.nnz - len(vocab)) // 2)
        u = (v @ p).tocsr()
        u.sort_indices()
        return u, vocab, scores

    def select(self, u: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy selection over the information matrix U (scipy CSR): (rows in the order chosen, the gain each
        was chosen with, every row's gain when selection stopped)."""
        n, n_tags = u.shape
        budget = min(int(self.budget), n)
        indptr, indices, data = u.indptr, u.indices, u.data
        csc = u.tocsc()
        c = np.zeros(n_tags)
        exact = self.gain == "exact"
        gains = self._gains(np.arange(n), indptr, indices, data, c, exact)
        order = np.empty(budget, dtype=np.int64)
        chosen_gain = np.empty(budget)
        chosen = np.zeros(n, dtype=bool)
        for step in range(budget):
            i = int(np.argmax(gains))
            order[step], chosen_gain[step] = i, gains[i]
            chosen[i] = True
            gains[i] = -np.inf
            lo, hi = indptr[i], indptr[i + 1]
            touched = indices[lo:hi]
            if not len(touched):
                continue  # a row without tags changes nothing
            c[touched] += data[lo:hi]
            # rows sharing a tag with the chosen row: their gains changed
            starts, stops = csc.indptr[touched], csc.indptr[touched + 1]
            hit = np.zeros(n, dtype=bool)
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                hit[csc.indices[a:b]] = True
            hit &= ~chosen
            rows = np.flatnonzero(hit)
            if len(rows):
                gains[rows] = self._gains(rows, indptr, indices, data, c, exact)
        gains[chosen] = np.nan  # a chosen row's gain is the one it was chosen with
        return order, chosen_gain, gains

    def _gains(
        self, rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, c: np.ndarray, exact: bool
    ) -> np.ndarray:
        """Gains of `rows` at per-tag information `c`, from U's CSR arrays; 0 for a row without tags."""
        starts, stops = indptr[rows], indptr[rows + 1]
        lens = stops - starts
        out = np.zeros(len(rows))
        has = lens > 0
        if not has.any():
            return out
        starts, lens = starts[has], lens[has]
        # positions of every nonzero of the rows, row after row
        seg = np.concatenate(([0], np.cumsum(lens)[:-1]))
        pos = np.arange(int(lens.sum())) - np.repeat(seg - starts, lens)
        cols, vals = indices[pos], data[pos]
        if exact:
            terms = self._phi(c[cols] + vals) - self._phi(c[cols])
        else:
            terms = vals * self._dphi(c[cols])
        out[has] = np.add.reduceat(terms, seg)
        return out

    def begin(self) -> None:
        super().begin()
        self.stats_: dict[str, Any] = {}

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        t0 = time.perf_counter()
        u, vocab, _ = self.information(table)
        t1 = time.perf_counter()
        order, chosen_gain, final_gain = self.select(u)
        t2 = time.perf_counter()
        n = table.num_rows
        rank = np.zeros(n, dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        keep = rank > 0
        gain = final_gain.copy()
        gain[order] = chosen_gain
        last = f"{chosen_gain[-1]:.6g}" if len(order) else None
        has_tags = np.diff(u.indptr) > 0
        reasons: list[str | None] = [None] * n
        for i in np.flatnonzero(~keep).tolist():
            why = f"not selected: MIG's budget of {self.budget} rows was filled"
            if last is not None:
                why += f"; its information gain then was {gain[i]:.6g}, the last row kept had {last}"
            if not has_tags[i]:
                why += " (the row has no tags, so it adds no information)"
            reasons[i] = why
        phi0 = float(self._phi(np.zeros(1))[0])
        c = np.asarray(u[order].sum(axis=0)).ravel() if len(order) else np.zeros(u.shape[1])
        self.stats_ = {
            "rows": n,
            "kept": int(keep.sum()),
            "tags": len(vocab),
            "tag_edges": getattr(self, "graph_edges_", 0),
            "rows_without_tags": int((~has_tags).sum()),
            "information": float((self._phi(c) - phi0).sum()),
            "graph_seconds": round(t1 - t0, 4),
            "select_seconds": round(t2 - t1, 4),
        }
        return (
            keep,
            reasons,
            {
                "mig_rank": pa.array(np.where(keep, rank, 0), pa.int64(), mask=~keep),
                "mig_gain": pa.array(gain, pa.float64()),
            },
        )

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **getattr(self, "stats_", {})}
