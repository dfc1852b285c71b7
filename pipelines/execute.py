"""How one step turns input tables into output, rejected and failed tables.

The same code serves a step used on its own (`step(dataset)`) and a step inside a pipeline run (where the runner
feeds it batches read from the run directory and persists what comes out). Base classes own the plumbing here once:
filters only say which rows to keep and why, map steps only return columns; this module writes `rejected_by`/`reason`
and `failed_by`/`error`, checks declared columns, and balances in = out + rejected + failed.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thresher.errors import AccountingError, PipelineError, StepError
from thresher.pipelines.step import (
    ERROR_COLUMN,
    FAILED_BY_COLUMN,
    REASON_COLUMN,
    REJECTED_BY_COLUMN,
    Checkpoint,
    Filter,
    GeneratedBatch,
    Generator,
    GlobalFilter,
    GlobalStep,
    OpenColumns,
    RowStep,
    Step,
)


@dataclass
class BatchOutput:
    output: pa.Table
    rejected: pa.Table | None = None
    failed: pa.Table | None = None


@dataclass
class StepResult:
    """What a step produced, with its accounting."""

    output: pa.Table
    rejected: pa.Table
    failed: pa.Table
    rows_in: int
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        return self.output.num_rows

    @property
    def rows_rejected(self) -> int:
        return self.rejected.num_rows

    @property
    def rows_failed(self) -> int:
        return self.failed.num_rows


def check_columns(step: Step, name: str, input_columns: Sequence[Sequence[str]]) -> None:
    """Raise PipelineError if the step's declared inputs are not all present in each of its inputs."""
    n = step.n_inputs
    if n is not None and len(input_columns) != n:
        raise PipelineError(f"step {name!r} ({type(step).__name__}) takes {n} input(s), got {len(input_columns)}")
    if n is None and not input_columns:
        raise PipelineError(f"step {name!r} ({type(step).__name__}) needs at least one input")
    for i, cols in enumerate(input_columns):
        missing = [c for c in step.reads() if c not in cols]
        if missing and isinstance(cols, OpenColumns):
            continue  # the source only peeked: the runner checks again against the real data before this step
        if missing:
            which = f" (input {i})" if len(input_columns) > 1 else ""
            raise PipelineError(
                f"step {name!r} ({type(step).__name__}) needs column(s) {missing}{which}, "
                f"which the data does not have; available: {sorted(cols)}"
                + (f". {hint}" if (hint := step.missing_columns_hint(missing)) else "")
            )


