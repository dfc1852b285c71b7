"""Evaluation of trained models: the pairwise judge protocol of AlpaGasus and Cherry LLM, and held-out loss.

    from thresher.evaluation import pairwise_eval
    result = pairwise_eval({"kind": "transformers", "adapter": "runs/x/train/adapter"}, {"kind": "transformers"},
                           judge={"kind": "openai", "base_url": ..., "model": ...},
                           test_sets=["vicuna", "koala"], data_dir="../shared/data/cherry-llm")
    print(result.table())

Nothing heavy is imported here: torch and the backends load when a function runs.
"""

from __future__ import annotations

from thresher.evaluation.pairwise import (
    EvalResult,
    PairOutcome,
    SetResult,
    judge_pairs,
    judge_template,
    outcome,
    pairwise_eval,
    write_result,
)
from thresher.evaluation.test_sets import CHERRY_SETS, PromptSet, load_prompt_set

__all__ = [
    "CHERRY_SETS",
    "EvalResult",
    "PairOutcome",
    "PromptSet",
    "SetResult",
    "heldout_loss",
    "judge_pairs",
    "judge_template",
    "load_prompt_set",
    "outcome",
    "pairwise_eval",
    "write_result",
]


def __getattr__(name: str) -> object:
    if name == "heldout_loss":
        from thresher.evaluation.heldout import heldout_loss

        return heldout_loss
    raise AttributeError(f"module 'thresher.evaluation' has no attribute {name!r}")
