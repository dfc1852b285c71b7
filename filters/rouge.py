"""ROUGE-L similarity filter: drop rows too close to a pool of earlier texts (Self-Instruct's similarity filter).

How it stays exact and fast. Scores are rouge_score's ROUGE-L F1 (default tokenizer: lowercase ASCII alphanumeric
runs, no stemming): with LCS length l, candidate length m and pool text length n, P = l/n, R = l/m and
F = 2*P*R/(P+R), 0 when either text has no tokens; computed with the same floating-point operations, so the numbers
are rouge_score's to the last bit. A pool text can only score if it shares a token with the candidate, and its LCS
is at most their token overlap (multiset: the sum over shared tokens of the smaller count), so F <= 2*overlap/(m+n).
`RougePool` keeps an inverted index token -> (pool text, count), gets every overlapping pool text's bound in a few
numpy operations, and computes exact LCS (bit-parallel, over token ids, vectorised across pool texts) only for texts
whose bound can still beat the best score found so far, best bounds first. A text whose tokens equal a pool text's
is a score of 1 found by one dictionary lookup.

Tokenizers. "rouge_score" is rouge_score's own tokenization. "cjk" adds one token per CJK character (Han, kana,
hangul, bopomofo, ideographic iteration marks and numerals: see `_CJK`), because rouge_score drops every non-ASCII
character, so Chinese near-copies would all score 0 and pass. CJK punctuation (。，、「」…) and fullwidth forms
(ＡＢＣ１２３) are not tokens, as rouge_score drops them too; text without CJK characters tokenizes exactly as
"rouge_score" does.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from thresher.errors import ConfigError, StepError
from thresher.pipelines import GlobalFilter
from thresher.pipelines.fingerprint import file_digest

TOKENIZERS: tuple[str, ...] = ("rouge_score", "cjk")

# rouge_score: lowercase, then every run of [a-z0-9] is a token (its replace-by-space, split, keep-valid pipeline
# keeps exactly these runs). Lowercasing comes first, as there: "İ".lower() is "i" + a combining dot, a token "i".
_ALNUM = re.compile(r"[a-z0-9]+")
_CJK_CHARS = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u2e80-\u2eff\u2f00-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3005\u3007\u3021-\u3029\u3038-\u303b"  # 々 〇, Hangzhou numerals, 〻: letters and numbers among CJK symbols
    "\u3041-\u3096\u309d-\u309f"  # Hiragana
    "\u30a1-\u30fa\u30fc-\u30ff"  # Katakana (not the double hyphen ゠ nor the middle dot ・, which are punctuation)
    "\u3105-\u312f\u3131-\u318e\u31a0-\u31bf"  # Bopomofo, Hangul compatibility jamo, Bopomofo extended
    "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"  # Katakana extensions, CJK extension A, CJK unified ideographs
    "\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff"  # Hangul jamo extended A, syllables, jamo extended B
    "\uf900-\ufaff\uff66-\uff9f\uffa0-\uffdc"  # CJK compatibility ideographs, halfwidth katakana and hangul
    "\U0001b000-\U0001b16f"  # Kana supplement and extended A
    "\U00020000-\U0003ffff"  # CJK extensions B to H, compatibility supplement (planes 2 and 3)
)
_CJK = re.compile(f"[a-z0-9]+|[{_CJK_CHARS}]")

_EPS = 1e-12  # float slack when a bound is compared with a score: both are within a few ulps of their exact values
_FIRST = 64  # pool texts scored before pruning: the best bounds, which usually hold the best score
_CHUNK = 1024  # pool texts scored per round after that, re-pruning between rounds
_GROUP = 512  # pool texts per vectorised LCS pass (sorted by length, so padding stays small)
_popcount = getattr(np, "bitwise_count", None)


def rouge_tokens(text: str | None, tokenizer: str = "rouge_score") -> list[str]:
    """Tokens as ROUGE-L sees them: "rouge_score" = rouge_score's default tokenizer (no stemming); "cjk" = the same
    plus one token per CJK character (see the module docstring). None and "" give no tokens."""
    if not text:
        return []
    if tokenizer == "rouge_score":
        return _ALNUM.findall(text.lower())
    if tokenizer == "cjk":
        return _CJK.findall(text.lower())
    raise ConfigError(f"unknown ROUGE tokenizer {tokenizer!r}; valid choices: {', '.join(TOKENIZERS)}")


def rouge_l_f1(lcs: Any, m: Any, n: Any) -> Any:
    """rouge_score's F1 from LCS length and the two token counts, with its operations in its order (scalars or
    numpy arrays); 0 when either text is empty or nothing is shared."""
    if np.ndim(lcs) == 0:
        if not m or not n or not lcs:
            return 0.0
        p, r = lcs / n, lcs / m
        return 2 * p * r / (p + r)
    lcs = np.asarray(lcs, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = lcs / n
        r = lcs / m if m else np.zeros_like(lcs)
        f = 2.0 * p * r / (p + r)
    return np.where((lcs > 0) & (n > 0), f, 0.0)


class _Growable:
    """A numpy array that grows by doubling: appends in amortised O(1), a view of the filled part."""

    __slots__ = ("buf", "n")

    def __init__(self, dtype: Any, capacity: int = 4) -> None:
        self.buf = np.empty(capacity, dtype=dtype)
        self.n = 0

    def _reserve(self, k: int) -> None:
        if self.n + k > len(self.buf):
            new = np.empty(max(2 * len(self.buf), self.n + k), dtype=self.buf.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new

    def append(self, x: int) -> None:
        if self.n == len(self.buf):
            self._reserve(1)
        self.buf[self.n] = x
        self.n += 1

    def extend(self, xs: Sequence[int]) -> None:
        self._reserve(len(xs))
        self.buf[self.n : self.n + len(xs)] = xs
        self.n += len(xs)

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


class RougePool:
    """A growing pool of texts and exact ROUGE-L F1 queries against all of it.

    `add(text)` appends a text and returns its index. `nearest(text)` gives (max F1 over the pool, index of the
    first pool text reaching it): the true maximum, as `max(rouge_score F1 against every pool text)` would give;
    (0.0, -1) on an empty pool, and (0.0, 0) when no pool text shares a token (every score is 0, the first text
    reaches it). `nearest_over(text, threshold)` answers only "does some pool text score above `threshold`?" and
    may stop at the first one it finds, which makes it cheaper: its score is above `threshold` exactly when the
    pool's max is, and is then the exact score of the returned pool text (not necessarily the max); otherwise it is
    the best exact score among the pool texts that could have passed `threshold` (a lower bound of the max, never
    above `threshold`), or (0.0, -1) when none could. Use `nearest` when the number itself matters.
    """

    def __init__(self, tokenizer: str = "rouge_score") -> None:
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"RougePool: unknown tokenizer {tokenizer!r}; valid choices: {', '.join(TOKENIZERS)}")
        self.tokenizer = tokenizer
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        self._flat = _Growable(np.int64, 1024)  # every pool text's token ids, one after another
        self._starts = _Growable(np.int64, 256)
        self._lens = _Growable(np.int64, 256)
        self._post_ids: list[_Growable] = []  # token id -> pool texts holding it
        self._post_counts: list[_Growable] = []  # ... and how many times each holds it
        self._exact: dict[tuple[str, ...], int] = {}  # token sequence -> first pool text with it (score 1)
        #: work done so far: queries, posting entries read for bounds, pool texts whose LCS was computed, queries
        #: answered by an exact copy
        self.stats = {"queries": 0, "postings": 0, "lcs": 0, "exact_hits": 0}

    def __len__(self) -> int:
        return len(self.texts)

    def tokens(self, text: str | None) -> list[str]:
        return rouge_tokens(text, self.tokenizer)

    # ---- building -----------------------------------------------------------------------------------

    def add(self, text: str | None) -> int:
        """Append `text` (None counts as "") to the pool; returns its index."""
        return self._add(text or "", self.tokens(text))

    def extend(self, texts: Iterable[str | None]) -> list[int]:
        return [self.add(t) for t in texts]

    def _add(self, text: str, tokens: list[str]) -> int:
        idx = len(self.texts)
        self.texts.append(text)
        vocab = self._vocab
        ids = []
        for t in tokens:
            tid = vocab.get(t)
            if tid is None:
                tid = vocab[t] = len(vocab)
                self._post_ids.append(_Growable(np.int64))
                self._post_counts.append(_Growable(np.int32))
            ids.append(tid)
        self._starts.append(self._flat.n)
        self._lens.append(len(ids))
        self._flat.extend(ids)
        for tid, c in Counter(ids).items():
            self._post_ids[tid].append(idx)
            self._post_counts[tid].append(c)
        if tokens:
            self._exact.setdefault(tuple(tokens), idx)
        return idx

    # ---- queries ------------------------------------------------------------------------------------

    def nearest(self, text: str | None) -> tuple[float, int]:
        """(max ROUGE-L F1 of `text` against the pool, index of the first pool text reaching it); exact."""
        return self._search(self.tokens(text), None)

    def nearest_over(self, text: str | None, threshold: float) -> tuple[float, int]:
        """Like `nearest` for the decision `score > threshold` only; may stop early (see the class docstring)."""
        return self._search(self.tokens(text), float(threshold))

    def _search(self, tokens: list[str], threshold: float | None) -> tuple[float, int]:
        n_pool = len(self.texts)
        if not n_pool:
            return 0.0, -1
        self.stats["queries"] += 1
        m = len(tokens)
        if m:
            same = self._exact.get(tuple(tokens))
            if same is not None:  # F = 1 only for equal token sequences, and no score is higher
                self.stats["exact_hits"] += 1
                return 1.0, same
        bound = self._bounds(tokens)
        none = (0.0, -1) if threshold is not None else (0.0, 0)
        if bound is None:
            return none  # no shared token: every score is 0
        # pool texts worth scoring: those sharing a token and, for a decision, able to pass the threshold
        floor = max(threshold - _EPS, 0.0) if threshold is not None else 0.0
        pattern = self._pattern(tokens)
        lens = self._lens.view()
        best, best_idx = -1.0, -1
        if n_pool > _FIRST:
            take = np.argpartition(bound, n_pool - _FIRST)[n_pool - _FIRST :]
        else:
            take = np.arange(n_pool)
        while True:
            sel = take[bound[take] > floor]
            if len(sel):
                f = rouge_l_f1(self._lcs(pattern, sel), m, lens[sel])
                self.stats["lcs"] += len(sel)
                top = float(f.max())
                if top > best:
                    best, best_idx = top, int(sel[f == top].min())
                elif top == best:
                    best_idx = min(best_idx, int(sel[f == top].min()))
                if threshold is not None and best > threshold:
                    return best, best_idx
            bound[take] = -1.0  # scored
            # a text whose bound is below the best cannot reach it; one equal to it may tie at a lower index
            rest = np.flatnonzero(bound >= max(best - _EPS, floor))
            rest = rest[bound[rest] > floor]
            if not len(rest):
                break
            take = rest[np.argsort(-bound[rest], kind="stable")[:_CHUNK]]
        if best_idx < 0:
            return none
        return best, best_idx

    def _bounds(self, tokens: list[str]) -> np.ndarray | None:
        """Upper bounds of every pool text's F1 with the candidate: 2*overlap/(m+n), 0 for a text sharing no
        token; None when no pool text shares one."""
        vocab = self._vocab
        ids: list[np.ndarray] = []
        weights: list[np.ndarray | None] = []
        all_single = True
        for t, c in Counter(tokens).items():
            tid = vocab.get(t)
            if tid is None:
                continue
            ids.append(self._post_ids[tid].view())
            if c == 1:
                weights.append(None)
            else:
                all_single = False
                weights.append(np.minimum(self._post_counts[tid].view(), c))
        if not ids:
            return None
        n_pool = len(self.texts)
        flat_ids = np.concatenate(ids)
        self.stats["postings"] += len(flat_ids)
        if all_single:
            overlap = np.bincount(flat_ids, minlength=n_pool)
        else:
            w = np.concatenate([np.ones(len(i), np.int32) if x is None else x for i, x in zip(ids, weights, strict=True)])
            overlap = np.bincount(flat_ids, weights=w, minlength=n_pool)
        return 2.0 * overlap / (len(tokens) + self._lens.view())

    def _pattern(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """The candidate as bit masks: for each of its token ids known to the pool (sorted), the positions where it
        occurs, as `words` uint64 words (bit i of word w = position 64*w + i)."""
        words = max(1, (len(tokens) + 63) // 64)
        vocab = self._vocab
        if words == 1:
            masks: dict[int, int] = {}
            for i, t in enumerate(tokens):
                tid = vocab.get(t)
                if tid is not None:
                    masks[tid] = masks.get(tid, 0) | (1 << i)
            ids = np.array(sorted(masks), dtype=np.int64)
            return ids, np.array([masks[i] for i in ids.tolist()], dtype=np.uint64).reshape(-1, 1), 1
        known = [(i, tid) for i, t in enumerate(tokens) if (tid := vocab.get(t)) is not None]
        pos = np.array([i for i, _ in known], dtype=np.int64)
        ids, row = np.unique(np.array([tid for _, tid in known], dtype=np.int64), return_inverse=True)
        table = np.zeros((len(ids), words), dtype=np.uint64)
        np.bitwise_or.at(table, (row, pos >> 6), np.left_shift(np.uint64(1), (pos & 63).astype(np.uint64)))
        return ids, table, words

    def _lcs(self, pattern: tuple[np.ndarray, np.ndarray, int], sel: np.ndarray) -> np.ndarray:
        """LCS length of the candidate with each pool text in `sel`: the bit-parallel algorithm (Allison-Dix,
        Hyyrö), V' = (V + (V & M)) | (V & ~M) per pool-text token, vectorised across pool texts; LCS = zero bits
        of V. Bits above the candidate's length start at 1 and stay 1 (their match masks are 0)."""
        ids, table, words = pattern
        lens = self._lens.view()[sel]
        starts = self._starts.view()[sel]
        flat = self._flat.view()
        out = np.zeros(len(sel), dtype=np.int64)
        if not len(ids):
            return out
        order = np.argsort(lens, kind="stable")
        for g in range(0, len(sel), _GROUP):
            rows = order[g : g + _GROUP]
            ln = lens[rows]
            width = int(ln.max())
            if width == 0:
                continue
            steps = np.arange(width)[:, None]
            valid = steps < ln[None, :]
            tok = flat[np.where(valid, starts[rows][None, :] + steps, 0)]  # (width, k)
            j = np.minimum(np.searchsorted(ids, tok), len(ids) - 1)
            hit = valid & (ids[j] == tok)
            k = len(rows)
            if words == 1:
                m = np.where(hit, table[j, 0], np.uint64(0))
                not_m = ~m
                v = np.full(k, np.uint64(0xFFFFFFFFFFFFFFFF))
                u = np.empty_like(v)
                for s in range(width):
                    np.bitwise_and(v, m[s], out=u)
                    np.add(v, u, out=u)
                    np.bitwise_and(v, not_m[s], out=v)
                    np.bitwise_or(v, u, out=v)
                zeros = 64 - _bitcount(v)
            else:
                # a candidate longer than 64 tokens: V is `words` words per pool text, added with carries. Each
                # word adds on its own first; carries then move one word up per pass, and a pass is needed only
                # while some word overflowed (a chain longer than one word needs an all-ones word to run through).
                mw = np.where(hit[:, :, None], table[j], np.uint64(0))  # (width, k, words)
                v2 = np.full((k, words), np.uint64(0xFFFFFFFFFFFFFFFF))
                for s in range(width):
                    ms = mw[s]
                    total = v2 + (v2 & ms)
                    carry = total < v2
                    while carry[:, :-1].any():
                        bumped = total.copy()
                        bumped[:, 1:] += carry[:, :-1]
                        carry = bumped < total
                        total = bumped
                    v2 = total | (v2 & ~ms)
                zeros = 64 * words - _bitcount(v2).sum(axis=1)
            out[rows] = zeros
        return out


