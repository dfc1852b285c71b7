"""The task taxonomy: the kinds of instruction ReAlign tells apart, each with the format its responses should take.

A taxonomy is a JSON object shipped per language (`taxonomy/tasks.en.json`, `taxonomy/tasks.zh.json`, the same keys
in both), mapping a snake_case kind name to

    {"description": "one line: what requests of this kind ask for (the classifier reads it)",
     "format": "the structure of an ideal response" or null,
     "keep": false,            # true: leave responses of this kind as they are (stories, poems, roleplay, ...)
     "needs_evidence": false}  # true: attach retrieved evidence before rewriting (open QA, how-to, ...)

`description` is required; `keep` and `needs_evidence` default to false, `format` to null, which only a kept kind
may have. The kind `default` must exist: it is where an instruction that fits no kind goes. A user replaces the
shipped file with `path=` or adds and changes kinds with `extend=` (files or mappings, applied in order): an
extension's kind that already exists overrides only the fields it gives, so `{"open_qa": {"format": "..."}}` changes
one criterion; a new kind needs a description. Everything is checked on load, and an error names the file and kind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError
from thresher.pipelines.fingerprint import stable_hash
from thresher.pipelines.prompts import LANGUAGES

DEFAULT_KIND = "default"
FIELDS = ("description", "format", "keep", "needs_evidence")
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

Extension = str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class TaskKind:
    """One kind of task: its name, what it asks for, the format criterion of its responses (None: kept as is)."""

    name: str
    description: str
    format: str | None
    keep: bool
    needs_evidence: bool

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "format": self.format, "keep": self.keep,
                "needs_evidence": self.needs_evidence}  # fmt: skip


class Taxonomy:
    """An ordered, validated set of task kinds (build with `load_taxonomy`).

    `kinds` lists the names in file order; `taxonomy[name]` is a `TaskKind`; `name in taxonomy` tests membership;
    iterating gives the `TaskKind`s. `digest()` hashes the content (names, order, every field), never the path.
    """

    def __init__(self, kinds: Sequence[TaskKind], *, language: str = "en", sources: Sequence[str] = ()) -> None:
        self._kinds = {k.name: k for k in kinds}
        self.language = language
        self.sources = tuple(sources)
        where = ", ".join(self.sources) or "the task taxonomy"
        if len(self._kinds) != len(kinds):
            dup = sorted({k.name for k in kinds if sum(1 for o in kinds if o.name == k.name) > 1})
            raise ConfigError(f"{where}: kind(s) {dup} given more than once")
        if DEFAULT_KIND not in self._kinds:
            raise ConfigError(
                f"{where}: the kind {DEFAULT_KIND!r} is missing; every taxonomy needs it (where instructions that fit "
                f"no kind go)"
            )

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

    def __getitem__(self, name: str) -> TaskKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise KeyError(f"no task kind {name!r} in {', '.join(self.sources) or 'the taxonomy'}; "
                           f"valid: {self.kinds}") from None  # fmt: skip

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[TaskKind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return f"Taxonomy({len(self)} kinds, language={self.language!r}, sources={list(self.sources)})"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The taxonomy as its JSON file holds it (write it out to start a file of your own)."""
        return {k.name: k.to_dict() for k in self}

    def digest(self) -> str:
        """A hash of the content (for fingerprints): the same kinds in the same order give the same digest."""
        return stable_hash([[k.name, k.description, k.format, k.keep, k.needs_evidence] for k in self], "taxonomy")

    def extend(self, extension: Extension, *, source: str | None = None) -> Taxonomy:
        """A new taxonomy with `extension` (a JSON file or a mapping) applied: new kinds appended, existing kinds
        overridden field by field."""
        where, entries = _read(extension, source)
        merged = dict(self.to_dict())
        for name, entry in entries.items():
            _check_entry(where, name, entry, partial=name in merged)
            merged[name] = {**merged[name], **entry} if name in merged else dict(entry)
        return Taxonomy(_build(where, merged), language=self.language, sources=[*self.sources, where])


