"""Rewriters: steps that polish kept responses (ReAlign-style format rewriting)."""

from thresher.rewriters.taxonomy import TaskKind, Taxonomy, load_taxonomy

__all__ = ["TaskKind", "Taxonomy", "load_taxonomy"]
