"""`Perplexity`: how surprising a text column is to a small language model (a cheap quality signal; Cherry's
cluster sampling keeps the middle quantiles of it).

The text is scored as it stands, no template: exp of the mean negative log-likelihood of its tokens (the first one
predicted from the BOS where the tokenizer adds one, otherwise left unscored), cut to `max_length` tokens. Any
backend with `logprobs` works: the bundled SmolLM2 in transformers by default, or a vLLM server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import RowStep
from thresher.scorers.ifd import default_dtype


class Perplexity(ModelStep, RowStep):
    """Perplexity of `column` under a small causal LM, written to `output_column` (default "perplexity").

    backend: a spec or a backend with `logprobs` (None: the bundled SmolLM2-135M-Instruct in transformers).
    max_length: tokens scored per text (longer texts are cut). A null or empty text fails its row.
    """

    inputs = ("output",)
    outputs = ("perplexity",)
    VERSION = "1"
    model_params = {"backend": "logprobs"}

    def __init__(
        self,
        *,
        column: str = "output",
        output_column: str = "perplexity",
        backend: Mapping[str, Any] | Any | None = None,
        max_length: int = 512,
        api_key: str | None = secret(),
        batch_size: int = runtime(16),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.column = column
        self.output_column = output_column
        self.backend = backend
        self.max_length = max_length
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def writes(self) -> tuple[str, ...]:
        return (self.output_column,)

    def check(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"Perplexity: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.batch_size < 1:
            raise ConfigError(f"Perplexity: batch_size must be >= 1, got {self.batch_size}")
        super().check()

    def _spec(self, param: str) -> Any:
        return default_dtype(super()._spec(param))

    def backend_overrides(self) -> dict[str, Any]:
        return {**super().backend_overrides(), "batch_size": self.batch_size}

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        backend = self.model()
        texts = batch.column(self.column).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else None
        errors: list[str | None] = [None] * len(texts)
        todo = []
        for i, text in enumerate(texts):
            if text is None or not str(text).strip():
                what = "null" if text is None else "empty"
                errors[i] = f"{self.row_name(ids, i)}: field {self.column!r} is {what}: no text to score"
            else:
                todo.append(i)
        scored = backend.logprobs([""] * len(todo), [str(texts[i]) for i in todo], max_continuation_tokens=self.max_length)
        values: list[float | None] = [None] * len(texts)
        for i, lp in zip(todo, scored, strict=True):
            if lp.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {lp.error}"
            elif not lp.logprobs:
                errors[i] = f"{self.row_name(ids, i)}: field {self.column!r} has a single token and no BOS to predict it from"
            else:
                values[i] = math.exp(lp.mean_nll)
        return {self.output_column: pa.array(values, type=pa.float64()), "error": errors}
