"""Pipelines: the Step interface, DAGs of steps (Python `>>` or YAML recipes), and the resumable runner.

Steps that call models build on `thresher.pipelines.model_step.ModelStep` (not imported here: it pulls in the backend
package); seeded randomness lives in `thresher.pipelines.rng`; `thresher.open_run(run_dir)` reads a run back."""

from thresher.pipelines.dag import Pipeline
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import (
    Checkpoint,
    Filter,
    GeneratedBatch,
    Generator,
    GlobalFilter,
    GlobalStep,
    RowStep,
    Step,
)

__all__ = [
    "Checkpoint",
    "Filter",
    "GeneratedBatch",
    "Generator",
    "GlobalFilter",
    "GlobalStep",
    "Pipeline",
    "RowStep",
    "Step",
    "runtime",
    "secret",
]