def _as_array(values: Any, n: int, step_name: str, column: str) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values
    else:
        try:
            arr = pa.array(values if not isinstance(values, tuple) else list(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StepError(f"step {step_name!r}: column {column!r} has values Arrow cannot store: {e}") from e
    if len(arr) != n:
        raise StepError(f"step {step_name!r}: column {column!r} has {len(arr)} values for a batch of {n} rows")
    return arr


def _set_columns(step: Step, name: str, table: pa.Table, columns: Mapping[str, Any]) -> pa.Table:
    n = table.num_rows
    for col, values in columns.items():
        if col not in step.writes():
            raise StepError(
                f"step {name!r} ({type(step).__name__}) returned column {col!r} it does not declare; "
                f"declared outputs: {list(step.writes())}"
            )
        arr = _as_array(values, n, name, col)
        idx = table.schema.get_field_index(col)
        table = table.set_column(idx, col, arr) if idx >= 0 else table.append_column(col, arr)
    return table


def _mask(values: Any, n: int, name: str) -> pa.Array:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=pa.bool_())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.bool_():
        arr = arr.cast(pa.bool_())
    if len(arr) != n:
        raise StepError(f"filter {name!r} returned a mask of {len(arr)} values for {n} rows")
    if arr.null_count:
        raise StepError(f"filter {name!r} returned a mask with {arr.null_count} nulls: every row needs a decision")
    return arr


def _with_label(table: pa.Table, by_col: str, by: str, text_col: str, text: pa.Array) -> pa.Table:
    n = table.num_rows
    for col in (by_col, text_col):
        idx = table.schema.get_field_index(col)
        if idx >= 0:
            table = table.remove_column(idx)
    table = table.append_column(by_col, pa.array([by] * n, type=pa.string()))
    return table.append_column(text_col, text.cast(pa.string()) if len(text) else pa.array([], type=pa.string()))


def _split_failed(name: str, table: pa.Table, errors: Any) -> tuple[pa.Table, pa.Table | None, pa.Array | None]:
    """Rows with an error message leave through `failed`; returns (the others, failed rows, mask of the others)."""
    err = _as_array(errors, table.num_rows, name, ERROR_COLUMN)
    if err.null_count == len(err):
        return table, None, None
    bad = pc.is_valid(err)
    if isinstance(bad, pa.ChunkedArray):
        bad = bad.combine_chunks()
    text = err.filter(bad)
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    ok = pc.invert(bad)
    return table.filter(ok), _with_label(table.filter(bad), FAILED_BY_COLUMN, name, ERROR_COLUMN, text), ok


def apply_filter(step: Filter, name: str, table: pa.Table) -> BatchOutput:
    """One batch through a filter. An `error` entry among keep()'s new columns fails single rows (a filter that asks
    a model and got no answer for a row): they leave through `failed`, whatever the mask says."""
    result = step.keep(table)
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise StepError(f"filter {name!r}: keep() must return (mask, reasons) or (mask, reasons, columns)")
    mask = _mask(result[0], table.num_rows, name)
    reasons = result[1]
    failed = None
    if len(result) == 3 and result[2]:
        columns = dict(result[2])
        errors = columns.pop(ERROR_COLUMN, None)
        table = _set_columns(step, name, table, columns)
        if errors is not None:
            table, failed, ok = _split_failed(name, table, errors)
            if ok is not None:
                mask = mask.filter(ok)
                if not isinstance(reasons, str):
                    reasons = _as_array(reasons, len(ok), name, REASON_COLUMN).filter(ok)
    n_drop = len(mask) - pc.sum(mask).as_py() if len(mask) else 0
    if n_drop == 0:
        return BatchOutput(table, None, failed)
    drop = pc.invert(mask)
    rejected = table.filter(drop)
    if isinstance(reasons, str):
        text = pa.array([reasons] * n_drop, type=pa.string())
    else:
        all_reasons = _as_array(reasons, table.num_rows, name, REASON_COLUMN)
        text = all_reasons.filter(drop)
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
    return BatchOutput(table.filter(mask), _with_label(rejected, REJECTED_BY_COLUMN, name, REASON_COLUMN, text), failed)


def apply_map(step: RowStep, name: str, table: pa.Table) -> BatchOutput:
    columns = dict(step.map_batch(table))
    errors = columns.pop(ERROR_COLUMN, None)
    table = _set_columns(step, name, table, columns)
    if errors is None:
        return BatchOutput(table, None, None)
    table, failed, _ = _split_failed(name, table, errors)
    return BatchOutput(table, None, failed)


def _rows(value: Any, what: str, name: str) -> pa.Table | None:
    if value is None:
        return None
    from thresher.pipelines.tables import as_table

    try:
        return as_table(value)
    except TypeError as e:
        raise StepError(f"generator {name!r}: its batch's {what} is not a table or list of rows: {e}") from e


def generated_output(step: Generator, name: str, batch: GeneratedBatch, number: int) -> BatchOutput:
    """A generator's batch as output/rejected/failed tables, labelled like a filter's and checked.

    Rejected candidates need a `reason`, failed ones an `error`; when the batch says how many candidates it
    considered, they must add up: candidates = output + rejected + failed. The state must survive JSON, since it
    is what a resumed run starts from.
    """
    if not isinstance(batch, GeneratedBatch):
        raise StepError(f"generator {name!r}: generate_batches() must yield GeneratedBatch, got {type(batch).__name__}")
    output = _rows(batch.output, "output", name)
    output = output if output is not None else pa.table({})
    sides: dict[str, pa.Table | None] = {}
    for what, by_col, text_col in (("rejected", REJECTED_BY_COLUMN, REASON_COLUMN), ("failed", FAILED_BY_COLUMN, ERROR_COLUMN)):
        t = _rows(getattr(batch, what), what, name)
        if t is None or not t.num_rows:
            sides[what] = None
            continue
        if text_col not in t.column_names:
            raise StepError(f"generator {name!r}: batch {number}: its {what} rows need a {text_col!r} column saying why")
        text = t.column(text_col).combine_chunks()
        if text.null_count:
            raise StepError(f"generator {name!r}: batch {number}: {text.null_count} {what} row(s) have no {text_col!r}")
        sides[what] = _with_label(t, by_col, name, text_col, text)
    n_rej = sides["rejected"].num_rows if sides["rejected"] is not None else 0
    n_fail = sides["failed"].num_rows if sides["failed"] is not None else 0
    if batch.candidates is not None and batch.candidates != output.num_rows + n_rej + n_fail:
        raise AccountingError(
            f"generator {name!r} ({type(step).__name__}): batch {number} considered {batch.candidates} candidates "
            f"but gave {output.num_rows} out + {n_rej} rejected + {n_fail} failed = {output.num_rows + n_rej + n_fail}"
        )
    if batch.state is not None:
        if not isinstance(batch.state, dict):
            raise StepError(f"generator {name!r}: a batch's state must be a dict, got {type(batch.state).__name__}")
        try:
            json.dumps(batch.state, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StepError(f"generator {name!r}: batch {number}'s state is not JSON (it must survive a restart): {e}") from e
    return BatchOutput(output, sides["rejected"], sides["failed"])


def batch_candidates(batch: GeneratedBatch, out: BatchOutput) -> int:
    if batch.candidates is not None:
        return batch.candidates
    return sum(t.num_rows for t in (out.output, out.rejected, out.failed) if t is not None)


def apply_row_step(step: Step, name: str, batch: pa.Table) -> BatchOutput:
    """One batch through a row step (a Filter or a RowStep)."""
    if isinstance(step, Filter):
        return apply_filter(step, name, batch)
    if isinstance(step, RowStep):
        return apply_map(step, name, batch)
    raise PipelineError(f"step {name!r} ({type(step).__name__}) is not a row step")


def map_batches(step: Step, name: str, batches: Iterable[pa.Table]) -> Iterator[tuple[pa.Table, BatchOutput]]:
    """Each batch through a row step, results in input order.

    A step whose `batches_in_flight()` is k > 1 (a remote-model step) gets up to k batches at once on worker
    threads: its backend then sees one window of requests across batch boundaries instead of draining to zero at
    the end of every batch, where the slowest request of each batch would hold up the whole step.
    """
    k = max(1, int(step.batches_in_flight())) if step.kind == "row" else 1
    if k == 1:
        for batch in batches:
            yield batch, apply_row_step(step, name, batch)
        return
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix=f"thresher-{name}") as pool:
        pending: deque[tuple[pa.Table, Future[BatchOutput]]] = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(apply_row_step, step, name, batch)))
                while len(pending) >= k:
                    done, fut = pending.popleft()
                    yield done, fut.result()
            while pending:
                done, fut = pending.popleft()
                yield done, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def concat(tables: Iterable[pa.Table | None], empty_like: pa.Schema | None = None) -> pa.Table:
    parts = [t for t in tables if t is not None]
    if not parts:
        return empty_like.empty_table() if empty_like is not None else pa.table({})
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(parts, promote_options="permissive")


