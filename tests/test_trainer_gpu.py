"""CUDA-only trainer checks: bf16 varlen packing, fused AdamW, MFU, QLoRA. Skipped on machines without a GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from thresher.trainer import TrainConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from thresher.trainer.model import BUNDLED, resolve_model_dir

    return resolve_model_dir(BUNDLED)


def _config(smol_dir: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    base = {
        "model": str(smol_dir), "dataset": str(DEMO), "max_rows": 64, "max_seq_len": 512,
        "micro_batch_tokens": 4096, "learning_rate": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "output_dir": str(output_dir), "progress_bar": False,
    }
    return TrainConfig(**{**base, **overrides})


def test_auto_attention_picks_a_fused_varlen_kernel_in_bf16(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.trainer import attention
    from thresher.trainer.model import choose_attention

    cfg = _config(smol_dir, tmp_path)
    chosen = choose_attention(cfg, torch.device("cuda"), torch.bfloat16)
    assert attention.cuda_varlen_backend() is not None, "neither flash-attn nor torch's varlen op is available"
    assert chosen == attention.NAME


def test_bf16_varlen_packed_loss_equals_unpacked(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.data import read_records
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.model import attach_adapter, choose_attention, load_model, load_tokenizer
    from thresher.trainer.packing import collate
    from thresher.trainer.sft import _loss_sum

    tokenizer = load_tokenizer(smol_dir)
    examples, _ = render_rows(
        read_records(DEMO, limit=16).to_pylist(), tokenizer, chat_template=resolve_chat_template(tokenizer, None),
        max_seq_len=512, eot_ids=end_of_turn_ids(tokenizer, None),
    )
    device, dtype = torch.device("cuda"), torch.bfloat16
    losses = {}
    for packing in (True, False):
        cfg = _config(smol_dir, tmp_path, packing=packing)
        attn = choose_attention(cfg, device, dtype)
        torch.manual_seed(0)
        model = attach_adapter(cfg, load_model(cfg, smol_dir, device, dtype, attn))
        batch = collate(examples, packing=packing, pad_id=tokenizer.pad_token_id).to(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            losses[packing] = (_loss_sum(model, batch, attn=attn, dtype=dtype, fast_head=True) / batch.n_supervised).item()
    assert abs(losses[True] - losses[False]) < 2e-2, losses  # bf16 kernels differ in rounding, not in what they see


def test_bf16_training_reports_throughput_and_mfu(smol_dir: Path, tmp_path: Path) -> None:
    result = train(_config(smol_dir, tmp_path, max_steps=8))
    records = [r for r in result.history if r["kind"] == "train"]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in records)
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")):
        assert records[-1]["mfu"] is not None and 0 < records[-1]["mfu"] < 1


def test_qlora_4bit(smol_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    from thresher.trainer import attention

    if attention.cuda_varlen_backend() is not None:
        # QLoRA's fp32 norms make q/k/v fp32: they must still reach the fused kernel, not the per-example loop.
        def no_reference_loop(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("packed QLoRA attention fell back to the per-example reference loop")

        monkeypatch.setattr(attention, "_reference_varlen", no_reference_loop)
    result = train(_config(smol_dir, tmp_path, quantization="4bit", max_steps=3, gradient_checkpointing=True))
    assert result.steps == 3 and (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_qlora_8bit(smol_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = train(_config(smol_dir, tmp_path, quantization="8bit", max_steps=3))
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert result.steps == 3 and all(0 < loss < 20 for loss in losses), losses


def test_compiled_bf16_varlen_training_matches_eager(smol_dir: Path, tmp_path: Path) -> None:
    """compile: true on CUDA: inductor kernels around the fused varlen attention, packed batches of varying length."""
    losses = {}
    for compiled in (False, True):
        result = train(_config(smol_dir, tmp_path / str(compiled), max_steps=4, compile=compiled, lora_dropout=0.0))
        losses[compiled] = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert losses[True] == pytest.approx(losses[False], abs=5e-2), losses  # bf16: fused kernels round differently
