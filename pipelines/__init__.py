"""Pipelines: the Step interface, DAGs of steps (Python `>>` or YAML recipes), and the resumable runner."""

from thresher.pipelines.dag import Pipeline
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.step import Filter, Generator, GlobalFilter, GlobalStep, RowStep, Step

__all__ = [
    "Filter",
    "Generator",
    "GlobalFilter",
    "GlobalStep",
    "Pipeline",
    "RowStep",
    "Step",
    "runtime",
    "secret",
]
