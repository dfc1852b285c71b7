"""`ModelStep`: the one home of what every step that calls a model needs.

Respond, the judges, IFD, the generators and the rewriters all take backends (a spec dict, a backend object, or None
for the embedded default) and the same runtime knobs (`api_key`, `max_concurrency`, `cache`, `progress`). Put
`ModelStep` before the step's kind (`class Respond(ModelStep, RowStep)`) and it owns the plumbing once:

- fingerprints count a backend by its identity (kind, model, weights), never by where it runs, how fast, or its key;
- `check()` builds every backend before the first row, so an unknown kind or a missing key fails for free;
- `load()` starts the backends; `unload()` (the runner calls it when the step is finished) closes them, so a
  pipeline with an IFD model, a judge and an embedder holds one model at a time, not all three;
- `begin()` takes a snapshot of each backend's usage and `metrics()` reports the difference: this run's requests,
  tokens and cost only, each backend object counted once, however often the step or the backend object is reused;
- `batches_in_flight()`: a remote server (or the embedded model decoding in batches) gets two batches at once, so its
  request window stays full across batches;
- `rng()` / `sample_seed()`: the seeded-randomness convention of `thresher.pipelines.rng`, keyed by the step's `seed`.
- `estimate_requests(rows)`: the requests the step would send for those rows, sent nowhere (by default a run against
  recording dry-run backends; see `thresher.pipelines.estimate`), and `estimate_plan`, the same scaled to a whole input.

Per-row failures leave through `failed` in every kind: a RowStep returns an `error` column, a Filter an `error` entry
among keep()'s columns, a generator a `failed` table in its batch.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from thresher.errors import ConfigError
from thresher.llms.base import Usage
from thresher.pipelines import rng as _rng

_LOAD_LOCK = threading.Lock()  # map_batch may run on worker threads: backends are built once
_NEEDS = {"chat": "chat", "embed": "embed", "logprobs": "logprobs"}


class ModelStep:
    """Mixin for steps that call models; see the module docstring.

    `model_params` maps each constructor parameter that holds a backend to what it must do: "chat", "embed" or
    "logprobs". The step stores the runtime knobs it takes under their names (`api_key` as a `secret()`,
    `max_concurrency`, `cache`, `progress` as `runtime()` values); each is passed to backends built from specs.
    """

    model_params: ClassVar[Mapping[str, str]] = {"backend": "chat"}
    #: whether the step's requests may go out as Batch API jobs (`batch: true` on its backend); False for a step
    #: whose next request depends on the last answer, which a job hours long would stall
    batch_api: ClassVar[bool] = True

    # ---- building -------------------------------------------------------------------------------

    def _spec(self, param: str) -> Any:
        spec = getattr(self, param)
        if spec is None and self.model_params[param] == "logprobs":
            return {"kind": "transformers"}  # the bundled SmolLM2 in transformers: llama.cpp gives no logprobs
        return spec

    def backend_overrides(self) -> dict[str, Any]:
        """Knobs handed to backends built from specs (they fill what a spec leaves unset; a backend without such a
        parameter ignores it). A step adds its own here, e.g. a scorer's `batch_size` for its model's forward passes."""
        return {k: getattr(self, k, None) for k in ("api_key", "max_concurrency", "cache", "progress")}

    def _build(self, param: str) -> Any:
        from thresher.llms.config import make_backend, make_embedder

        overrides = self.backend_overrides()
        if self.model_params[param] == "embed":
            return make_embedder(self._spec(param), **overrides)
        return make_backend(self._spec(param), **overrides)

    def semantic_params(self) -> dict[str, Any]:
        from thresher.llms.config import spec_identity

        params: dict[str, Any] = super().semantic_params()  # type: ignore[misc]
        for param, kind in self.model_params.items():
            params[param] = spec_identity(self._spec(param), embedder=kind == "embed")
        return params

    def check(self) -> None:
        super().check()  # type: ignore[misc]
        name = type(self).__name__
        for param, kind in self.model_params.items():
            if kind not in _NEEDS:
                raise ConfigError(f"{name}.model_params[{param!r}] = {kind!r}; valid: {sorted(_NEEDS)}")
            backend = self._build(param)
            if not callable(getattr(backend, _NEEDS[kind], None)):
                raise ConfigError(f"{name}: {param} {backend!r} has no {_NEEDS[kind]}() method, which this step needs")
            if callable(getattr(backend, "submit_and_wait", None)) and not self.batch_api:  # a Batch API backend
                raise ConfigError(
                    f"{name}: {param} runs in Batch API mode (batch: {backend.batch!r}), which {name} cannot use: each of "
                    "its requests depends on the answers before it, so it would wait hours per request. Use the online "
                    "backend here (drop `batch`); row steps (Respond, LLMJudge, Tagger, ReAlign) and EvolInstruct's "
                    "rounds can use batch mode"
                )
            check_secrets = getattr(backend, "check_secrets", None)
            if callable(check_secrets):
                check_secrets()

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        super().load()  # type: ignore[misc]
        if getattr(self, "backends_", None) is not None:
            return
        with _LOAD_LOCK:
            if getattr(self, "backends_", None) is not None:
                return
            backends: dict[str, Any] = {}
            for param in self.model_params:
                backend = self._build(param)
                load = getattr(backend, "load", None)
                if callable(load):
                    load()
                attach = getattr(backend, "attach_workdir", None)
                if callable(attach):  # a Batch API backend keeps its ledger of jobs in the step's run folder
                    attach(getattr(self, "workdir_", None))
                backends[param] = backend
            self.backends_: dict[str, Any] | None = backends

    def model(self, param: str = "backend") -> Any:
        """The live backend of a model parameter (loads the step if needed)."""
        if param not in self.model_params:
            raise ConfigError(f"{type(self).__name__} has no model parameter {param!r}; valid: {list(self.model_params)}")
        self.load()
        assert self.backends_ is not None
        return self.backends_[param]

    def _distinct(self) -> list[Any]:
        seen: dict[int, Any] = {}
        for backend in (getattr(self, "backends_", None) or {}).values():
            seen.setdefault(id(backend), backend)
        return list(seen.values())

    def begin(self) -> None:
        super().begin()  # type: ignore[misc]
        self.usage_start_ = {id(b): b.usage.copy() for b in self._distinct() if isinstance(getattr(b, "usage", None), Usage)}

    def begin_again(self) -> None:
        """Restart the step's own counters (`begin()`) but keep counting usage from the first `begin()`: after a
        batch phase (`thresher.pipelines.batch_phase`) ran the step to collect requests, its jobs' cost stays."""
        start = dict(getattr(self, "usage_start_", {}))
        self.begin()
        self.usage_start_.update(start)

    def unload(self) -> None:
        super().unload()  # type: ignore[misc]
        with _LOAD_LOCK:
            for backend in self._distinct():
                close = getattr(backend, "close", None)
                if callable(close):
                    close()
            # the usage snapshot stays: metrics() after unload still reports this run
            self._unloaded_usage_ = self._usage()
            self.backends_ = None

    def _usage(self) -> dict[str, Usage]:
        """This run's usage per model parameter (a backend object shared by two parameters counts once)."""
        if getattr(self, "backends_", None) is None:
            return dict(getattr(self, "_unloaded_usage_", {}))
        start = getattr(self, "usage_start_", {})
        out: dict[str, Usage] = {}
        seen: set[int] = set()
        for param, backend in (self.backends_ or {}).items():
            usage = getattr(backend, "usage", None)
            if not isinstance(usage, Usage) or id(backend) in seen:
                continue
            seen.add(id(backend))
            out[param] = usage.since(start[id(backend)]) if id(backend) in start else usage.copy()
        return out

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(super().metrics())  # type: ignore[misc]
        per_param = self._usage()
        total = Usage()
        for usage in per_param.values():
            total.add(usage)
        if per_param:
            out.update(total.as_dict())
        if len(per_param) > 1:
            out["by_model"] = {p: u.as_dict() for p, u in per_param.items()}
        return out

    def batches_in_flight(self) -> int:
        # A remote server, or the embedded llama.cpp model decoding several sequences together: two batches at once
        # keep its request window (its decoder's slots) full across batch boundaries; the backend's max_concurrency
        # or n_parallel still bounds requests in flight. Other in-process models answer one request at a time.
        self.load()
        parallel = any(
            getattr(b, "kind", None) == "openai" or int(getattr(b, "n_parallel", 1) or 1) > 1 for b in self._distinct()
        )
        return 2 if parallel else 1

    # ---- cost estimates (thresher.pipelines.estimate) ---------------------------------------------

    def estimate_requests(self, sample_rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = "auto",
                          fill: float | None = None) -> list[Any]:  # fmt: skip
        """The requests this step would send for `sample_rows`, sent nowhere: a list of
        `thresher.pipelines.estimate.PlannedRequest` (messages, max_tokens, n, count).

        The default runs the step on the rows against dry-run backends that record each request and answer with
        filler `fill` × max_tokens long; a step whose requests do not follow its input rows overrides this."""
        from thresher.pipelines import estimate

        return estimate.dry_run(self, sample_rows, tokenizer=tokenizer, fill=fill or estimate.DEFAULT_FILL).requests

    def estimate_plan(
        self, sample_rows: Sequence[Mapping[str, Any]], rows_in: int, *, tokenizer: Any = "auto", fill: float | None = None
    ) -> tuple[list[Any], list[dict[str, Any]], int]:
        """(the requests of the whole step, rows to hand the next step as its sample, the rows it will output), for
        `rows_in` input rows of which `sample_rows` is a sample. Default: the dry run of `estimate_requests`, its
        counts scaled by rows_in / len(sample_rows); a row step passes every row on, a generator as many as it
        made candidates from the sample (every candidate accepted: an upper bound)."""
        from thresher.pipelines import estimate

        if not sample_rows and self.n_inputs != 0:  # type: ignore[attr-defined]
            return [], [], 0
        run = estimate.dry_run(self, sample_rows, tokenizer=tokenizer, fill=fill or estimate.DEFAULT_FILL)
        scale = rows_in / len(sample_rows) if sample_rows else 1.0
        for q in run.requests:
            q.count *= scale
        rows_out = rows_in
        if getattr(self, "kind", "") == "generator":
            rows_out = round(len(run.rows) * scale)
        return run.requests, run.rows, rows_out

    # ---- seeded randomness ----------------------------------------------------------------------

    def rng(self, *keys: Any) -> random.Random:
        """A random generator for one decision, from the step's `seed` and the decision's keys (purpose, row id,
        round): the same in every run, whatever the batching or thread order."""
        return _rng.rng(self._seed(), type(self).__name__, *keys)

    def sample_seed(self, *keys: Any) -> int:
        """A sampling seed for one model request, from the step's `seed` and the request's keys."""
        return _rng.sample_seed(self._seed(), type(self).__name__, *keys)

    def _seed(self) -> int:
        seed = getattr(self, "seed", None)
        return 0 if seed is None else seed

    @staticmethod
    def row_name(ids: list[Any] | None, i: int) -> str:
        """How error messages name a row: by its id when the data has one."""
        return f"row id={ids[i]!r}" if ids is not None else f"row {i} of the batch"
