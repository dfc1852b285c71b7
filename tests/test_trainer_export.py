"""`export_dataset`: files TRL, LLaMA-Factory and axolotl read, checked by reading them back (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from thresher.data import read_records, write_records
from thresher.errors import ConfigError
from thresher.trainer import TrainConfig, export_dataset


@pytest.fixture
def source(tmp_path: Path, shared_data: Path) -> Path:
    rows = read_records(shared_data / "llama-factory-demo" / "alpaca_en_demo.json", limit=5).to_pylist()
    rows[1]["system"] = "Be brief."
    rows[1]["history"] = [["hi", "hello"]]
    rows[4]["output"] = None  # not answered yet: cannot be trained on
    path = tmp_path / "rows.jsonl"
    write_records(rows, path)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trl_messages_and_prompt_completion(source: Path, tmp_path: Path) -> None:
    result = export_dataset(source, tmp_path / "trl", target="trl")
    assert result.rows == 4 and result.dropped_unanswered == 1
    rows = _lines(result.files[0])
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert "load_dataset" in result.usage

    pc = export_dataset(source, tmp_path / "trl_pc", target="trl", layout="prompt_completion")
    row = _lines(pc.files[0])[1]
    assert row["prompt"][-1]["role"] == "user" and [m["role"] for m in row["completion"]] == ["assistant"]
    # Lossless: reading the export back gives the same records.
    back = read_records(pc.files[0]).to_pylist()
    original = read_records(source).to_pylist()[:4]
    assert [(r["instruction"], r["input"], r["output"], r["history"]) for r in back] == [
        (r["instruction"], r["input"], r["output"], r["history"]) for r in original
    ]


def test_trl_file_loads_with_datasets(source: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    result = export_dataset(source, tmp_path / "trl", target="trl", layout="prompt_completion")
    ds = datasets.load_dataset("json", data_files=str(result.files[0]), split="train")
    assert ds.num_rows == 4 and {"prompt", "completion"} <= set(ds.column_names)


@pytest.mark.parametrize("layout", ["alpaca", "sharegpt"])
def test_llama_factory_with_dataset_info(source: Path, tmp_path: Path, layout: str) -> None:
    out = tmp_path / "lf"
    result = export_dataset(source, out, target="llama-factory", layout=layout, name="demo_sft")
    data_file, info_file = result.files
    info = json.loads(info_file.read_text())
    assert info["demo_sft"]["file_name"] == data_file.name == "demo_sft.jsonl"
    assert info["demo_sft"]["formatting"] == layout
    assert read_records(data_file).num_rows == 4
    assert "dataset: demo_sft" in result.usage and str(out.resolve()) in result.usage


def test_axolotl_chat_template_layout_and_yaml(source: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset=str(source), lora_r=8, lora_alpha=16,
                      max_seq_len=1024, micro_batch_tokens=4096, use_rslora=True, max_steps=100)
    result = export_dataset(source, tmp_path / "ax", target="axolotl", config=cfg)
    data_file, snippet_file = result.files
    assert all("messages" in row for row in _lines(data_file))
    doc = yaml.safe_load(snippet_file.read_text())
    (dataset,) = doc["datasets"]
    assert dataset["path"] == str(data_file.resolve()) and dataset["type"] == "chat_template"
    assert dataset["field_messages"] == "messages" and dataset["roles_to_train"] == ["assistant"]
    assert doc["base_model"] == cfg.model and doc["adapter"] == "lora" and doc["lora_target_linear"] is True
    assert (doc["lora_r"], doc["lora_alpha"], doc["sequence_len"], doc["micro_batch_size"]) == (8, 16, 1024, 4)
    assert doc["peft_use_rslora"] is True and doc["max_steps"] == 100 and doc["sample_packing"] is True


def test_bad_target_and_layout(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of"):
        export_dataset(source, tmp_path, target="unsloth")
    with pytest.raises(ConfigError, match="not read by axolotl"):
        export_dataset(source, tmp_path, target="axolotl", layout="alpaca")
