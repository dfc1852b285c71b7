"""Prompt sets for pairwise evaluation: the five test sets AlpaGasus and Cherry LLM judge on, or any dataset.

The Cherry LLM repository ships its test sets as JSON Lines with a different field per set (Vicuna `text`, Koala
`prompt`, WizardLM `Instruction`, Self-Instruct's user-oriented tasks `instruction` plus the first instance's
`input`, LIMA `conversations` as one string). `load_prompt_set` reads those by their file names or short names
(vicuna, koala, wizardlm, sinstruct, lima; looked up in a data directory), and any other file thresher reads
(alpaca, ShareGPT, messages ...) through `thresher.data.read_records`, keeping `instruction` and `input`. A row without
a prompt is an error naming the file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError, RecordError

#: short name -> (file name in the Cherry LLM test data, the field that holds the prompt)
CHERRY_SETS: dict[str, tuple[str, str]] = {
    "vicuna": ("vicuna_test_set.jsonl", "text"),
    "koala": ("koala_test_set.jsonl", "prompt"),
    "wizardlm": ("wizardlm_test_set.jsonl", "Instruction"),
    "sinstruct": ("sinstruct_test_set.jsonl", "instruction"),
    "lima": ("lima_test_set.jsonl", "conversations"),
}
_ID_FIELDS = ("id", "question_id", "idx")


@dataclass
class PromptSet:
    """A named list of prompts: each `{"id", "instruction", "input"}` (input may be "")."""

    name: str
    path: Path
    rows: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def load_prompt_set(
    source: str | Path, *, data_dir: str | Path | None = None, max_prompts: int | None = None
) -> PromptSet:
    """The prompts of `source`: a short name of a Cherry test set (`CHERRY_SETS`, found in `data_dir`), or a file.
    `max_prompts` keeps the first N (a small check; the papers judge every prompt)."""
    if max_prompts is not None and max_prompts < 1:
        raise ConfigError(f"max_prompts must be >= 1, got {max_prompts}")
    name = str(source)
    if name in CHERRY_SETS:
        if data_dir is None:
            raise ConfigError(
                f"test set {name!r}: give the directory that holds {CHERRY_SETS[name][0]} (data_dir / --data-dir)"
            )
        path = Path(data_dir) / CHERRY_SETS[name][0]
        if not path.is_file():
            raise ConfigError(f"test set {name!r}: {path} not found")
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(
                f"test set {name!r} is neither a file nor one of the known sets {sorted(CHERRY_SETS)}"
            )
        name = path.stem.removesuffix("_test_set")
    known = next((k for k, (f, _) in CHERRY_SETS.items() if f == path.name), None)
    rows = _read_cherry(path, CHERRY_SETS[known][1], max_prompts) if known else _read_any(path, max_prompts)
    if not rows:
        raise RecordError("no prompts in the file", path=str(path))
    return PromptSet(known or name, path, rows)


def _read_cherry(path: Path, key: str, limit: int | None) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"not valid JSON: {e.msg}", path=str(path), line=line_no) from None
            if not isinstance(rec, dict):
                raise RecordError(f"expected an object, found {type(rec).__name__}", path=str(path), line=line_no)
            text = rec.get(key)
            if not isinstance(text, str) or not text.strip():
                raise RecordError(f"expected the prompt as a non-empty string, found {text!r:.60}", path=str(path),
                                  line=line_no, field=key)  # fmt: skip
            input_ = ""
            instances = rec.get("instances")
            if isinstance(instances, list) and instances and isinstance(instances[0], dict):
                input_ = str(instances[0].get("input") or "")  # Self-Instruct: the first instance is the one asked
            ident = next((rec[k] for k in _ID_FIELDS if rec.get(k) is not None), None)
            rows.append({"id": str(ident if ident is not None else f"{path.stem}_{line_no}"), "instruction": text,
                         "input": input_})  # fmt: skip
    return rows


def _read_any(path: Path, limit: int | None) -> list[dict[str, str]]:
    from thresher.data import read_records

    table = read_records(path)
    if limit is not None:
        table = table.slice(0, limit)
    out: list[dict[str, str]] = []
    cols = table.column_names
    for i, rec in enumerate(table.to_pylist()):
        text = rec.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise RecordError("the row has no instruction to ask", path=str(path), row=i, field="instruction")
        ident: Any = rec.get("id") if "id" in cols else None
        out.append({"id": str(ident if ident is not None else i), "instruction": text,
                    "input": str(rec.get("input") or "")})  # fmt: skip
    return out
