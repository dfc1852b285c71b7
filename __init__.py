"""thresher: instruction-data engineering as resumable DAG pipelines.

Grow instruction data (Self-Instruct, Evol-Instruct), judge it (LLM judge, IFD, DEITA, InsTag), separate grain from
chaff (dedup, diversity selection), polish what is kept (ReAlign) and train on the result (LoRA SFT).

This module only re-exports names; heavy libraries (torch, transformers, faiss, llama_cpp) load inside the modules
that need them, so `import thresher` stays fast.
"""

from thresher.errors import (
    AccountingError,
    BackendError,
    BudgetExceeded,
    ConfigError,
    FingerprintError,
    PipelineError,
    RecordError,
    StepError,
    ThresherError,
    TruncatedFileError,
)
from thresher.pipelines import (
    Filter,
    Generator,
    GlobalFilter,
    GlobalStep,
    Pipeline,
    RowStep,
    Step,
    runtime,
    secret,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # open_run pulls in the runner (pyarrow.parquet): loaded on first use, so `import thresher` stays fast
    if name == "open_run":
        from thresher.pipelines.runner import open_run

        return open_run
    raise AttributeError(f"module 'thresher' has no attribute {name!r}")


__all__ = [
    "AccountingError",
    "BackendError",
    "BudgetExceeded",
    "ConfigError",
    "Filter",
    "FingerprintError",
    "Generator",
    "GlobalFilter",
    "GlobalStep",
    "Pipeline",
    "PipelineError",
    "RecordError",
    "RowStep",
    "Step",
    "StepError",
    "ThresherError",
    "TruncatedFileError",
    "__version__",
    "open_run",
    "runtime",
    "secret",
]
