"""`Respond`: fill each row's `output` by asking a chat model to answer its instruction.

The conversation sent for a row is: its `system` (or the step's `system_prompt`), its `history` turns, then the
instruction with the row's `input` appended on a new line (LLaMA-Factory's alpaca convention). Every request goes
through the backend's request cache, so a resumed run pays only for rows that had no answer yet; a row whose
request failed after the backend's retries leaves through the `failed` output with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import RowStep


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
        super().check()

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
        todo: list[int] = []
        convs = []
        for i in range(n):
            if self.only_missing and old[i] not in (None, ""):
                continue
            if not _text(instr[i]).strip():
                errors[i] = f"{self.row_name(ids, i)}: the instruction is empty"
                continue
            try:
                convs.append(row_messages(instr[i], inp[i], system[i], history[i], system_prompt=self.system_prompt))
            except ValueError as e:
                errors[i] = f"{self.row_name(ids, i)}: {e}"
                continue
            todo.append(i)
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        for k in ("temperature", "top_p", "seed", "stop"):
            v = getattr(self, k)
            if v is not None:
                params[k] = v
        results = backend.chat(convs, **params) if convs else []
        for i, res in zip(todo, results, strict=True):
            if res.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {res.error}"
            else:
                outputs[i] = res.text
        return {"output": pa.array(outputs, type=pa.string()), "error": errors}
