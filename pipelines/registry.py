"""Step names for YAML recipes: every concrete Step subclass registers under its class name.

Built-in steps live in thresher's concept folders; `resolve` imports those folders on first use (they import no
heavy library at module level, so this stays cheap). User steps register when their module is imported, or can be
named in YAML by dotted path: `mypkg.steps:MyStep`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from thresher.errors import ConfigError

if TYPE_CHECKING:
    from thresher.pipelines.step import Step

_REGISTRY: dict[str, type[Step]] = {}

_BUILTIN_MODULES = (
    "thresher.data.steps",
    "thresher.filters",
    "thresher.scorers",
    "thresher.generators",
    "thresher.rewriters",
)
_loaded_builtins = False


def register(cls: type[Step]) -> None:
    # The first registration of a name wins only if it is the same class object re-imported; a user class with
    # the same name as a built-in one is reachable by dotted path.
    _REGISTRY.setdefault(cls.__name__, cls)


def _load_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def available_steps() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def resolve(name: str) -> type[Step]:
    """The Step class for a recipe's `step:` value (a registered name or `module:Class`)."""
    from thresher.pipelines.step import Step

    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot import step {name!r}: {e}") from e
        if not (isinstance(obj, type) and issubclass(obj, Step)):
            raise ConfigError(f"{name!r} is not a Step subclass")
        return obj
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown step {name!r}; known steps: {', '.join(available_steps())}")
    return _REGISTRY[name]
