"""`BM25Retriever`: lexical search over a user corpus with BM25 (the `bm25s` library), English and Chinese.

Tokens: text is case-folded; runs of letters and digits are words (English stop words and possessive 's
dropped); a run of CJK
characters gives each character and each pair of neighbouring characters (the bigram scheme of Lucene's CJK
analyzer), so Chinese needs no word segmenter or dictionary and mixed text works as is. No stemming.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from thresher.errors import ConfigError
from thresher.rewriters.retrieval.base import Passage
from thresher.rewriters.retrieval.corpus import DEFAULT_FIELDS, check_cutting, corpus_key, load_passages
from thresher.rewriters.retrieval.index_cache import cached_index, index_root, read_passages, write_passages
from thresher.rewriters.text import CJK

_RUN = re.compile(r"[^\W_]+")
_POSSESSIVE = re.compile(r"['’]s\b")
VERSION = "1"  # bump when tokens or scoring change: cached indexes are keyed by it


def bm25_tokens(text: str) -> list[str]:
    """BM25 tokens of `text` (see the module docstring)."""
    from thresher.generators.evol_instruct import EN_STOP_WORDS

    out: list[str] = []
    for run in _RUN.findall(_POSSESSIVE.sub("", text.casefold())):
        pos = 0
        for m in CJK.finditer(run):
            if m.start() > pos:
                word = run[pos : m.start()]
                if word not in EN_STOP_WORDS:
                    out.append(word)
            pos = m.end()
        if pos < len(run) and run[pos:] not in EN_STOP_WORDS:
            out.append(run[pos:])
        chars = CJK.findall(run)
        if chars:  # each CJK character, and each pair within a run of them
            out.extend(chars)
            out.extend(m.group(1) + m.group(2) for m in re.finditer(f"(?=({CJK.pattern})({CJK.pattern}))", run))
    return out


class BM25Retriever:
    """BM25 over a corpus of files or rows (see `thresher.rewriters.retrieval.corpus` for what a corpus may be).

    corpus: paths (files or folders), texts, or rows with `fields` (joined). passage_words: the most tokens a
    passage holds. k1, b: BM25's parameters (Lucene's scoring, bm25s's default method). index_dir: where built
    indexes are kept (default: ~/.cache/thresher/retrieval); the index is built on first use and found again by
    the corpus's content.
    """

    kind = "bm25"

    def __init__(
        self,
        *,
        corpus: Any,
        fields: Sequence[str] = DEFAULT_FIELDS,
        passage_words: int = 100,
        k1: float = 1.5,
        b: float = 0.75,
        index_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.corpus = corpus
        self.fields = fields
        self.passage_words = passage_words
        self.k1 = k1
        self.b = b
        self.index_dir = index_dir
        self.index_: Any = None
        self.passages_: list[tuple[str, str]] | None = None

    def __repr__(self) -> str:
        return f"BM25Retriever(corpus={self.corpus if isinstance(self.corpus, (str, list)) else type(self.corpus).__name__!r})"

    def _check(self) -> None:
        check_cutting("BM25Retriever", self.fields, self.passage_words)
        if not (self.k1 >= 0 and 0 <= self.b <= 1):
            raise ConfigError(f"BM25Retriever: k1 must be >= 0 and b in [0, 1], got k1={self.k1!r}, b={self.b!r}")

    def key(self) -> str:
        self._check()
        from thresher.pipelines.fingerprint import stable_hash

        return stable_hash({"version": VERSION, "corpus": corpus_key(self.corpus, self.fields, self.passage_words),
                            "k1": self.k1, "b": self.b}, "BM25Retriever")  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """What decides the results: the corpus content and the parameters (not where the index is kept)."""
        return {"kind": self.kind, "key": self.key()}

    def __thresher_fingerprint__(self) -> dict[str, Any]:
        return self.identity()

    def load(self) -> BM25Retriever:
        """Open the cached index, building it first if it is not there."""
        if self.index_ is not None:
            return self
        try:
            import bm25s
        except ImportError as e:  # pragma: no cover - bm25s is in the retrieval extra
            raise ConfigError("BM25Retriever needs bm25s: pip install 'thresher[retrieval]'") from e

        def build(folder: Any) -> None:
            passages = load_passages(self.corpus, self.fields, self.passage_words)
            if not passages:
                raise ConfigError(f"BM25Retriever: the corpus {self!r} has no text to index")
            model = bm25s.BM25(k1=self.k1, b=self.b)
            model.index([bm25_tokens(t) for t, _ in passages], show_progress=False)
            model.save(str(folder / "bm25"), show_progress=False)
            write_passages(folder, passages)

        folder, _ = cached_index(index_root(self.index_dir), f"bm25-{self.key()}", build)
        self.passages_ = read_passages(folder)
        self.index_ = bm25s.BM25.load(str(folder / "bm25"), show_progress=False, verbosity=0)
        return self

    def close(self) -> None:
        self.index_, self.passages_ = None, None

    def retrieve(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` best passages for `query` with a positive BM25 score, best first (ties: corpus order)."""
        import numpy as np

        self.load()
        assert self.passages_ is not None
        toks = bm25_tokens(query)
        if not toks or k < 1:
            return []
        scores = np.asarray(self.index_.get_scores(toks), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Passage(self.passages_[i][0], self.passages_[i][1], float(scores[i])) for i in order if scores[i] > 0]
