"""Recipes name environment variables in string parameters, so one recipe serves every endpoint."""

from __future__ import annotations

import pytest

from thresher.errors import ConfigError
from thresher.pipelines.recipe import recipe_from_text

RECIPE = """
name: env
steps:
  respond:
    step: Respond
    params:
      backend: {kind: openai, base_url: "${TEST_THRESHER_URL:-http://127.0.0.1:9/v1}", model: "${TEST_THRESHER_MODEL}"}
      system_prompt: "costs $${PRICE} in ${TEST_THRESHER_CURRENCY:-EUR}"
"""


def test_variables_defaults_and_literal_dollars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_THRESHER_MODEL", "Qwen/Qwen2.5-7B-Instruct")
    monkeypatch.delenv("TEST_THRESHER_URL", raising=False)
    monkeypatch.setenv("TEST_THRESHER_CURRENCY", "")  # set but empty: `:-` takes the default, as in the shell
    step = recipe_from_text(RECIPE).nodes["respond"].step
    assert step.backend == {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "Qwen/Qwen2.5-7B-Instruct"}
    assert step.system_prompt == "costs ${PRICE} in EUR"
    monkeypatch.setenv("TEST_THRESHER_URL", "http://10.0.0.5:8000/v1")
    assert recipe_from_text(RECIPE).nodes["respond"].step.backend["base_url"] == "http://10.0.0.5:8000/v1"


def test_an_unset_variable_without_default_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_THRESHER_MODEL", raising=False)
    with pytest.raises(ConfigError, match=r"<recipe>:7 steps\.respond\.params\.backend\.model: environment variable "
                                          r"TEST_THRESHER_MODEL is not set"):
        recipe_from_text(RECIPE)


def test_the_grow_recipe_builds_and_checks_for_any_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from thresher.pipelines.recipe import load_recipe
    from thresher.pipelines.runner import check_pipeline

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "grow.yaml"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("THRESHER_MODEL", "my-model")
    monkeypatch.setenv("THRESHER_LANGUAGE", "zh")
    pipe = load_recipe(recipe)
    columns = check_pipeline(pipe)
    assert list(pipe.nodes) == ["self_instruct", "evolve", "pool", "answer", "dedup"]
    assert pipe.nodes["self_instruct"].step.backend["model"] == "my-model"
    assert pipe.nodes["evolve"].step.language == "zh"
    assert {"parent_id", "evol_round", "evol_operation", "demonstrations"} <= set(columns["dedup"])
