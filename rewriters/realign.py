"""`ReAlign`: rewrite each response into the format its task calls for (ReAlign, Fan et al. 2024), then check it.

Per row: the task kind (the `task` column, which `TaskClassifier` writes, or one fixed `task=` for all rows) picks
its criterion from the task taxonomy. Kinds marked `keep` (stories, poems, roleplay, paraphrases, summaries,
titles) are left as they are, with that reason. For kinds that need facts (`needs_evidence`: open QA, fact
checking, how-to, recommendations, explanations) and a step with a `retriever`, the `top_k` passages retrieved for
the request are shown with it. The model writes `n` rewrites (the paper: 2), the longest by tokens is kept, and the
checks decide (`thresher.rewriters.checks`): not shorter than `min_length_ratio` (the paper: half) of the original,
code in both or neither, the original's final answer still there, no leaked prompt scaffolding. A row that fails
keeps its original response, and `realign_status` says why; see `thresher.rewriters.rewriting` for the columns.

The prompts are ours (`prompts/realign/rewrite[_evidence].<language>.txt`, overridable by `prompts=`): the request,
the original response, the format criterion and the evidence, asking for the reshaped answer alone.
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
from thresher.rewriters.taxonomy import Extension, Taxonomy, load_taxonomy


class ReAlign(RewriteStep, ModelStep, RowStep):
    """Rewrite responses into their task's format (see the module docstring).

    backend: the rewriting model (a spec dict, a backend object, or None for the embedded llama.cpp model).
    task: one task kind for every row (None: read the `task` column that TaskClassifier writes). taxonomy, extend:
    the task taxonomy file and extensions (None: the shipped one for `language`). retriever: evidence for kinds
    that need it (a BM25Retriever/EmbeddingRetriever or your own, or a spec dict; None: no evidence). top_k:
    passages per row. n: candidates per row, the longest kept. checks: the checks run, in order.
    min_length_ratio: the length check's bound. prompts: {template name: file} to replace shipped templates.
    """

    inputs = ("instruction", "output")
    outputs = ("output", "output_original", "realign_status", "realign_evidence")
    VERSION = "1"
    METHOD = "realign"
    PROMPT_NAMES = ("rewrite", "rewrite_evidence")
    FILLS = {
        "rewrite": {"question", "response", "format"},
        "rewrite_evidence": {"question", "response", "format", "evidence"},
    }
    STATUS = "realign_status"
    EVIDENCE = "realign_evidence"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        task: str | None = None,
        language: str = "en",
        taxonomy: str | os.PathLike[str] | None = None,
        extend: Extension | Sequence[Extension] | None = None,
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
        self.task = task
        self.language = language
        self.taxonomy = taxonomy
        self.extend = extend
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

    # ---- configuration --------------------------------------------------------------------------

    def load_taxonomy(self) -> Taxonomy:
        return load_taxonomy(self.language, self.taxonomy, extend=self.extend)

    def check(self) -> None:
        from thresher.errors import ConfigError

        super().check()
        tax = self.load_taxonomy()
        if self.task is not None and self.task not in tax:
            raise ConfigError(f"ReAlign: task {self.task!r} is not a kind of the taxonomy; valid: {tax.kinds}")

    def reads(self) -> tuple[str, ...]:
        return (*self.inputs, "task") if self.task is None else tuple(self.inputs)

    def missing_columns_hint(self, missing: Sequence[str]) -> str:
        if "task" in missing:
            return "run thresher.rewriters.TaskClassifier before it, or give ReAlign a fixed task="
        return ""

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        # the taxonomy counts by content (fingerprint_extra), never by the path it was read from
        params.pop("taxonomy", None)
        params.pop("extend", None)
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        return {**super().fingerprint_extra(), "taxonomy": self.load_taxonomy().digest()}

    def load(self) -> None:
        super().load()
        if getattr(self, "taxonomy_", None) is None:
            self.taxonomy_ = self.load_taxonomy()

    # ---- the rows -------------------------------------------------------------------------------

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        self.start_batch()
        tax = self.taxonomy_
        n = batch.num_rows
        cols = batch.column_names
        ids = batch.column("id").to_pylist() if "id" in cols else None
        instr = batch.column("instruction").to_pylist()
        inp = batch.column("input").to_pylist() if "input" in cols else [None] * n
        out = batch.column("output").to_pylist()
        tasks = [self.task] * n if self.task is not None else batch.column("task").to_pylist()
        status: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        planned: dict[int, tuple[str, str]] = {}  # row -> (question, format)
        need: list[int] = []
        for i in range(n):
            kind = tasks[i]
            if not isinstance(kind, str) or kind not in tax:
                errors[i] = (f"{self.row_name(ids, i)}, field 'task': {kind!r} is not a kind of the taxonomy "
                             f"(run TaskClassifier, or fix the column); valid: {', '.join(tax.kinds)}")  # fmt: skip
                continue
            spec = tax[kind]
            bad = self.not_text(ids, i, instruction=instr[i], input=inp[i], output=out[i])
            if bad is not None:
                errors[i] = bad
            elif not isinstance(out[i], str) or not out[i].strip():
                status[i] = "kept: empty: the row has no response to rewrite"
            elif not isinstance(instr[i], str) or not instr[i].strip():
                status[i] = "kept: empty: the row has no instruction to rewrite its response for"
            elif spec.keep or not spec.format:
                status[i] = f"kept: keep_kind: responses to {kind!r} tasks are kept as they are"
            else:
                planned[i] = (self.question(instr[i], inp[i]), spec.format)
                if spec.needs_evidence:
                    need.append(i)
        found = self.evidence_for([planned[i][0] for i in need])
        evidence: dict[int, list[Passage]] = {i: p for i, p in zip(need, found, strict=True) if p}
        todo: dict[int, tuple[str, dict[str, Any], list[Passage]]] = {}
        for i, (question, fmt) in planned.items():
            fills: dict[str, Any] = {"question": question, "response": out[i], "format": fmt}
            if i in evidence:
                todo[i] = ("rewrite_evidence", {**fills, "evidence": format_evidence(evidence[i])}, evidence[i])
            else:
                todo[i] = ("rewrite", fills, [])
        return self.rewrite_rows(batch, todo, status, errors)
