"""The Step: one small interface that every thresher operation implements.

A step is configured only through keyword-only constructor arguments stored under the same names (the scikit-learn
contract), so `get_params`, `clone`, `repr`, YAML round trips and fingerprints come for free. Models and indexes load
in `load()`, never in the constructor; learned state ends in `_`. Each step declares the columns it reads (`inputs`)
and the columns it writes (`outputs`) as class data, so a pipeline is checked before any row is touched.

Kinds (the engine in `execute.py` owns the plumbing for each):

- `RowStep.map_batch(batch) -> {column: values}`: adds or replaces columns batch by batch. A returned `error`
  column (None or a message per row) marks rows that failed; they leave through the `failed` side output.
- `Filter.keep(batch) -> (mask, reasons)`: says which rows stay and why the others go; the base writes
  `rejected_by` and `reason`, and balances in = out + rejected + failed.
- `GlobalFilter.keep(table)`: the same over the whole table (dedup, diversity selection, top-k).
- `GlobalStep.process(tables) -> table`: needs all rows of one or more inputs (concat, sort).
- `Generator.generate(tables) -> table`: makes rows at once (sources). A generator that makes rows over many
  model calls (Self-Instruct, Evol-Instruct) implements `generate_batches(tables, checkpoint)` instead: it yields
  `GeneratedBatch`es, each a commit point saved atomically with a small JSON `state`; after a crash the runner
  hands the last committed state back (`checkpoint.state`) and the generator carries on from there.

Lifecycle, in a run and on its own: `check()` before anything runs, `load()` (models, clients), `begin()` each time
the engine starts processing (per-run counters start here), the rows, `metrics()`, and in a run `unload()` once
the step is finished, so a pipeline never holds every step's model at once.

Every step also works on its own, outside a pipeline: `step(dataset)` returns a dataset of the same kind
(pyarrow Table, HF Dataset, pandas DataFrame or list of dicts); `step.apply(dataset)` also returns the rejected and
failed rows and the counts.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from thresher.errors import ConfigError, PipelineError
from thresher.pipelines.fingerprint import stable_hash
from thresher.pipelines.params import REDACTED, _Marked, runtime

if TYPE_CHECKING:
    import pyarrow as pa

    from thresher.pipelines.execute import StepResult

#: Reserved columns the engine writes on side outputs.
ERROR_COLUMN = "error"
REJECTED_BY_COLUMN = "rejected_by"
REASON_COLUMN = "reason"
FAILED_BY_COLUMN = "failed_by"

class OpenColumns(list):  # type: ignore[type-arg]
    """Columns a step's output has at least: a source that only peeked at its file (JSON, JSONL, CSV) may find
    more further on. A column missing from an open list is checked again, against the real data, just before the
    step that needs it runs, instead of failing a pipeline whose data does have it."""


class Step:
    """Base class of every step. Subclass one of RowStep, Filter, GlobalFilter, GlobalStep, Generator."""

    #: "row", "global" or "generator"; set by the base classes below.
    kind: ClassVar[str] = ""
    #: Columns this step reads; checked along the DAG before anything runs.
    inputs: ClassVar[tuple[str, ...]] = ()
    #: Columns this step adds (or overwrites).
    outputs: ClassVar[tuple[str, ...]] = ()
    #: Bump when a change to the code changes what the step produces: invalidates cached outputs.
    VERSION: ClassVar[str] = "1"
    #: How many input datasets the step takes: 0 (sources), 1, or None for "one or more" (fan-in).
    n_inputs: ClassVar[int | None] = 1

    # filled by __init_subclass__ from the constructor signature
    _runtime_params: ClassVar[frozenset[str]] = frozenset()
    _secret_params: ClassVar[frozenset[str]] = frozenset()

    #: The step's own folder in the run directory (`run_dir/steps/<name>-<fingerprint>/`), set by the runner before
    #: `load()`; None when the step runs on its own. Files a step writes as a by-product (quarantined records, an
    #: index) belong here, never beside its input, which may be read-only.
    workdir_: Path | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_init = cls.__dict__.get("__init__")
        if own_init is not None:
            sig = inspect.signature(own_init)
            marked = {n: p.default for n, p in sig.parameters.items() if isinstance(p.default, _Marked)}
            for name, p in sig.parameters.items():
                if name == "self":
                    continue
                if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    raise TypeError(
                        f"{cls.__qualname__}.__init__: parameter {name!r} must be keyword-only (put it after '*')"
                    )
            cls._runtime_params = frozenset(n for n, m in marked.items() if m.role == "runtime")
            cls._secret_params = frozenset(n for n, m in marked.items() if m.role == "secret")
            # inherit markers of parameters passed through **kwargs to a base __init__
            for base in cls.__mro__[1:]:
                if issubclass(base, Step):
                    cls._runtime_params |= base._runtime_params & set(sig.parameters)
                    cls._secret_params |= base._secret_params & set(sig.parameters)
            if marked:

                @functools.wraps(own_init)
                def __init__(self: Step, **kw: Any) -> None:
                    for n, m in marked.items():
                        if n not in kw:
                            kw[n] = m.value
                    own_init(self, **kw)

                setattr(cls, "__init__", __init__)  # noqa: B010 (mypy forbids assigning a method directly)
        if cls.__module__ != __name__ and not inspect.isabstract(cls):  # the bases below are abstract
            if not cls.inputs and not cls.outputs:
                raise TypeError(
                    f"{cls.__qualname__} declares neither `inputs` nor `outputs`: every step must say which "
                    "columns it reads and writes"
                )
            from thresher.pipelines.registry import register

            register(cls)

    # ---- the scikit-learn contract ------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind == p.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters as given (secrets included: do not log this)."""
        out = {}
        for name in self._param_names():
            if not hasattr(self, name):
                raise ConfigError(
                    f"{type(self).__qualname__} must store its constructor parameter {name!r} as self.{name}"
                )
            out[name] = getattr(self, name)
        return out

    def semantic_params(self) -> dict[str, Any]:
        """The parameters that change what the step produces: all but runtime knobs and secrets."""
        skip = self._runtime_params | self._secret_params
        return {k: v for k, v in self.get_params().items() if k not in skip}

    def public_params(self) -> dict[str, Any]:
        """Parameters safe to write to manifests, logs and YAML: secrets are redacted."""
        return {k: (REDACTED if k in self._secret_params and v is not None else v) for k, v in self.get_params().items()}

    def set_params(self, **params: Any) -> Step:
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ConfigError(f"{type(self).__qualname__} has no parameter {k!r}; valid: {sorted(valid)}")
            setattr(self, k, v)
        return self

    def clone(self, **overrides: Any) -> Step:
        """A fresh, unloaded step with the same parameters (and any overrides)."""
        params = self.get_params()
        params.update(overrides)
        return type(self)(**params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.public_params().items())
        return f"{type(self).__name__}({args})"

    # ---- identity ---------------------------------------------------------------------------------

    def fingerprint_extra(self) -> dict[str, Any]:
        """Extra data a step adds to its fingerprint, e.g. the content hash of a file it reads."""
        return {}

    def fingerprint(self, input_fingerprints: Sequence[str] = ()) -> str:
        cls = type(self)
        return stable_hash(
            {
                "step": f"{cls.__module__}.{cls.__qualname__}",
                "version": cls.VERSION,
                "params": self.semantic_params(),
                "extra": self.fingerprint_extra(),
                "inputs": list(input_fingerprints),
            },
            where=f"{cls.__qualname__} parameters",
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    def check(self) -> None:
        """Validate parameters; called before the first row. Raise ConfigError naming the parameter."""

    def load(self) -> None:
        """Load models, indexes, clients. Called once before processing; must be idempotent."""

    def begin(self) -> None:
        """Called by the engine each time it starts processing with this step (after `load`).

        Per-run counters start here: `metrics()` reports what this run did, so a step object used twice, or a run
        retried in the same process, never counts the same tokens twice."""

    def unload(self) -> None:
        """Release models and indexes `load()` took. The runner calls it when the step is finished; `load()` must
        bring them back if the step is used again."""

    def metrics(self) -> dict[str, Any]:
        """Numbers the step wants in the run manifest (usage, cost, cache hits). Called after it ran."""
        return {}

    def batches_in_flight(self) -> int:
        """How many batches the engine may hand a row step (`map_batch` / `keep`) at once, from worker threads
        (called after `load`).

        1 (the default) for local computation. A step that waits on a remote model returns more, so the backend
        keeps its window of requests full across batch boundaries; its `map_batch` must then be thread-safe.
        Outputs are still committed in order.
        """
        return 1

    def reads(self) -> tuple[str, ...]:
        """Columns this instance reads: the class's `inputs`, unless a parameter names them (override)."""
        return tuple(self.inputs)

    def missing_columns_hint(self, missing: Sequence[str]) -> str:
        """A sentence added to the error for columns this step needs and its input lacks: which step makes them
        (e.g. "run thresher.scorers.Tagger before it"). "" when there is nothing to add."""
        return ""

    def writes(self) -> tuple[str, ...]:
        """Columns this instance adds: the class's `outputs`, unless a parameter names them (override)."""
        return tuple(self.outputs)

    def output_columns(self, input_columns: Sequence[Sequence[str]]) -> list[str]:
        """Columns of the step's output, given its inputs' columns. Used to check the DAG before running."""
        cols: list[str] = []
        for group in input_columns[:1] if self.kind != "global" or self.n_inputs == 1 else input_columns:
            for c in group:
                if c not in cols:
                    cols.append(c)
        for c in self.writes():
            if c not in cols:
                cols.append(c)
        return OpenColumns(cols) if any(isinstance(g, OpenColumns) for g in input_columns) else cols

    @property
    def default_name(self) -> str:
        # snake_case that keeps acronyms whole: MIGSelect -> mig_select, LLMJudge -> llm_judge, TopK -> top_k
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(self).__name__).lower()

    # ---- standalone use -------------------------------------------------------------------------

    def apply(self, *datasets: Any) -> StepResult:
        """Run the step on in-memory data; returns output, rejected and failed tables and the counts."""
        from thresher.pipelines.execute import run_in_memory
        from thresher.pipelines.tables import as_table

        tables = [as_table(d) for d in datasets]
        return run_in_memory(self, tables, name=self.default_name)

    def __call__(self, *datasets: Any) -> Any:
        """`step(dataset) -> dataset`, returning the same container type it was given."""
        from thresher.pipelines.tables import like

        result = self.apply(*datasets)
        return like(result.output, datasets[0] if datasets else None)

    # ---- DAG building ---------------------------------------------------------------------------

    def __rshift__(self, other: Any) -> Any:
        from thresher.pipelines.dag import Pipeline

        return Pipeline.from_step(self) >> other

    def __rrshift__(self, other: Any) -> Any:
        from thresher.pipelines.dag import Pipeline

        if isinstance(other, (list, tuple)):
            return Pipeline.merge([Pipeline.coerce(o) for o in other]) >> self
        raise PipelineError(f"cannot chain {type(other).__name__} >> {type(self).__name__}")


