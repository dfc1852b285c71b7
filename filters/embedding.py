"""Row vectors for the embedding filters (NearDedup, DiversitySelect, KMeansSample, and any step that needs them).

How: a row's text is its `text` columns joined (instruction + input by default), embedded by an embedding backend
(`thresher.llms`: the bundled all-MiniLM-L6-v2 unless told otherwise) whose request cache keeps every vector, stored
chunk by chunk as it is computed, so a re-run or a crashed run re-embeds nothing it had. Or a row's vector is read
from a column that already holds one (`vectors="embedding"`), normalised here. Either way every vector is float32
and unit length, so an inner product is a cosine similarity.

Use `EmbeddingStep` before the step's kind (`class NearDedup(EmbeddingStep, GlobalFilter)`): it owns the embedder
parameter (a spec dict, a backend object, or None for the default, which is the bundled multilingual encoder when
`language="zh"`), its runtime knobs, the check of `text`/`vectors`, and `row_vectors(table)`. `embed_column` and
`column_vectors` are the same plumbing as functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import ConfigError, StepError
from thresher.pipelines.model_step import ModelStep

#: Columns embedded by default: what the model is asked (the answer is left out, as in ExactDedup).
DEFAULT_TEXT: tuple[str, ...] = ("instruction", "input")
#: languages with a default embedder: English (MiniLM) and Chinese (the multilingual USE encoder, extra `zh`)
LANGUAGES: tuple[str, ...] = ("en", "zh")
_ZH_EMBEDDER = {"kind": "use_multilingual"}


def row_names(table: pa.Table) -> list[str]:
    """How messages name each row: `id='...'` when the table has ids, else its row number."""
    if "id" in table.column_names:
        return [f"id={v!r}" for v in table.column("id").to_pylist()]
    return [f"row {i}" for i in range(table.num_rows)]


def row_ids(table: pa.Table) -> list[Any]:
    """Row ids as output columns name them (the row number when the table has no `id`)."""
    if "id" in table.column_names:
        return [None if v is None else str(v) for v in table.column("id").to_pylist()]
    return [str(i) for i in range(table.num_rows)]


def row_texts(table: pa.Table, columns: Sequence[str], where: str = "embedding") -> list[str]:
    """Each row's `columns` joined by a blank line (empty and null parts left out). A value that is not text, or a
    row whose parts are all empty, is an error naming the row and the columns."""
    parts: list[list[Any]] = []
    for c in columns:
        if c not in table.column_names:
            raise StepError(f"{where}: the data has no column {c!r}; it has: {', '.join(table.column_names)}")
        col = table.column(c)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            bad = pc.index(pc.is_valid(col), True).as_py()
            name = row_names(table)[bad] if bad is not None and bad >= 0 else "every row"
            raise StepError(f"{where}: {name}, field {c!r}: expected text, found {col.type}")
        parts.append(col.to_pylist())
    out: list[str] = []
    names: list[str] | None = None
    for i, values in enumerate(zip(*parts, strict=True)):
        text = "\n\n".join(v for v in values if v)
        if not text.strip():
            names = names or row_names(table)
            raise StepError(
                f"{where}: {names[i]}, field(s) {', '.join(map(repr, columns))}: nothing to embed (empty or null); "
                "drop empty rows first (LengthFilter) or choose other `text` columns"
            )
        out.append(text)
    return out


def column_vectors(table: pa.Table, column: str, where: str = "embedding") -> np.ndarray:
    """The vectors a list column holds, as unit-length float32 rows. Nulls, ragged lengths, non-finite values and
    zero vectors are errors naming the row."""
    if column not in table.column_names:
        raise StepError(f"{where}: the data has no vector column {column!r}; it has: {', '.join(table.column_names)}")
    col = table.column(column)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise StepError(f"{where}: column {column!r} must hold vectors (lists of numbers), found {t}")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise StepError(f"{where}: column {column!r} must hold lists of numbers, found {t}")
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if col.null_count:
        i = pc.index(pc.is_null(col), True).as_py()
        raise StepError(f"{where}: {row_names(table)[i]}, field {column!r}: no vector (null)")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any() or lengths[0] == 0:
        i = int(np.flatnonzero(lengths != lengths[0])[0]) if (lengths != lengths[0]).any() else 0
        raise StepError(
            f"{where}: {row_names(table)[i]}, field {column!r}: a vector of {int(lengths[i])} numbers, "
            f"where the first row has {int(lengths[0])}"
        )
    flat = pc.list_flatten(col)
    if flat.null_count:
        i = int(np.flatnonzero(pc.is_null(flat).to_numpy(zero_copy_only=False))[0] // lengths[0])
        raise StepError(f"{where}: {row_names(table)[i]}, field {column!r}: the vector holds a null")
    mat = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, int(lengths[0]))
    return normalise_rows(mat, table, column, where)


def normalise_rows(mat: np.ndarray, table: pa.Table | None = None, column: str = "", where: str = "embedding") -> np.ndarray:
    """Rows scaled to unit length (float32, C order); a non-finite or zero row is an error naming the row."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    finite = np.isfinite(mat).all(axis=1)
    norms = np.linalg.norm(mat, axis=1)
    bad = np.flatnonzero(~finite | (norms == 0))
    if len(bad):
        i = int(bad[0])
        name = row_names(table)[i] if table is not None else f"row {i}"
        what = "a non-finite value" if not finite[i] else "a zero vector (no direction, so no cosine)"
        raise StepError(f"{where}: {name}, field {column!r}: {what}")
    return np.ascontiguousarray(mat / norms[:, None], dtype=np.float32)


