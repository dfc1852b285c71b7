"""Retrieval for the rewriters: the `Retriever` contract, BM25 and embedding retrievers over a user corpus, cached
on disk by content. A web search is a class you write behind the same contract (see `base`)."""

from thresher.rewriters.retrieval.base import Passage, Retriever, make_retriever, retrieve_many
from thresher.rewriters.retrieval.bm25 import BM25Retriever, bm25_tokens
from thresher.rewriters.retrieval.corpus import load_passages, split_passages
from thresher.rewriters.retrieval.dense import EmbeddingRetriever

__all__ = [
    "BM25Retriever",
    "EmbeddingRetriever",
    "Passage",
    "Retriever",
    "bm25_tokens",
    "load_passages",
    "make_retriever",
    "retrieve_many",
    "split_passages",
]
