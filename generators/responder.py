"""`Respond`: fill each row's `output` by asking a chat model to answer its instruction.

The conversation sent for a row is: its `system` (or the step's `system_prompt`), its `history` turns, then the
instruction with the row's `input` appended on a new line (LLaMA-Factory's alpaca convention). Every request goes
through the backend's request cache, so a resumed run pays only for rows that had no answer yet; a row whose
request failed after the backend's retries leaves through the `failed` output with the reason.

With `n` > 1 the model is asked for n samples per row (one request with `n`; servers that answer fewer choices are
asked again for the rest, each sample cached on its own) and `pick` says what the row keeps: `first`, `longest`
(most characters, the first of equals), or `all`: `output` holds the first sample and the list column `outputs`
every sample in order. A row step returns exactly the rows it was given, so "all" is a list column, not n rows;
a row missing any of its n samples fails whole, with the backend's reason.

Explanation tuning (Orca): `system_prompts` is a set of system instructions that ask the teacher to explain its
reasoning ("explain": our 12 shipped in `prompts/explain/system_prompts.<language>.txt`, a `key | text` file of your
own, or a list of texts). Each row gets one, drawn from a hash of (seed, row id or text), so the choice does not depend
on batching, order or resume; the row records it in `system` (the student trains on it as the system message) and
its key in `system_kind`. A row that already has a system message keeps it (`system_kind` null).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import RowStep

PICKS = ("first", "longest", "all")
SHIPPED_SYSTEM_SETS = ("explain",)


def load_system_prompts(spec: str | os.PathLike[str] | Sequence[str], language: str = "en") -> dict[str, str]:
    """{key: system instruction} of a named shipped set ("explain"), a `key | text` file, or a list of texts (keyed
    by position)."""
    from thresher.pipelines.prompts import shipped_prompt_path

    if not isinstance(spec, (str, os.PathLike)):
        texts = list(spec)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"Respond: system_prompts must be non-empty texts, got {texts!r:.120}")
        return {str(i): t for i, t in enumerate(texts)}
    path = (shipped_prompt_path("generators", str(spec), "system_prompts", language) if str(spec) in SHIPPED_SYSTEM_SETS
            else Path(spec).expanduser())  # fmt: skip
    if not path.is_file():
        raise ConfigError(f"Respond: system_prompts {str(spec)!r} is neither a file nor a shipped set "
                          f"{list(SHIPPED_SYSTEM_SETS)}")  # fmt: skip
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, text = (p.strip() for p in line.partition("|"))
        if not sep or not key or not text:
            raise ConfigError(f"Respond: {path}, line {n}: expected 'key | system instruction', got {line!r:.80}")
        if key in out:
            raise ConfigError(f"Respond: {path}, line {n}: key {key!r} is given twice")
        out[key] = text
    if not out:
        raise ConfigError(f"Respond: {path} holds no system instruction")
    return out


def pick_system(keys: Sequence[str], seed: int | None, row_key: str) -> str:
    """The key a row gets: a hash of (seed, the row's id or text), the same in any batch, order or resumed run."""
    digest = hashlib.blake2b(f"{seed or 0}\x00{row_key}".encode(), digest_size=8).digest()
    return keys[int.from_bytes(digest, "big") % len(keys)]


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def row_messages(
    instruction: Any, input_: Any = None, system: Any = None, history: Any = None, *, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The chat messages for one alpaca-layout row: `thresher.data.messages.row_messages`, the one mapping that
    Respond, the trainer and the writers share (a null, empty or whitespace-only system gives no system message)."""
    from thresher.data.messages import row_messages as shared

    return shared(instruction, input_, system, history, system_prompt=system_prompt)


class Respond(ModelStep, RowStep):
    """Answer each row's instruction with a chat model and write the answer to `output`.

    backend: a spec dict (`{kind: openai, base_url: ..., model: ...}`, `{kind: llama_cpp}`, see
    `thresher.llms.make_backend`) or a backend object; None uses the embedded llama.cpp model.
    only_missing: answer only rows whose `output` is null or empty, keep the others as they are.
    n: samples per row; pick: which of them the row keeps ("first", "longest", or "all": `output` = the first and
    the list column `outputs` = every sample).
    system_prompts: explanation tuning's set of system instructions, one drawn per row ("explain", a `key | text`
    file, or a list of texts; see the module docstring), in `language` for the shipped set.
    """

    inputs = ("instruction",)
    outputs = ("output",)
    VERSION = "2"  # 2: a whitespace-only system is no system message (the shared row -> messages rule)

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        system_prompt: str | None = None,
        max_tokens: int = 512,
        temperature: float | None = 0.7,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        only_missing: bool = False,
        n: int = 1,
        pick: str = "first",
        system_prompts: str | list[str] | None = None,
        language: str = "en",
        api_key: str | None = secret(),
        batch_size: int = runtime(512),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stop = stop
        self.only_missing = only_missing
        self.n = n
        self.pick = pick
        self.system_prompts = system_prompts
        self.language = language
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def check(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"Respond: max_tokens must be >= 1, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"Respond: batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"Respond: n must be a positive integer, got {self.n!r}")
        if self.pick not in PICKS:
            raise ConfigError(f"Respond: unknown pick {self.pick!r}; valid: {list(PICKS)}")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(f"Respond: n={self.n} samples at temperature 0 are {self.n} copies of one answer; "
                              "raise the temperature or set n=1")
        if self.system_prompts is not None:
            if self.system_prompt is not None:
                raise ConfigError("Respond: give system_prompt (one for every row) or system_prompts (one drawn per "
                                  "row), not both")  # fmt: skip
            from thresher.pipelines.prompts import LANGUAGES

            if self.language not in LANGUAGES:
                raise ConfigError(f"Respond: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
            load_system_prompts(self.system_prompts, self.language)
        super().check()

    def writes(self) -> tuple[str, ...]:
        cols = ("output", "outputs") if self.pick == "all" else ("output",)
        return cols + (("system", "system_kind") if self.system_prompts is not None else ())

    def fingerprint_extra(self) -> dict[str, Any]:
        if self.system_prompts is None:
            return {}
        return {"system_prompts": load_system_prompts(self.system_prompts, self.language)}  # their text, not a path

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        # one sample kept whole is what Respond did before `n` existed: left out, so those fingerprints still hold
        if params.get("n") == 1 and params.get("pick") != "all":
            params.pop("n", None)
            params.pop("pick", None)
        if params.get("system_prompts") is None:  # likewise for Respond before explanation tuning
            params.pop("system_prompts", None)
            params.pop("language", None)
        return params

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        backend = self.model()
        n = batch.num_rows
        cols = batch.column_names
        instr = batch.column("instruction").to_pylist()
        inp = batch.column("input").to_pylist() if "input" in cols else [None] * n
        system = batch.column("system").to_pylist() if "system" in cols else [None] * n
        history = batch.column("history").to_pylist() if "history" in cols else [None] * n
        ids = batch.column("id").to_pylist() if "id" in cols else None
        old = batch.column("output").to_pylist() if "output" in cols else [None] * n
        outputs: list[str | None] = list(old) if self.only_missing else [None] * n
        errors: list[str | None] = [None] * n
        kinds: list[str | None] = [None] * n
        table = load_system_prompts(self.system_prompts, self.language) if self.system_prompts is not None else {}
        system = list(system)
        todo: list[int] = []
        convs = []
        for i in range(n):
            if self.only_missing and old[i] not in (None, ""):
                continue
            if not _text(instr[i]).strip():
                errors[i] = f"{self.row_name(ids, i)}: the instruction is empty"
                continue
            if table and not _text(system[i]).strip():  # a row's own system message stands
                row_key = str(ids[i]) if ids is not None and ids[i] is not None else f"{instr[i]}\x00{_text(inp[i])}"
                kind = pick_system(list(table), self.seed, row_key)
                kinds[i], system[i] = kind, table[kind]
            try:
                convs.append(row_messages(instr[i], inp[i], system[i], history[i], system_prompt=self.system_prompt))
            except ValueError as e:
                errors[i] = f"{self.row_name(ids, i)}: {e}"
                continue
            todo.append(i)
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.n > 1:
            params["n"] = self.n
        for k in ("temperature", "top_p", "seed", "stop"):
            v = getattr(self, k)
            if v is not None:
                params[k] = v
        results = backend.chat(convs, **params) if convs else []
        samples: list[list[str | None] | None] = [None] * n
        for i, res in zip(todo, results, strict=True):
            if res.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {res.error}"
                continue
            texts = list(res.texts)
            samples[i] = texts
            # max() keeps the first of equally long samples
            outputs[i] = max(texts, key=lambda t: len(t or "")) if self.pick == "longest" else texts[0]
        columns: dict[str, Any] = {"output": pa.array(outputs, type=pa.string()), "error": errors}
        if self.pick == "all":
            columns["outputs"] = pa.array(samples, type=pa.list_(pa.string()))
        if self.system_prompts is not None:
            columns["system"] = pa.array([None if s is None else str(s) for s in system], type=pa.string())
            columns["system_kind"] = pa.array(kinds, type=pa.string())
        return columns
