"""The retriever contract: a query in, passages out, ranked best first, each with its text, source and score.

Any object with `retrieve(query, k) -> list[Passage]` and `identity() -> dict` is a retriever: the local ones here
(`BM25Retriever`, `EmbeddingRetriever`) or one you write, e.g. a web search behind your own API client:

    class WebSearch:                                   # no base class needed
        def __init__(self, *, engine: str = "my-search", api_key_env: str = "SEARCH_API_KEY"):
            self.engine, self.api_key_env = engine, api_key_env

        def identity(self) -> dict:                    # what changes the results (never the key): fingerprints
            return {"kind": "web", "engine": self.engine}

        def retrieve(self, query: str, k: int = 3) -> list[Passage]:
            hits = my_client(os.environ[self.api_key_env]).search(query, n=k)
            return [Passage(text=h.snippet, source=h.url, score=h.rank_score) for h in hits]

Pass the object (`ReAlign(retriever=WebSearch())`), or in YAML a spec naming its class
(`retriever: {kind: "mypackage.search:WebSearch", engine: my-search}`). Optional methods: `load()` (build or open
an index; called once before the first query), `close()`, and `retrieve_many(queries, k)` for batched search. A web
search answers differently over time: the step cache keeps what it answered on the first run, so clear the step's
output (or change a parameter) to search again.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from thresher.errors import ConfigError, StepError


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: its text, where it came from (a file and line, a row, a URL) and its score."""

    text: str
    source: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    """query -> passages, best first (see the module docstring)."""

    def retrieve(self, query: str, k: int = 3) -> list[Passage]: ...

    def identity(self) -> dict[str, Any]: ...


#: spec kinds of the shipped retrievers
_KINDS = {
    "bm25": ("thresher.rewriters.retrieval.bm25", "BM25Retriever"),
    "embedding": ("thresher.rewriters.retrieval.dense", "EmbeddingRetriever"),
}


def make_retriever(spec: Mapping[str, Any] | Any) -> Any:
    """A retriever from a spec dict (`{kind: bm25 | embedding | "module:Class", ...parameters}`) or an object with
    `retrieve` and `identity` (returned as is)."""
    if not isinstance(spec, Mapping):
        for method in ("retrieve", "identity"):
            if not callable(getattr(spec, method, None)):
                raise ConfigError(
                    f"retriever {spec!r} has no {method}() method; a retriever needs retrieve(query, k) and identity()"
                )
        return spec
    kind = str(spec.get("kind", ""))
    params = {k: v for k, v in spec.items() if k != "kind"}
    if kind in _KINDS:
        mod, name = _KINDS[kind]
    elif ":" in kind:
        mod, name = kind.split(":", 1)
    else:
        raise ConfigError(f"retriever: unknown kind {kind!r}; valid: {sorted(_KINDS)} or 'module.path:ClassName'")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"retriever: cannot import {name!r} from {mod!r} (kind {kind!r}): {e}") from e
    try:
        return make_retriever(cls(**params))
    except TypeError as e:
        raise ConfigError(f"retriever {kind!r}: {e}") from e


def as_passages(found: Any, where: str) -> list[Passage]:
    """A retriever's answer as Passages; dicts with text/source/score are taken too. Anything else is an error naming
    the retriever and the query (a user-written retriever's mistake surfaces here, not in a prompt)."""
    if not isinstance(found, Sequence) or isinstance(found, (str, bytes)):
        raise StepError(f"{where}: expected a list of passages, got {type(found).__name__}")
    out: list[Passage] = []
    for i, p in enumerate(found):
        if isinstance(p, Passage):
            out.append(p)
            continue
        if isinstance(p, Mapping) and isinstance(p.get("text"), str):
            try:
                out.append(Passage(p["text"], str(p.get("source", "")), float(p.get("score", 0.0))))
                continue
            except (TypeError, ValueError):
                pass
        raise StepError(f"{where}: passage {i} is {p!r}; expected a Passage or a dict with text, source and score")
    return out


def retrieve_many(retriever: Any, queries: Sequence[str], k: int) -> list[list[Passage]]:
    """Passages for each query: the retriever's own `retrieve_many` when it has one, else one query at a time."""
    name = type(retriever).__name__
    many = getattr(retriever, "retrieve_many", None)
    if callable(many):
        found = list(many(list(queries), k))
        if len(found) != len(queries):
            raise StepError(f"{name}.retrieve_many: {len(found)} answers for {len(queries)} queries")
        return [as_passages(f, f"{name}.retrieve_many, query {q[:60]!r}") for f, q in zip(found, queries, strict=True)]
    return [as_passages(retriever.retrieve(q, k), f"{name}.retrieve, query {q[:60]!r}") for q in queries]
