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
