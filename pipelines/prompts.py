"""Prompt templates: text files shipped with the package, which a user can override one by one or replace.

Every method's prompts are ours, written as files under `<package>/prompts/<method>/<name>.<language>.txt`
(`generators/prompts/self_instruct/continue_list.en.txt`). A step that asks a model takes `prompts={name: path}`
and calls `load_prompt`; `prompts_digest` puts each template's content hash in the step's fingerprint, so an
edited prompt, shipped or the user's, re-runs the step. `load_prompt` reads the user's file when given and the
shipped one otherwise. Placeholders are `$name` / `${name}` (`string.Template`), so JSON and code in a
prompt need no escaping; a placeholder the step does not fill, or a value the template does not use, is an error
that names the file, never a prompt sent with a hole in it.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError
from thresher.pipelines.fingerprint import file_digest

LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Prompt:
    """One template, with where it came from (for errors and fingerprints)."""

    text: str
    path: Path

    @property
    def placeholders(self) -> set[str]:
        names = set()
        for match in string.Template.pattern.finditer(self.text):
            name = match.group("named") or match.group("braced")
            if name:
                names.add(name)
        return names

    def render(self, **values: Any) -> str:
        """The prompt with every placeholder filled; values for placeholders it lacks are an error too."""
        missing = self.placeholders - set(values)
        if missing:
            raise ConfigError(f"prompt {self.path}: no value for placeholder(s) {sorted(missing)}")
        unused = set(values) - self.placeholders
        if unused:
            raise ConfigError(
                f"prompt {self.path}: it has no placeholder for {sorted(unused)}; placeholders: {sorted(self.placeholders)}"
            )
        return string.Template(self.text).substitute({k: str(v) for k, v in values.items()})


def shipped_prompt_path(package: str, method: str, name: str, language: str) -> Path:
    """The file shipped for (method, name, language), e.g. ("generators", "self_instruct", "continue_list", "en")."""
    if language not in LANGUAGES:
        raise ConfigError(f"language {language!r} is not one of {list(LANGUAGES)}")
    import importlib

    root = Path(importlib.import_module(f"thresher.{package}").__file__ or "").parent
    return root / "prompts" / method / f"{name}.{language}.txt"


def load_prompt(
    package: str,
    method: str,
    name: str,
    language: str,
    overrides: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Prompt:
    """The template `name` of a method: the user's file from `overrides[name]`, else the shipped one."""
    if overrides and name in overrides:
        path = Path(overrides[name]).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts[{name!r}]: {path} is not a file")
    else:
        path = shipped_prompt_path(package, method, name, language)
        if not path.is_file():
            raise ConfigError(f"{method}: no shipped prompt {name!r} for language {language!r} (looked for {path})")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"prompt {path} is empty")
    return Prompt(text, path)


def check_overrides(method: str, overrides: Mapping[str, Any] | None, names: tuple[str, ...]) -> None:
    """ConfigError for an override of a prompt the method does not have, or a file that is not there."""
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"{method}: prompts has no template {key!r}; valid: {list(names)}")
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{method}: prompts[{key!r}] = {os.fspath(value)!r} is not a file")


def prompts_digest(
    package: str,
    method: str,
    names: tuple[str, ...],
    language: str,
    overrides: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, str]:
    """What a step's fingerprint holds of its prompts (put it in `fingerprint_extra`): the content hash of each
    template it will use, shipped or the user's, so an edited prompt re-runs the step and a moved file does not."""
    return {n: file_digest(load_prompt(package, method, n, language, overrides).path) for n in names}