def embed_column(embedder: Any, table: pa.Table, columns: Sequence[str] = DEFAULT_TEXT, where: str = "embedding") -> np.ndarray:
    """Unit-length float32 vectors of each row's `columns` (joined, see `row_texts`) from an embedding backend
    (anything with `embed(texts) -> array`); the backend's request cache keeps them, so asking again is free."""
    texts = row_texts(table, columns, where)
    if not texts:
        return np.zeros((0, int(getattr(embedder, "dim", 0) or 0)), dtype=np.float32)
    vecs = np.asarray(embedder.embed(texts), dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] != len(texts):
        raise StepError(f"{where}: the embedder returned an array of shape {vecs.shape} for {len(texts)} texts")
    return normalise_rows(vecs, table, "+".join(columns), where)


def faiss_module(threads: int | None = None) -> Any:
    """faiss, imported where it is used (with a clear message when missing); `threads` sets its OpenMP threads."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in the hf extra
        raise ConfigError("this step needs FAISS: pip install 'thresher[hf]' (faiss-cpu)") from e
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return faiss


def score_values(table: pa.Table, column: str, where: str) -> np.ndarray:
    """A numeric score column as float64; nulls and NaN are errors naming the row (a ranking needs every score)."""
    if column not in table.column_names:
        raise StepError(f"{where}: the data has no score column {column!r}; it has: {', '.join(table.column_names)}")
    col = table.column(column)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise StepError(f"{where}: score column {column!r} must hold numbers, found {col.type}")
    values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64) if len(col) else np.zeros(0)
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        raise StepError(
            f"{where}: {row_names(table)[int(bad[0])]}, field {column!r}: no score (null or NaN); "
            f"{len(bad)} row(s) lack one: score them or drop them first"
        )
    return values


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """Row positions by score, highest first; equal scores keep row order."""
    return np.argsort(-scores, kind="stable")


class EmbeddingStep(ModelStep):
    """Mixin for steps that work on one vector per row (see the module docstring).

    The step stores `embedder`, `text`, `vectors`, `language` and the runtime knobs `api_key` (secret),
    `max_concurrency`, `cache` and `progress` under those names."""

    model_params: ClassVar[dict[str, str]] = {"embedder": "embed"}  # type: ignore[misc]

    embedder: Any
    text: Sequence[str]
    vectors: str | None
    language: str

    def _spec(self, param: str) -> Any:
        spec = getattr(self, param)
        if param == "embedder" and spec is None and getattr(self, "language", "en") == "zh":
            return dict(_ZH_EMBEDDER)
        return super()._spec(param)

    def vector_reads(self) -> tuple[str, ...]:
        """The columns the vectors come from."""
        return (self.vectors,) if self.vectors is not None else tuple(self.text)

    def check_vectors(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        if self.vectors is not None:
            if not isinstance(self.vectors, str) or not self.vectors:
                raise ConfigError(f"{name}: vectors must be the name of a column holding vectors, got {self.vectors!r}")
            return
        text = self.text
        if isinstance(text, str) or not isinstance(text, (list, tuple)) or not text or not all(
            isinstance(c, str) and c for c in text
        ):
            raise ConfigError(f"{name}: text must be a list of column names to embed (joined), got {text!r}")

    def semantic_params(self) -> dict[str, Any]:
        if getattr(self, "vectors", None) is not None:
            # vectors given: no embedder is used, so none counts (nor is one built to check)
            from thresher.pipelines.step import Step

            params = Step.semantic_params(self)  # type: ignore[arg-type]
            params["embedder"] = None
            return params
        return super().semantic_params()

    def check(self) -> None:
        self.check_vectors()
        if self.vectors is not None:
            super(ModelStep, self).check()  # type: ignore[misc]  # the step's kind's checks; no embedder needed
            return
        super().check()

    def begin(self) -> None:
        super().begin()
        self.stats_: dict[str, Any] = {}  # what this run decided, reported by metrics()

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **getattr(self, "stats_", {})}

    def check_cosine(self, key: str) -> None:
        """The parameter `key` must be a cosine similarity in [-1, 1]."""
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
            raise ConfigError(f"{type(self).__name__}: {key} must be a cosine similarity in [-1, 1], got {v!r}")

    def check_positive(self, *keys: str) -> None:
        """Each parameter in `keys` must be a positive integer."""
        for key in keys:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{type(self).__name__}: {key} must be a positive integer, got {v!r}")

    def _uses_embedder(self) -> bool:
        """Whether vectors come from the embedder (not from a column or elsewhere): only then is it loaded."""
        return self.vectors is None

    def load(self) -> None:
        if not self._uses_embedder():
            super(ModelStep, self).load()  # type: ignore[misc]
            return
        super().load()

    def row_vectors(self, table: pa.Table) -> np.ndarray:
        """One unit-length float32 vector per row: read from `vectors`, or `text` embedded (cached)."""
        where = type(self).__name__
        if self.vectors is not None:
            return column_vectors(table, self.vectors, where)
        return embed_column(self.model("embedder"), table, self.text, where)