class RowStep(Step):
    """A step that maps batches of rows to new or updated columns."""

    kind = "row"
    #: default batch size when a subclass's constructor has no `batch_size` parameter
    batch_size: int = 1024

    def __init__(self, *, batch_size: int = runtime(1024)) -> None:
        self.batch_size = batch_size

    def map_batch(self, batch: pa.Table) -> Mapping[str, Any]:
        """Return {column: values aligned with the batch}; an `error` column marks failed rows."""
        raise NotImplementedError


class Filter(Step):
    """A row step that keeps some rows and says why it removed the others."""

    kind = "row"
    batch_size: int = 1024

    def __init__(self, *, batch_size: int = runtime(1024)) -> None:
        self.batch_size = batch_size

    def keep(self, batch: pa.Table) -> tuple[Any, Any] | tuple[Any, Any, Mapping[str, Any]]:
        """Return (mask, reasons) or (mask, reasons, new_columns).

        mask: booleans, True = keep. reasons: one string for every removed row, or one per row (only the
        removed rows' reasons are kept). new_columns: extra columns for all rows (kept and rejected).
        """
        raise NotImplementedError


class GlobalFilter(Filter):
    """A filter that needs all rows at once (dedup, diversity selection, top-k)."""

    kind = "global"

    def __init__(self) -> None:  # no batch size: it sees the whole table
        pass


