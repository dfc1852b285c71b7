"""Generators: steps that make instruction rows (Self-Instruct, Evol-Instruct, Responder)."""

from thresher.generators.responder import Respond, row_messages

__all__ = ["Respond", "row_messages"]
