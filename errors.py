"""The exceptions thresher raises, one tree for the whole package.

    ThresherError
    ├── RecordError            bad input data: names file, line/row and field
    │   └── TruncatedFileError a JSON/JSONL file that ends mid-record
    ├── ConfigError            bad step parameters or recipe YAML: names the key, lists valid choices
    ├── PipelineError          a DAG that cannot run: cycles, unknown parents, missing columns
    │   └── FingerprintError   a step parameter that cannot be hashed (checked before any work)
    ├── StepError              a step failed while running: names the step (and row id when known)
    │   └── AccountingError    rows in != out + rejected + failed
    └── BackendError           an LLM / embedding backend could not answer (after retries)
        ├── BudgetExceeded     a backend's max_cost_usd was reached: the run stopped, re-run with more to resume
        └── BatchPending       a batch job is not finished (a `vllm-file` batch awaits its output file): re-run later

Every message says what was expected and what was found.
"""

from __future__ import annotations


class ThresherError(Exception):
    """Base class of every error thresher raises on purpose."""


class RecordError(ThresherError, ValueError):
    """A record in an input file is malformed.

    Carries where the problem is so callers can quarantine or report it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.line, self.row, self.field = path, line, row, field
        self.detail = message
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class TruncatedFileError(RecordError):
    """The file ends in the middle of a record."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        complete_records: int = 0,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.complete_records = complete_records
        super().__init__(message, path=path, line=line, row=row, field=field)


class ConfigError(ThresherError, ValueError):
    """Invalid configuration: a step parameter, a recipe key, an unknown choice."""


class PipelineError(ThresherError):
    """The pipeline cannot run as declared."""


class FingerprintError(PipelineError):
    """A step parameter has no stable hash, so the step cache could not be trusted."""


class StepError(ThresherError):
    """A step failed while running."""


class AccountingError(StepError):
    """A step's row counts do not balance: in != out + rejected + failed."""


class BackendError(ThresherError):
    """A model backend failed to answer a request."""


class BudgetExceeded(BackendError):
    """A backend spec's `max_cost_usd` was reached: no new request is sent. What was answered is in the request
    cache and every committed batch stays committed, so a re-run with a larger budget resumes."""


class BatchPending(BackendError):
    """Requests were handed to a batch job whose results are not there yet (e.g. a `vllm-file` batch whose output file
    has not been put back): the run stops here, and a re-run collects the results and goes on."""