def shipped_path(language: str = "en") -> Path:
    """The taxonomy file shipped for `language`."""
    if language not in LANGUAGES:
        raise ConfigError(f"task taxonomy: unknown language {language!r}; valid: {list(LANGUAGES)}")
    return Path(__file__).resolve().parent / "taxonomy" / f"tasks.{language}.json"


def load_taxonomy(
    language: str = "en",
    path: str | os.PathLike[str] | None = None,
    *,
    extend: Extension | Sequence[Extension] | None = None,
) -> Taxonomy:
    """The task taxonomy for `language`: the shipped file, or the file at `path` instead; then each of `extend`
    (a JSON file or a mapping, or a list of them) applied in order (see the module docstring)."""
    file = shipped_path(language) if path is None else Path(path).expanduser()
    where, entries = _read(file, None)
    for name, entry in entries.items():
        _check_entry(where, name, entry, partial=False)
    taxonomy = Taxonomy(_build(where, entries), language=language, sources=[where])
    if extend is None:
        return taxonomy
    extensions = [extend] if isinstance(extend, (str, os.PathLike, Mapping)) else list(extend)
    for i, ext in enumerate(extensions):
        taxonomy = taxonomy.extend(ext, source=None if not isinstance(ext, Mapping) else f"extend[{i}]")
    return taxonomy


def _read(source: Extension, label: str | None) -> tuple[str, Mapping[str, Any]]:
    """(how errors name the source, its kinds) from a JSON file or a mapping."""
    if isinstance(source, Mapping):
        where = label or "the taxonomy extension"
        data: Any = source
    else:
        file = Path(source).expanduser()
        where = str(file)
        if not file.is_file():
            raise ConfigError(f"task taxonomy {where}: no such file")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"task taxonomy {where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"task taxonomy {where}: not UTF-8 text ({e})") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"task taxonomy {where}: expected a non-empty JSON object mapping kind names to "
            f"{{description, format, keep, needs_evidence}}, got {type(data).__name__ if data else 'nothing'}"
        )
    return where, data


def _check_entry(where: str, name: Any, entry: Any, *, partial: bool) -> None:
    """ConfigError naming the file and kind for anything wrong with one entry (`partial`: an override of a kind
    that exists, which may leave fields out)."""
    at = f"task taxonomy {where}, kind {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{at}: kind names are snake_case (lower-case letters, digits, '_'), starting with a letter")
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{at}: expected an object with {list(FIELDS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{at}: unknown key(s) {unknown}; valid: {list(FIELDS)}")
    if not partial and "description" not in entry:
        raise ConfigError(f"{at}: no 'description' (one line saying what requests of this kind ask for)")
    if "description" in entry:
        d = entry["description"]
        if not isinstance(d, str) or not d.strip():
            raise ConfigError(f"{at}: 'description' must be a non-empty string, got {d!r}")
        if "\n" in d.strip():
            raise ConfigError(f"{at}: 'description' must be one line (the classifier lists one kind per line)")
    if "format" in entry:
        f = entry["format"]
        if f is not None and (not isinstance(f, str) or not f.strip()):
            raise ConfigError(f"{at}: 'format' must be a non-empty string, or null for a kind kept as is; got {f!r}")
    for flag in ("keep", "needs_evidence"):
        if flag in entry and not isinstance(entry[flag], bool):
            raise ConfigError(f"{at}: {flag!r} must be true or false, got {entry[flag]!r}")


def _build(where: str, entries: Mapping[str, Mapping[str, Any]]) -> list[TaskKind]:
    kinds = []
    for name, e in entries.items():
        kind = TaskKind(
            name=name,
            description=str(e["description"]).strip(),
            format=None if e.get("format") is None else str(e["format"]).strip(),
            keep=bool(e.get("keep", False)),
            needs_evidence=bool(e.get("needs_evidence", False)),
        )
        if kind.format is None and not kind.keep:
            raise ConfigError(
                f"task taxonomy {where}, kind {name!r}: no 'format' criterion; give one, or set \"keep\": true to "
                "leave responses of this kind as they are"
            )
        kinds.append(kind)
    return kinds
