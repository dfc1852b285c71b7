"""Embeddings: bundled all-MiniLM-L6-v2 through sentence-transformers, and an OpenAI-compatible /embeddings
endpoint (the fault server); both normalised float32 and cached."""

from __future__ import annotations

import numpy as np
import pytest

from thresher.llms import OpenAIEmbeddings, SentenceTransformerEmbeddings, make_embedder, minilm_dir
from thresher.llms.testing import FaultServer

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.slow
def test_sentence_transformers_default_normalised_and_cached() -> None:
    pytest.importorskip("sentence_transformers")
    assert (minilm_dir() / "model.safetensors").is_file()
    emb = make_embedder(None)
    assert isinstance(emb, SentenceTransformerEmbeddings)
    texts = [
        "A cat sits on the mat.",
        "The cat is sitting on a mat.",
        "Stock markets fell sharply today.",
        "A cat sits on the mat.",
    ]
    v = emb.embed(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert np.array_equal(v[0], v[3]) and emb.usage.cache_misses == 3  # duplicates are embedded once
    again = SentenceTransformerEmbeddings()
    w = again.embed(texts)
    assert again.usage.cache_hits == 4 and again.usage.requests == 0 and again.model_ is not None
    assert np.array_equal(v, w)


def test_openai_embeddings_batches_retries_and_cache(fault: FaultServer) -> None:
    emb = OpenAIEmbeddings(model="fake-embed", base_url=fault.base_url, batch_size=4, retry_base_delay=0.01)
    texts = [f"text {i}" for i in range(10)] + ["text 3"]
    v = emb.embed(texts)
    assert v.shape == (11, 16) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v[3], v[10]) and not np.allclose(v[0], v[1])
    assert fault.stats()["total"] == 3  # 10 distinct texts, 4 per request
    again = OpenAIEmbeddings(model="fake-embed", base_url=fault.base_url).embed(texts)
    assert np.array_equal(again, v) and fault.stats()["total"] == 3
    flaky = OpenAIEmbeddings(model="fake-embed", base_url=fault.base_url, retry_base_delay=0.01, cache=False)
    out = flaky.embed(["[[500x2]] retried"])
    assert out.shape == (1, 16) and flaky.usage.retries == 2
