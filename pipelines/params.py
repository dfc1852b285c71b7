"""Markers for step constructor parameters that are not part of a step's meaning.

`runtime(256)` marks an execution knob (batch size, concurrency, device): it changes how fast a step runs, never what
it produces, so it stays out of the fingerprint. `secret()` marks a credential: out of the fingerprint, out of
`repr`, manifests and YAML dumps. Both are used as constructor defaults; the Step base class unwraps them at
construction, so inside `__init__` the parameter holds the plain value.
"""

from __future__ import annotations

from typing import Any


class _Marked:
    """A constructor default that carries a role. Never seen by step code at run time."""

    __slots__ = ("role", "value")

    def __init__(self, role: str, value: Any) -> None:
        self.role, self.value = role, value

    def __repr__(self) -> str:
        return f"{self.role}({self.value!r})"


def runtime(default: Any = None) -> Any:
    """Mark a constructor parameter as a runtime knob (excluded from the fingerprint)."""
    return _Marked("runtime", default)


def secret(default: Any = None) -> Any:
    """Mark a constructor parameter as a secret (excluded from fingerprint, repr, manifest and YAML)."""
    return _Marked("secret", default)


REDACTED = "***"
