"""Fingerprints of parameters that are classes (pydantic schemas) and functions (issue 8, part 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

from thresher.pipelines import RowStep
from thresher.pipelines.fingerprint import stable_hash
from thresher.pipelines.runner import _jsonable

REPO = Path(__file__).resolve().parent.parent


class Verdict(BaseModel):
    score: int
    reason: str


class Judged(RowStep):
    """A step that takes a schema, as judges, taggers and ReAlign do (`response_format=MyModel`)."""

    inputs = ("id",)
    outputs = ("verdict",)

    def __init__(self, *, response_format: Any = None):
        self.response_format = response_format

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        return {"verdict": [None] * batch.num_rows}


def test_a_pydantic_model_class_parameter_is_fingerprinted_by_its_schema() -> None:
    step = Judged(response_format=Verdict)
    fp = step.fingerprint()
    assert fp == Judged(response_format=Verdict).fingerprint()

    # an edited schema re-runs the step: a new field, or a changed description the model reads
    class Verdict2(BaseModel):
        score: int
        reason: str
        confidence: float

    class Described(BaseModel):
        score: int = Field(description="0 to 5")
        reason: str

    assert Judged(response_format=Verdict2).fingerprint() != fp
    assert Judged(response_format=Described).fingerprint() != fp

    # the same schema from another process gives the same fingerprint (schema, not id or address)
    code = textwrap.dedent(
        """
        from pydantic import BaseModel
        from thresher.pipelines.fingerprint import stable_hash
        class Verdict(BaseModel):
            score: int
            reason: str
        print(stable_hash(Verdict))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO.parent)
    assert out.stdout.strip() == stable_hash(Verdict)


def test_a_step_with_a_class_parameter_clones_reprs_and_goes_into_the_manifest() -> None:
    step = Judged(response_format=Verdict)
    twin = step.clone()
    assert twin.response_format is Verdict and twin.fingerprint() == step.fingerprint()
    assert "Verdict" in repr(step)
    json.dumps(_jsonable(step.public_params()))  # the runner's manifest form is plain JSON


def test_other_classes_are_fingerprinted_by_module_and_qualname() -> None:
    class Plain:
        pass

    assert stable_hash(Plain) == stable_hash(Plain)
    assert stable_hash(Plain) != stable_hash(Verdict)
    assert stable_hash(dict) != stable_hash(list)
    # a step class as a parameter (not an instance) must not be mistaken for a nested step
    assert Judged(response_format=Judged).fingerprint() != Judged(response_format=Verdict).fingerprint()



_FUNCTION_SRC = """
def score(text):
    def bonus(n):
        return n {op} 1
    words = [w for w in text.split() if w in {{"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}}]
    return bonus(len(words))
"""


def _function_hash_in_subprocess(seed: str, op: str = "+") -> str:
    code = (
        "from thresher.pipelines.fingerprint import stable_hash\n"
        f"ns = {{'__name__': 'scoring'}}\nexec({_FUNCTION_SRC.format(op=op)!r}, ns)\n"
        "print(stable_hash(ns['score']))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO.parent)
    return out.stdout.strip()


def test_function_fingerprint_is_the_same_in_every_process_and_sees_nested_code() -> None:
    # a set constant's order follows PYTHONHASHSEED; its fingerprint must not
    hashes = {_function_hash_in_subprocess(seed) for seed in ("1", "2", "3", "4")}
    assert len(hashes) == 1, hashes
    # a change of bytecode inside the nested function (same constants, same names) changes the fingerprint
    assert _function_hash_in_subprocess("1", op="-") not in hashes
