"""`EmbeddingRetriever`: semantic search over a user corpus: passages embedded once (bundled all-MiniLM-L6-v2 by
default, the multilingual USE encoder for `language="zh"`, or any thresher embedder), kept in an exact FAISS
inner-product index on disk; a query's passages are its nearest by cosine similarity."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from thresher.errors import ConfigError
from thresher.rewriters.retrieval.base import Passage
from thresher.rewriters.retrieval.corpus import DEFAULT_FIELDS, check_cutting, corpus_key, load_passages
from thresher.rewriters.retrieval.index_cache import cached_index, index_root, read_passages, write_passages

VERSION = "1"  # bump when the index layout changes: cached indexes are keyed by it
LANGUAGES = ("en", "zh")


class EmbeddingRetriever:
    """Nearest passages by embedding cosine (see the module docstring).

    corpus, fields, passage_words: as for `BM25Retriever`. embedder: a spec dict or an embedder object (None: the
    bundled MiniLM, or for language="zh" the bundled multilingual encoder, extra `zh`). index_dir: where built
    indexes are kept. min_score: passages under this cosine are not returned.
    """

    kind = "embedding"

    def __init__(
        self,
        *,
        corpus: Any,
        fields: Sequence[str] = DEFAULT_FIELDS,
        passage_words: int = 100,
        embedder: Mapping[str, Any] | Any | None = None,
        language: str = "en",
        min_score: float = 0.0,
        index_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.corpus = corpus
        self.fields = fields
        self.passage_words = passage_words
        self.embedder = embedder
        self.language = language
        self.min_score = min_score
        self.index_dir = index_dir
        self.index_: Any = None
        self.embedder_: Any = None
        self.passages_: list[tuple[str, str]] | None = None

    def __repr__(self) -> str:
        return f"EmbeddingRetriever(corpus={self.corpus if isinstance(self.corpus, (str, list)) else type(self.corpus).__name__!r})"

    def _spec(self) -> Any:
        if self.embedder is None and self.language == "zh":
            return {"kind": "use_multilingual"}
        return self.embedder

    def _check(self) -> None:
        if self.language not in LANGUAGES:
            raise ConfigError(f"EmbeddingRetriever: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        check_cutting("EmbeddingRetriever", self.fields, self.passage_words)

    def key(self) -> str:
        self._check()
        from thresher.llms.config import spec_identity
        from thresher.pipelines.fingerprint import stable_hash

        return stable_hash({"version": VERSION, "corpus": corpus_key(self.corpus, self.fields, self.passage_words),
                            "embedder": spec_identity(self._spec(), embedder=True)}, "EmbeddingRetriever")  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """What decides the results: corpus content, passage cutting, the embedder, the score floor."""
        return {"kind": self.kind, "key": self.key(), "min_score": self.min_score}

    def __thresher_fingerprint__(self) -> dict[str, Any]:
        return self.identity()

    def load(self) -> EmbeddingRetriever:
        """Open the cached index, embedding the corpus first if it is not there."""
        if self.index_ is not None:
            return self
        from thresher.filters.embedding import faiss_module, normalise_rows
        from thresher.llms.config import make_embedder

        faiss = faiss_module()
        embedder = make_embedder(self._spec())
        load = getattr(embedder, "load", None)
        if callable(load):
            load()

        def build(folder: Any) -> None:
            passages = load_passages(self.corpus, self.fields, self.passage_words)
            if not passages:
                raise ConfigError(f"EmbeddingRetriever: the corpus {self!r} has no text to index")
            vecs = normalise_rows(embedder.embed([t for t, _ in passages]), where="EmbeddingRetriever")
            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(vecs)
            faiss.write_index(index, str(folder / "index.faiss"))
            write_passages(folder, passages)

        folder, _ = cached_index(index_root(self.index_dir), f"embedding-{self.key()}", build)
        self.passages_ = read_passages(folder)
        self.index_ = faiss.read_index(str(folder / "index.faiss"))
        self.embedder_ = embedder
        return self

    def close(self) -> None:
        close = getattr(self.embedder_, "close", None)
        if callable(close):
            close()
        self.index_, self.embedder_, self.passages_ = None, None, None

    def retrieve(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` passages nearest to `query` (cosine >= min_score), best first."""
        return self.retrieve_many([query], k)[0]

    def retrieve_many(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        """`retrieve` for many queries, embedded and searched in one batch."""
        from thresher.filters.embedding import normalise_rows

        self.load()
        assert self.passages_ is not None
        if not queries or k < 1:
            return [[] for _ in queries]
        texts = [q if q.strip() else " " for q in queries]
        vecs = normalise_rows(self.embedder_.embed(texts), where="EmbeddingRetriever (queries)")
        scores, ids = self.index_.search(vecs, min(k, len(self.passages_)))
        out = []
        for q, row_s, row_i in zip(queries, scores, ids, strict=True):
            found = []
            if q.strip():
                for s, i in zip(row_s, row_i, strict=True):
                    if i >= 0 and s >= self.min_score:
                        found.append(Passage(self.passages_[i][0], self.passages_[i][1], float(s)))
            out.append(found)
        return out