def _bitcount(v: np.ndarray) -> np.ndarray:
    if _popcount is not None:
        return _popcount(v).astype(np.int64)
    bits = np.unpackbits(np.ascontiguousarray(v).view(np.uint8).reshape(*v.shape, 8), axis=-1)
    return bits.sum(axis=-1).astype(np.int64)


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class RougeFilter(GlobalFilter):
    """Drop rows whose `column` has ROUGE-L F1 above `threshold` with a text already in the pool (Self-Instruct).

    The pool starts with `reference` (a list of texts, or a path to a data file any thresher reader takes, whose
    `column` values are used) and every kept row joins it at once, in row order: of two near-copies, the first is
    kept and the second rejected, wherever the batch boundaries fall. Scores are rouge_score's (see the module
    docstring; `tokenizer="cjk"` for Chinese, Japanese and Korean text). Every row, kept or rejected, gets
    `rouge_l_max` (its max F1 against the pool when it was decided) and `rouge_l_nearest` (the first pool text
    reaching it; null when no pool text shares a token, so every score is 0). A null or empty text has no tokens:
    it scores 0, as in rouge_score, and is kept (drop empty rows first with LengthFilter).

    Why a global filter: a row's fate depends on every kept row before it, so the filter's state is its own kept
    output. A row step's batches are meant to be independent (the engine may run several at once, a Ray runner
    would spread them over workers, and a resumed run starts after the last committed batch without handing the
    step the rows it kept before); a global filter sees the whole table, in order, in one process. What that costs
    is a re-run of the whole step after a crash, which is seconds to minutes of local computation and no model calls.
    """

    inputs = ("instruction",)
    outputs = ("rouge_l_max", "rouge_l_nearest")
    VERSION = "1"

    def __init__(
        self,
        *,
        threshold: float = 0.7,
        column: str = "instruction",
        reference: Sequence[str] | str | os.PathLike[str] | None = None,
        tokenizer: str = "rouge_score",
    ) -> None:
        self.threshold = threshold
        self.column = column
        self.reference = reference
        self.tokenizer = tokenizer

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def _reference_path(self) -> Path | None:
        return Path(self.reference) if isinstance(self.reference, (str, os.PathLike)) else None

    def check(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"RougeFilter: threshold must be a number in [0, 1] (ROUGE-L F1), got {t!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"RougeFilter: unknown tokenizer {self.tokenizer!r}; valid choices: {', '.join(TOKENIZERS)}")
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"RougeFilter: column must be a column name, got {self.column!r}")
        path = self._reference_path()
        if path is not None:
            if not path.exists():
                raise ConfigError(f"RougeFilter: reference file {os.fspath(path)!r} does not exist")
        elif self.reference is not None:
            ref = self.reference
            if not isinstance(ref, (list, tuple)) or not all(x is None or isinstance(x, str) for x in ref):
                raise ConfigError(
                    "RougeFilter: reference must be None, a list of texts or the path of a data file; "
                    f"got {type(ref).__name__}"
                )

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        if self._reference_path() is not None:
            # the file counts by its content (fingerprint_extra), not by where it lies
            params["reference"] = "<file>"
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        path = self._reference_path()
        if path is None:
            return {}
        if not path.exists():
            raise ConfigError(f"RougeFilter: reference file {os.fspath(path)!r} does not exist")
        return {"reference_file": file_digest(path)}

    def load(self) -> None:
        path = self._reference_path()
        if path is None:
            texts: Sequence[str | None] = self.reference or []  # type: ignore[assignment]  # a list: check() said so
            self.reference_texts_: list[str] = [t or "" for t in texts]
            return
        from thresher.data.readers import read_records

        table = read_records(path)
        if self.column not in table.column_names:
            raise ConfigError(
                f"RougeFilter: reference file {os.fspath(path)!r} has no column {self.column!r}; "
                f"it has: {', '.join(table.column_names)}"
            )
        self.reference_texts_ = ["" if v is None else str(v) for v in table.column(self.column).to_pylist()]

    def begin(self) -> None:
        self.stats_: dict[str, int] = {}

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        col = table.column(self.column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            raise StepError(f"RougeFilter: column {self.column!r} must hold text, found {col.type}")
        if not hasattr(self, "reference_texts_"):
            self.load()
        pool = RougePool(self.tokenizer)
        refs = self.reference_texts_
        pool.extend(refs)
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        row_of_pool: list[int] = []  # pool index - len(refs) -> table row
        threshold = float(self.threshold)
        mask: list[bool] = []
        scores: list[float] = []
        nearest: list[str | None] = []
        reasons: list[str | None] = []
        for row, text in enumerate(col.to_pylist()):
            tokens = pool.tokens(text)
            score, idx = pool._search(tokens, None)
            ok = score <= threshold
            mask.append(ok)
            scores.append(score)
            near = pool.texts[idx] if idx >= 0 and score > 0 else None
            nearest.append(near)
            if ok:
                pool._add(text or "", tokens)
                row_of_pool.append(row)
                reasons.append(None)
                continue
            if idx < len(refs):
                where = f"reference text {idx}"
            else:
                r = row_of_pool[idx - len(refs)]
                where = f"row {ids[r]!r}" if ids is not None else f"row {r}"
            reasons.append(f"ROUGE-L F1 {score:.4f} > {self.threshold} with {where}: {_clip(near or '')!r}")
        self.stats_ = {"reference_texts": len(refs), "pool_size": len(pool), **pool.stats}
        columns = {"rouge_l_max": pa.array(scores, pa.float64()), "rouge_l_nearest": pa.array(nearest, pa.string())}
        return pa.array(mask, pa.bool_()), reasons, columns

    def metrics(self) -> dict[str, Any]:
        return dict(getattr(self, "stats_", {}))
