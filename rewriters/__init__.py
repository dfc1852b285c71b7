"""Rewriters: steps that polish kept responses (ReAlign-style format rewriting)."""

from thresher.rewriters.classifier import TaskClassifier
from thresher.rewriters.polish import Polish
from thresher.rewriters.realign import ReAlign
from thresher.rewriters.retrieval import BM25Retriever, EmbeddingRetriever, Passage, Retriever
from thresher.rewriters.taxonomy import TaskKind, Taxonomy, load_taxonomy

__all__ = [
    "BM25Retriever",
    "EmbeddingRetriever",
    "Passage",
    "Polish",
    "ReAlign",
    "Retriever",
    "TaskClassifier",
    "TaskKind",
    "Taxonomy",
    "load_taxonomy",
]
