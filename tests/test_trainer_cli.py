"""`thresher train` / `thresher export` command wiring, help texts and error messages (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from thresher.data import read_records, write_records
from thresher.trainer.cli import export, main, train


def test_help_texts() -> None:
    runner = CliRunner()
    train_help = runner.invoke(train, ["--help"]).output
    assert "CONFIG.yaml" in train_help and "--resume / --no-resume" in train_help and "--max-steps" in train_help
    export_help = runner.invoke(export, ["--help"]).output
    assert "--for [trl|llama-factory|axolotl]" in export_help and "dataset_info.json" in export_help
    assert {"train", "export"} <= set(main.commands)


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("model: m\ndataset: d.jsonl\nlora_rank: 8\n")
    result = CliRunner().invoke(train, [str(config)])
    assert result.exit_code == 1
    assert "lora_rank: unknown key; did you mean" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(train, [str(config), "--set", "oops"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_missing_model_is_reported_before_any_work(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tmp_path / 'nowhere'}\ndataset: d.jsonl\n")
    result = CliRunner().invoke(train, [str(config)])
    assert result.exit_code == 1 and "models are never downloaded" in result.output


def test_export_command(tmp_path: Path, shared_data: Path) -> None:
    rows = read_records(shared_data / "llama-factory-demo" / "alpaca_en_demo.json", limit=3)
    source = tmp_path / "rows.parquet"
    write_records(rows, source)
    result = CliRunner().invoke(export, [str(source), str(tmp_path / "out"), "--for", "llama-factory", "--name", "x"])
    assert result.exit_code == 0, result.output
    assert "3 rows written for llama-factory" in result.output
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert info["x"]["file_name"] == "x.jsonl"
