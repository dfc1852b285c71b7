"""`Polish`: a generic readability and factuality pass over any response, with ReAlign's checks.

For data whose task kinds the taxonomy does not cover, or as a last pass: the model improves order, fluency and
the statement of facts without a format criterion; with a `retriever`, the `top_k` passages retrieved for each
request are shown as evidence. `n` candidates, the longest by tokens, the same checks; a row that fails keeps its
original response and `polish_status` says why (columns: see `thresher.rewriters.rewriting`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import RowStep
from thresher.rewriters.checks import CHECKS
from thresher.rewriters.retrieval.base import Passage
from thresher.rewriters.rewriting import RewriteStep, format_evidence


class Polish(RewriteStep, ModelStep, RowStep):
    """Improve every response for readability and factual accuracy (see the module docstring).

    backend, retriever, top_k, n, checks, min_length_ratio, prompts, language: as for ReAlign (templates `polish`
    and `polish_evidence`).
    """

    inputs = ("instruction", "output")
    outputs = ("output", "output_original", "polish_status", "polish_evidence")
    VERSION = "1"
    METHOD = "polish"
    PROMPT_NAMES = ("polish", "polish_evidence")
    FILLS = {"polish": {"question", "response"}, "polish_evidence": {"question", "response", "evidence"}}
    STATUS = "polish_status"
    EVIDENCE = "polish_evidence"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        language: str = "en",
        retriever: Mapping[str, Any] | Any | None = None,
        top_k: int = 3,
        n: int = 2,
        checks: Sequence[str] = CHECKS,
        min_length_ratio: float = 0.5,
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_tokens: int = 1024,
        temperature: float | None = 0.7,
        seed: int = 0,
        api_key: str | None = secret(),
        batch_size: int = runtime(64),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.language = language
        self.retriever = retriever
        self.top_k = top_k
        self.n = n
        self.checks = checks
        self.min_length_ratio = min_length_ratio
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        self.start_batch()
        n = batch.num_rows
        cols = batch.column_names
        instr = batch.column("instruction").to_pylist()
        inp = batch.column("input").to_pylist() if "input" in cols else [None] * n
        out = batch.column("output").to_pylist()
        status: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        rows: list[int] = []
        ids = batch.column("id").to_pylist() if "id" in cols else None
        for i in range(n):
            bad = self.not_text(ids, i, instruction=instr[i], input=inp[i], output=out[i])
            if bad is not None:
                errors[i] = bad
            elif not isinstance(out[i], str) or not out[i].strip():
                status[i] = "kept: empty: the row has no response to polish"
            elif not isinstance(instr[i], str) or not instr[i].strip():
                status[i] = "kept: empty: the row has no instruction to polish its response for"
            else:
                rows.append(i)
        questions = [self.question(instr[i], inp[i]) for i in rows]
        found = self.evidence_for(questions)
        todo: dict[int, tuple[str, dict[str, Any], list[Passage]]] = {}
        for i, q, passages in zip(rows, questions, found, strict=True):
            fills: dict[str, Any] = {"question": q, "response": out[i]}
            if passages:
                todo[i] = ("polish_evidence", {**fills, "evidence": format_evidence(passages)}, passages)
            else:
                todo[i] = ("polish", fills, [])
        return self.rewrite_rows(batch, todo, status, errors)
