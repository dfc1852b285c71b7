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
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import RowStep


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def row_messages(
    instruction: Any, input_: Any = None, system: Any = None, history: Any = None, *, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The chat messages for one alpaca-layout row (shared by every step that asks a model about a row)."""
    msgs: list[dict[str, str]] = []
    sys_text = _text(system) or (system_prompt or "")
    if sys_text:
        msgs.append({"role": "system", "content": sys_text})
    for turn in history or []:
        if isinstance(turn, Mapping):
            turn = [turn.get("user", turn.get("0")), turn.get("assistant", turn.get("1"))]
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(f"history turns must be [user, assistant] pairs, got {turn!r}")
        msgs.append({"role": "user", "content": _text(turn[0])})
        msgs.append({"role": "assistant", "content": _text(turn[1])})
    user = _text(instruction)
    if _text(input_):
        user = f"{user}\n{_text(input_)}"
    msgs.append({"role": "user", "content": user})
    return msgs


class Respond(RowStep):
    """Answer each row's instruction with a chat model and write the answer to `output`.

    backend: a spec dict (`{kind: openai, base_url: ..., model: ...}`, `{kind: llama_cpp}`, see
    `thresher.llms.make_backend`) or a backend object; None uses the embedded llama.cpp model.
    only_missing: answer only rows whose `output` is null or empty, keep the others as they are.
    """

    inputs = ("instruction",)
    outputs = ("output",)
    VERSION = "1"

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
        self.backend_: Any = None

    def semantic_params(self) -> dict[str, Any]:
        # the backend counts by what answers (kind, model, weights), not by where it runs or how fast
        from thresher.llms.config import spec_identity

        params = super().semantic_params()
        params["backend"] = spec_identity(self.backend)
        return params

    def _make_backend(self) -> Any:
        from thresher.llms.config import make_backend

        return make_backend(
            self.backend,
            api_key=self.api_key,
            max_concurrency=self.max_concurrency,
            cache=self.cache,
            progress=self.progress,
        )

    def check(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"Respond: max_tokens must be >= 1, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"Respond: batch_size must be >= 1, got {self.batch_size}")
        backend = self._make_backend()
        if not callable(getattr(backend, "chat", None)):
            raise ConfigError(f"Respond: backend {backend!r} has no chat() method")
        check_secrets = getattr(backend, "check_secrets", None)
        if callable(check_secrets):
            check_secrets()

    def load(self) -> None:
        if self.backend_ is None:
            self.backend_ = self._make_backend()
            load = getattr(self.backend_, "load", None)
            if callable(load):
                load()

    def batches_in_flight(self) -> int:
        # A remote server: two batches at once keep its request window full across batch boundaries (the
        # backend's max_concurrency still bounds requests in flight). In-process models answer one at a time.
        return 2 if getattr(self.backend_, "kind", None) == "openai" else 1

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        self.load()
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
            name = f"row id={ids[i]!r}" if ids is not None else f"row {i} of the batch"
            if not _text(instr[i]).strip():
                errors[i] = f"{name}: the instruction is empty"
                continue
            try:
                convs.append(row_messages(instr[i], inp[i], system[i], history[i], system_prompt=self.system_prompt))
            except ValueError as e:
                errors[i] = f"{name}: {e}"
                continue
            todo.append(i)
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        for k in ("temperature", "top_p", "seed", "stop"):
            v = getattr(self, k)
            if v is not None:
                params[k] = v
        results = self.backend_.chat(convs, **params) if convs else []
        for i, res in zip(todo, results, strict=True):
            if res.error is not None:
                name = f"row id={ids[i]!r}" if ids is not None else f"row {i} of the batch"
                errors[i] = f"{name}: {res.error}"
            else:
                outputs[i] = res.text
        return {"output": pa.array(outputs, type=pa.string()), "error": errors}

    def metrics(self) -> dict[str, Any]:
        usage = getattr(self.backend_, "usage", None)
        return usage.as_dict() if usage is not None else {}
