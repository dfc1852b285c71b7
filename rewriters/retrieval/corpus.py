"""A retrieval corpus: the user's texts cut into passages, each with its source, and a key for its content.

Sources: plain text files (`.txt`, `.md`, `.rst`, `.text`) cut into passages of at most `passage_words` tokens
(paragraphs joined while they fit, a longer paragraph cut at sentence ends; a CJK character counts one token), data
files any thresher reader takes (JSON, JSONL, Parquet, CSV, HF datasets on disk, in any layout) whose `fields` are
joined per row and cut the same way, folders of such files, or in-memory rows (a list of texts, a list of dicts, a
pyarrow Table, an HF Dataset or a DataFrame) with `fields`. A passage's source says where it came from:
`notes.txt:12` (its first line), `faq.jsonl row 3 (id='q3')`, `corpus row 7`.

`corpus_key` hashes the files' contents (never their times) or the rows' values with the cutting parameters, so an
index built from it can be cached on disk and found again by content alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError, RecordError
from thresher.pipelines.fingerprint import file_digest, stable_hash
from thresher.rewriters.text import TOKEN

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
#: fields joined per row of a data file by default: the question and its answer
DEFAULT_FIELDS = ("instruction", "input", "output")

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])[\"'”’)\]]*\s*")


def _data_suffixes() -> tuple[str, ...]:
    from thresher.data.sources import EXTENSIONS

    return tuple(EXTENSIONS)


def is_path_corpus(corpus: Any) -> bool:
    """True when `corpus` names files: a path, or a non-empty list of paths."""
    if isinstance(corpus, (str, os.PathLike)):
        return True
    return (
        isinstance(corpus, (list, tuple))
        and bool(corpus)
        and all(isinstance(c, (str, os.PathLike)) for c in corpus)
        and all(Path(c).suffix or Path(c).is_dir() for c in corpus)
    )


def corpus_files(corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every file of a path corpus, folders walked in sorted order; a missing path or a folder with no file thresher
    reads is an error naming it."""
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    files: list[Path] = []
    known = (*TEXT_SUFFIXES, *_data_suffixes())
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise ConfigError(f"retrieval corpus: {p} does not exist")
        if p.is_file():
            if p.suffix.lower() not in known:
                raise ConfigError(f"retrieval corpus: {p}: unknown file type {p.suffix!r}; valid: {sorted(known)}")
            files.append(p)
        elif (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            files.append(p)  # an HF dataset saved to disk
        else:
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in known)
            if not found:
                raise ConfigError(f"retrieval corpus: folder {p} holds no file of the kinds {sorted(known)}")
            files.extend(found)
    return files


def _rows(corpus: Any) -> list[Any]:
    """In-memory corpus rows as a list (texts or dicts)."""
    if hasattr(corpus, "to_pylist"):  # pyarrow Table
        rows: list[Any] = corpus.to_pylist()
        return rows
    if hasattr(corpus, "to_dict") and hasattr(corpus, "columns"):  # pandas
        return list(corpus.to_dict("records"))
    if hasattr(corpus, "column_names") and hasattr(corpus, "__getitem__"):  # HF Dataset
        return [corpus[i] for i in range(len(corpus))]
    if isinstance(corpus, (list, tuple)):
        return list(corpus)
    raise ConfigError(
        f"retrieval corpus: expected paths, texts, rows (dicts), a pyarrow Table, an HF Dataset or a DataFrame; "
        f"got {type(corpus).__name__}"
    )


def check_cutting(where: str, fields: Any, passage_words: Any) -> None:
    """ConfigError unless `fields` is a list of names and `passage_words` an integer >= 8."""
    if isinstance(passage_words, bool) or not isinstance(passage_words, int) or passage_words < 8:
        raise ConfigError(f"{where}: passage_words must be an integer >= 8, got {passage_words!r}")
    if isinstance(fields, str) or not fields or not all(isinstance(f, str) and f for f in fields):
        raise ConfigError(f"{where}: fields must be a list of field names, got {fields!r}")


def corpus_key(corpus: Any, fields: Sequence[str], passage_words: int) -> str:
    """A hash of the corpus's content and how it is cut into passages (see the module docstring)."""
    if is_path_corpus(corpus):
        content: Any = [[f.name, file_digest(f)] for f in corpus_files(corpus)]
    else:
        content = stable_hash(_rows(corpus), "retrieval corpus rows")
    return stable_hash({"content": content, "fields": list(fields), "passage_words": passage_words}, "retrieval corpus")


