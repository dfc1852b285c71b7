"""Generators: steps that make instruction rows (Self-Instruct, Evol-Instruct, Responder)."""
