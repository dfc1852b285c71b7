"""Model backends: chat/completion clients, embeddings, log-probabilities, the request cache.

Steps depend on the protocols (`ChatBackend`, `EmbeddingBackend`, `LogprobBackend`), never on a class:

    OpenAICompatible            any OpenAI-compatible server (OpenAI, vLLM, SGLang, llama.cpp server, Ollama)
    LlamaCpp                    in-process llama.cpp, bundled SmolLM2-135M-Instruct: the default chat backend
    Transformers                local HF model: generation, per-token log-probabilities, next-token scores
    SentenceTransformerEmbeddings  bundled all-MiniLM-L6-v2: the default embedder
    OpenAIEmbeddings            any OpenAI-compatible /embeddings endpoint
    MultilingualUSEEmbeddings   bundled multilingual USE v3 (Chinese and 15 more languages; extra `zh`)

`make_backend(spec)` / `make_embedder(spec)` build one from a YAML-friendly dict. Every request goes through the
SQLite `RequestCache`. Importing this package loads no model library: torch, transformers, llama_cpp,
sentence_transformers and openai are imported when a backend loads.
"""

from thresher.llms.base import (
    ChatBackend,
    Completion,
    Conversation,
    EmbeddingBackend,
    LogprobBackend,
    Message,
    TokenLogprobs,
    Usage,
)
from thresher.llms.bundled import minilm_dir, smollm2_gguf
from thresher.llms.cache import CacheStats, RequestCache, default_cache_path, request_key
from thresher.llms.config import make_backend, make_embedder, spec_identity
from thresher.llms.embeddings import MultilingualUSEEmbeddings, OpenAIEmbeddings, SentenceTransformerEmbeddings
from thresher.llms.hf import Transformers, hf_dir_for_gguf
from thresher.llms.limits import RateLimiter, RetryPolicy
from thresher.llms.llamacpp import LlamaCpp
from thresher.llms.openai_compat import OpenAICompatible
from thresher.llms.structured import Schema

__all__ = [
    "CacheStats",
    "ChatBackend",
    "Completion",
    "Conversation",
    "EmbeddingBackend",
    "LlamaCpp",
    "LogprobBackend",
    "Message",
    "MultilingualUSEEmbeddings",
    "OpenAICompatible",
    "OpenAIEmbeddings",
    "RateLimiter",
    "RequestCache",
    "RetryPolicy",
    "Schema",
    "SentenceTransformerEmbeddings",
    "TokenLogprobs",
    "Transformers",
    "Usage",
    "default_cache_path",
    "hf_dir_for_gguf",
    "make_backend",
    "make_embedder",
    "minilm_dir",
    "request_key",
    "smollm2_gguf",
    "spec_identity",
]