def split_passages(text: str, max_tokens: int) -> list[tuple[str, int]]:
    """`text` cut into passages of at most `max_tokens` tokens, each with the (0-based) line it starts on."""
    # (text, first line, tokens, paragraph number): paragraphs, cut at sentence ends when too long
    pieces: list[tuple[str, int, int, int]] = []
    pos = 0
    for para_no, m in enumerate([*_PARAGRAPH.finditer(text), None]):
        end = m.start() if m else len(text)
        para = text[pos:end]
        start = pos + (len(para) - len(para.lstrip()))  # where the paragraph's text begins
        pos = m.end() if m else len(text)
        stripped = para.strip()
        if not stripped:
            continue
        n = len(TOKEN.findall(stripped))
        if n <= max_tokens:
            pieces.append((stripped, text.count("\n", 0, start), n, para_no))
            continue
        offset = 0
        for sentence in _split_sentences(stripped):
            first = text.count("\n", 0, start + offset)
            offset += len(sentence)
            for part in _cut_tokens(sentence.strip(), max_tokens):
                pieces.append((part, first, len(TOKEN.findall(part)), para_no))
    out: list[tuple[str, int]] = []
    buf, buf_line, buf_n, last_para = "", 0, 0, -1
    for piece, line, n, para_no in pieces:  # join neighbours while they fit: sentences by a space, paragraphs by a line
        if buf and buf_n + n > max_tokens:
            out.append((buf, buf_line))
            buf, buf_n = "", 0
        if not buf:
            buf, buf_line = piece, line
        else:
            buf += (" " if para_no == last_para else "\n\n") + piece
        buf_n += n
        last_para = para_no
    if buf:
        out.append((buf, buf_line))
    return out


def _split_sentences(text: str) -> list[str]:
    out, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > pos:
            out.append(text[pos : m.end()])
            pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return [s for s in out if s.strip()]


def _cut_tokens(text: str, max_tokens: int) -> list[str]:
    """A sentence longer than `max_tokens`, cut between tokens."""
    spans = [m.span() for m in TOKEN.finditer(text)]
    if len(spans) <= max_tokens:
        return [text]
    out = []
    for a in range(0, len(spans), max_tokens):
        start = 0 if a == 0 else spans[a][0]
        end = len(text) if a + max_tokens >= len(spans) else spans[a + max_tokens][0]
        out.append(text[start:end].strip())
    return [o for o in out if o]


def load_passages(corpus: Any, fields: Sequence[str] = DEFAULT_FIELDS, passage_words: int = 100) -> list[tuple[str, str]]:
    """Every passage of the corpus as (text, source), in corpus order."""
    out: list[tuple[str, str]] = []
    if is_path_corpus(corpus):
        for f in corpus_files(corpus):
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES:
                try:
                    text = f.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise RecordError(f"retrieval corpus: {f} is not UTF-8 text ({e.reason} at byte {e.start})",
                                      path=str(f)) from e  # fmt: skip
                out.extend((p, f"{f}:{line + 1}") for p, line in split_passages(text, passage_words))
            else:
                from thresher.data.readers import read_records

                table = read_records(f)
                out.extend(_row_passages(table.to_pylist(), fields, passage_words, str(f)))
        return out
    return _row_passages(_rows(corpus), fields, passage_words, "corpus")


def _row_passages(rows: list[Any], fields: Sequence[str], passage_words: int, where: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            text, name = row, f"{where} row {i}"
        elif isinstance(row, Mapping):
            if not any(f in row for f in fields):
                raise RecordError(
                    f"retrieval corpus: {where} row {i} has none of the fields {list(fields)}; it has {sorted(row)}",
                    row=i, field=fields[0],
                )  # fmt: skip
            parts = []
            for f in fields:
                v = row.get(f)
                if v is not None and not isinstance(v, str):
                    raise RecordError(f"retrieval corpus: {where} row {i}, field {f!r}: expected text, found "
                                      f"{type(v).__name__}", row=i, field=f)  # fmt: skip
                if v and v.strip():
                    parts.append(v.strip())
            text = "\n\n".join(parts)
            rid = row.get("id")
            name = f"{where} row {i}" + (f" (id={rid!r})" if rid not in (None, "") else "")
        else:
            raise RecordError(f"retrieval corpus: {where} row {i} is a {type(row).__name__}; expected text or a dict",
                              row=i)  # fmt: skip
        for p, _line in split_passages(text, passage_words):
            out.append((p, name))
    return out
