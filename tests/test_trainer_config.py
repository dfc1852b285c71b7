"""TrainConfig: one object, a default and a comment per field, clear errors (no model needed)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from thresher.errors import ConfigError
from thresher.trainer import TrainConfig, load_config
from thresher.trainer import config as config_module
from thresher.trainer.config import RUNTIME_FIELDS


def test_defaults_need_only_model_and_dataset() -> None:
    cfg = TrainConfig(model="m", dataset="d.jsonl")
    assert cfg.adapter == "lora" and cfg.lora_target_modules == "all-linear" and cfg.packing
    with pytest.raises(ConfigError, match="model: required"):
        load_config({"dataset": "d.jsonl"})


def test_every_field_has_a_comment_and_a_default_in_one_place() -> None:
    source = inspect.getsource(TrainConfig)
    lines = source.splitlines()
    tree = ast.parse(source)
    fields = [node for node in tree.body[0].body if isinstance(node, ast.AnnAssign)]
    assert {f.target.id for f in fields} == set(TrainConfig.model_fields)
    for f in fields:
        above = lines[f.lineno - 2].strip()
        assert above.startswith("#"), f"field {f.target.id!r} has no comment above it"
        if f.target.id not in ("model", "dataset"):
            assert f.value is not None, f"field {f.target.id!r} has no default"
    assert set(TrainConfig.model_fields) >= RUNTIME_FIELDS


def test_unknown_key_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"learning_rat: unknown key; did you mean 'learning_rate'\?"):
        load_config({"model": "m", "dataset": "d", "learning_rat": 1e-4})


def test_bad_choice_lists_valid_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"model": "m", "dataset": "d", "adapter": "qlora"})
    assert "adapter" in str(err.value) and "'prompt_tuning'" in str(err.value) and "'qlora'" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter": "prompt_tuning"}, "set packing: false"),
        ({"adapter": "prefix_tuning", "packing": False, "save_merged": True}, "cannot be merged"),
        ({"max_seq_len": 4096, "micro_batch_tokens": 1024}, "one example must fit"),
        ({"lora_r": 0}, "lora_r"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"lora_target_modules": []}, "lora_target_modules is empty"),
    ],
)
def test_invalid_combinations_are_explained(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"model": "m", "dataset": "d", **overrides})


def test_yaml_round_trip_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndataset: d.jsonl\nlora_r: 8\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(path, max_steps=5, resume=None)
    assert cfg.lora_r == 8 and cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.max_steps == 5
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_semantic_diff_ignores_runtime_knobs() -> None:
    a = TrainConfig(model="m", dataset="d")
    b = a.model_copy(update={"max_steps": 100, "log_every": 7, "output_dir": "elsewhere"})
    assert a.semantic_diff(b) == {}
    c = a.model_copy(update={"lora_r": 4})
    assert c.semantic_diff(a) == {"lora_r": (4, 16)}


def test_config_module_imports_without_torch() -> None:
    source = Path(config_module.__file__).read_text()
    assert "import torch" not in source
