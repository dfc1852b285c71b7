"""QLoRA on the CPU: the real bitsandbytes 4-bit (NF4, double quant) and 8-bit layers under SmolLM2-135M.

bitsandbytes (>= 0.46.1) has CPU kernels, so the quantized path (loading, k-bit preparation, the logical MFU count,
packing over a quantized base, saving the adapter) is tested here and not only on a GPU. Runs stay tiny: a 4-bit
matmul dequantizes its weight on every call, which is slow on two cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # in the dev extra: these tests must run, not skip, wherever the suite runs
import pytest
import torch

from thresher.errors import ConfigError
from thresher.trainer import TrainConfig, train

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    from thresher.trainer.model import BUNDLED, resolve_model_dir

    return resolve_model_dir(BUNDLED)


def _config(smol_dir: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    base = {
        "model": str(smol_dir), "dataset": str(DEMO), "max_rows": 3, "max_seq_len": 48, "micro_batch_tokens": 160,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 5e-3, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", "output_dir": str(output_dir), "progress_bar": False, "tensorboard": False,
        "quantization": "4bit",
    }
    return TrainConfig(**{**base, **overrides})


def _examples(smol_dir: Path, n: int) -> tuple[Any, list[Any]]:
    from thresher.data import read_records
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.model import load_tokenizer

    tokenizer = load_tokenizer(smol_dir)
    examples, _ = render_rows(
        read_records(DEMO, limit=n).to_pylist(), tokenizer, chat_template=resolve_chat_template(tokenizer, None),
        max_seq_len=48, eot_ids=end_of_turn_ids(tokenizer, None),
    )
    return tokenizer, examples


def test_4bit_base_trains_the_adapter_only(smol_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = train(_config(smol_dir, tmp_path, max_steps=2, max_rows=2))
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert result.steps == 2 and all(0 < loss < 20 for loss in losses), losses
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 30 * 7  # every linear layer of every block got an adapter over its 4-bit weight
    assert [k for k, v in lora_b.items() if torch.count_nonzero(v) == 0] == []  # B starts at zero: all moved
    assert all(v.dtype == torch.float32 for v in adapter.values())  # adapter weights stay full precision
    assert not any("base_layer" in k or "quant" in k for k in adapter)  # the frozen 4-bit base is not saved


def test_4bit_layers_are_quantized_and_counted_at_logical_size(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.trainer.model import attach_adapter, count_matmul_params, load_model

    full = load_model(_config(smol_dir, tmp_path, quantization="none"), smol_dir, CPU, torch.float32, "sdpa")
    quantized = load_model(_config(smol_dir, tmp_path), smol_dir, CPU, torch.float32, "sdpa")
    q_proj = quantized.get_decoder().layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.numel() * 2 == q_proj.in_features * q_proj.out_features  # two 4-bit values per byte
    assert count_matmul_params(quantized) == count_matmul_params(full)  # MFU's N does not halve with packing
    model = attach_adapter(_config(smol_dir, tmp_path), quantized)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_packed_and_unpacked_loss_agree_over_a_4bit_base(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.trainer.model import attach_adapter, load_model
    from thresher.trainer.packing import collate
    from thresher.trainer.sft import _loss_sum

    tokenizer, examples = _examples(smol_dir, 2)
    cfg = _config(smol_dir, tmp_path)
    model = attach_adapter(cfg, load_model(cfg, smol_dir, CPU, torch.float32, "sdpa"))
    for name, p in model.named_parameters():  # a trained-looking adapter, so the LoRA path is not a no-op
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    losses = {}
    with torch.no_grad():
        for packing in (True, False):  # one packed row with a block-diagonal mask, or padded rows
            batch = collate(examples, packing=packing, pad_id=tokenizer.pad_token_id)
            loss = _loss_sum(model, batch, attn="sdpa", dtype=torch.float32, fast_head=True)
            losses[packing] = (loss / batch.n_supervised).item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-4), losses


def test_8bit_base_trains(smol_dir: Path, tmp_path: Path) -> None:
    result = train(_config(smol_dir, tmp_path, quantization="8bit", max_steps=1, max_rows=1))
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert result.steps == 1 and all(0 < loss < 20 for loss in losses), losses


def test_missing_bitsandbytes_is_a_clear_error(smol_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thresher.trainer.model import load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is not installed
    with pytest.raises(ConfigError, match=r"quantization='4bit' needs bitsandbytes: pip install bitsandbytes"):
        load_model(_config(smol_dir, tmp_path), smol_dir, CPU, torch.float32, "sdpa")
