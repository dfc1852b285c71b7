"""Rewriters: steps that polish kept responses (ReAlign-style format rewriting)."""

from thresher.rewriters.classifier import TaskClassifier
from thresher.rewriters.taxonomy import TaskKind, Taxonomy, load_taxonomy

__all__ = ["TaskClassifier", "TaskKind", "Taxonomy", "load_taxonomy"]