class GlobalStep(Step):
    """A step that needs all rows of its inputs at once."""

    kind = "global"

    def process(self, tables: list[pa.Table]) -> pa.Table:
        raise NotImplementedError


@dataclass
class GeneratedBatch:
    """One commit point of a generator: what it made since the last one, and the state to resume from.

    output: the new rows. rejected: candidates the generator turned down, each with a `reason` (the engine adds
    `rejected_by`). failed: candidates it could not make (a request that failed for good), each with an `error`
    (the engine adds `failed_by`). Any of them a pyarrow Table, a list of dicts or None.
    state: JSON-serialisable data (counters, an RNG state, a round number) the generator needs to carry on after
    this batch; handed back as `checkpoint.state` on resume.
    candidates: how many candidates this batch considered; when given, the engine checks
    candidates = output + rejected + failed, so no candidate disappears without a trace.
    """

    output: Any = None
    rejected: Any = None
    failed: Any = None
    state: dict[str, Any] | None = None
    candidates: int | None = None


@dataclass
class Checkpoint:
    """What a generator committed before this run: empty on a fresh start, the last commit's state on resume."""

    #: the `state` of the last committed batch; None when nothing was committed yet
    state: dict[str, Any] | None = None
    #: batches and output rows committed so far
    batches: int = 0
    rows: int = 0
    _read_output: Callable[[], pa.Table] | None = field(default=None, repr=False)

    def output(self) -> pa.Table:
        """The output rows committed so far, in order (read from the run directory on demand)."""
        if self._read_output is None:
            import pyarrow as pa

            return pa.table({})
        return self._read_output()


class Generator(Step):
    """A step that makes rows: from nothing (a source) or from its inputs (seed tasks).

    Implement `generate(tables) -> table` for a source that makes its rows at once, or `generate_batches` for one
    that makes them over many model calls and must not lose them to a crash.
    """

    kind = "generator"
    n_inputs: ClassVar[int | None] = 0

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        raise NotImplementedError

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint) -> Iterator[GeneratedBatch]:
        """Yield the rows in batches; the engine commits each one, with its state, before asking for the next.

        On resume `checkpoint` holds the last committed state and the rows committed so far: carry on from there,
        without redoing committed work. The default makes everything in one batch with `generate`.
        """
        if checkpoint.batches:
            return  # the one batch was committed: nothing is left to make
        yield GeneratedBatch(output=self.generate(tables))