def run_on_tables(step: Step, name: str, tables: list[pa.Table]) -> BatchOutput:
    """Run a (loaded) step on whole tables; row steps go batch by batch."""
    if isinstance(step, GlobalFilter):
        return apply_filter(step, name, tables[0])
    if isinstance(step, (Filter, RowStep)):
        table = tables[0]
        bs = max(1, int(getattr(step, "batch_size", 1024) or 1024))
        slices = (table.slice(i, bs) for i in range(0, table.num_rows, bs))
        outs = [out for _, out in map_batches(step, name, slices)]
        if not outs:
            outs = [apply_row_step(step, name, table)]
        return BatchOutput(
            concat((o.output for o in outs), table.schema),
            concat(o.rejected for o in outs) if any(o.rejected is not None for o in outs) else None,
            concat(o.failed for o in outs) if any(o.failed is not None for o in outs) else None,
        )
    if isinstance(step, GlobalStep):
        return BatchOutput(step.process(tables))
    if isinstance(step, Generator):
        outs = []
        for number, batch in enumerate(step.generate_batches(tables, Checkpoint())):
            outs.append(generated_output(step, name, batch, number))
        if not outs:
            return BatchOutput(empty_generated(step))
        return BatchOutput(
            concat(o.output for o in outs),
            concat(o.rejected for o in outs) if any(o.rejected is not None for o in outs) else None,
            concat(o.failed for o in outs) if any(o.failed is not None for o in outs) else None,
        )
    raise PipelineError(f"step {name!r}: {type(step).__name__} is not a RowStep, Filter, GlobalStep or Generator")


def empty_generated(step: Generator) -> pa.Table:
    """What a generator that yielded no batch at all leaves: no rows, with the columns it declares (null-typed), so a
    step after it that reads them (Concat on `id`) runs on nothing instead of failing on a table with no columns."""
    return pa.table({c: pa.array([], pa.null()) for c in dict.fromkeys(("id", *step.writes()))})


def verify_accounting(step: Step, name: str, rows_in: int, out: int, rejected: int, failed: int) -> None:
    if step.kind == "generator" or (isinstance(step, GlobalStep) and not isinstance(step, Filter)):
        return  # generators make rows; global transforms (concat, sort) say their own counts
    if rows_in != out + rejected + failed:
        raise AccountingError(
            f"step {name!r} ({type(step).__name__}): {rows_in} rows in but {out} out + {rejected} rejected + "
            f"{failed} failed = {out + rejected + failed}; rows were lost or invented"
        )


def _empty(extra: Sequence[str]) -> pa.Table:
    return pa.table({c: pa.array([], type=pa.string()) for c in extra})


def run_in_memory(step: Step, tables: list[pa.Table], *, name: str) -> StepResult:
    """Validate, load and run a step outside a pipeline."""
    step.check()
    check_columns(step, name, [t.column_names for t in tables])
    step.load()
    step.begin()
    t0 = time.perf_counter()
    if step.kind != "generator":  # Batch API backends: every request of the step as batch jobs first
        from thresher.pipelines.batch_phase import run_batch_phase

        run_batch_phase(step, name, lambda: run_on_tables(step, name, tables))
    res = run_on_tables(step, name, tables)
    seconds = time.perf_counter() - t0
    rejected = res.rejected if res.rejected is not None else _empty([REJECTED_BY_COLUMN, REASON_COLUMN])
    failed = res.failed if res.failed is not None else _empty([FAILED_BY_COLUMN, ERROR_COLUMN])
    rows_in = sum(t.num_rows for t in tables)
    verify_accounting(step, name, rows_in, res.output.num_rows, rejected.num_rows, failed.num_rows)
    return StepResult(res.output, rejected, failed, rows_in, seconds, step.metrics())
