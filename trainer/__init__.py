"""LoRA SFT trainer (torch + peft) and export of datasets for other trainers.

    from thresher.trainer import TrainConfig, train, export_dataset
    result = train(TrainConfig(model="path/to/model-or.gguf", dataset="rows.jsonl", max_steps=100))

`TrainConfig` and `export_dataset` import without torch; `train` and the rest load torch, transformers and peft on
first use, so `import thresher.trainer` stays light on any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thresher.trainer.config import TrainConfig, load_config
from thresher.trainer.export import ExportResult, export_dataset

if TYPE_CHECKING:
    from thresher.trainer.sft import TrainResult, train

_LAZY = {"train": "thresher.trainer.sft", "TrainResult": "thresher.trainer.sft"}

__all__ = ["ExportResult", "TrainConfig", "TrainResult", "export_dataset", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thresher.trainer' has no attribute {name!r}")
