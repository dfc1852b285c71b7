"""LoRA SFT on CPU with the real SmolLM2-135M (GGUF converted once into the cache): learning, saving, packing.

Sequences stay short (<= 64 tokens, a handful of rows) because a CPU LoRA step runs at ~100 tokens/s here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from thresher.errors import ConfigError
from thresher.trainer import TrainConfig, train

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from thresher.trainer.model import BUNDLED, resolve_model_dir

    return resolve_model_dir(BUNDLED)  # converted once, then cached under ~/.cache/thresher/hf-from-gguf


def _config(smol_dir: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    base = {
        "model": str(smol_dir),
        "dataset": str(DEMO),
        "max_rows": 5,
        "max_seq_len": 64,
        "micro_batch_tokens": 256,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "learning_rate": 2e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "output_dir": str(output_dir),
        "progress_bar": False,
    }
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def run(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 10-step run shared by the tests below: 4 training rows (one micro-batch per step), 1 eval row."""
    out = tmp_path_factory.mktemp("sft")
    cfg = _config(smol_dir, out, eval_fraction=0.2, max_steps=10, save_merged=True, peak_tflops=1.0)
    return {"cfg": cfg, "result": train(cfg)}


def test_loss_goes_down(run: dict[str, Any]) -> None:
    losses = [r["loss"] for r in run["result"].history if r["kind"] == "train"]
    assert len(losses) == 10
    assert losses[-1] < 0.7 * losses[0], losses
    assert run["result"].eval_loss is not None and run["result"].eval_loss > 0


def test_every_lora_parameter_changed(run: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    adapter = load_file(run["result"].adapter_dir / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    assert len(lora) == 30 * 7 * 2  # 30 layers x 7 linear modules x (A, B) for all-linear
    # B starts at zero; A starts random: compare A with a fresh init by the same code path and seed.
    unchanged_b = [k for k, v in lora.items() if "lora_B" in k and torch.count_nonzero(v) == 0]
    assert unchanged_b == []
    fresh = _fresh_adapter(run["cfg"])
    unchanged_a = [k for k, v in lora.items() if "lora_A" in k and torch.equal(v, fresh[k])]
    assert unchanged_a == []


def _fresh_adapter(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights as initialised before any step, by the same code path and seed."""
    from peft import get_peft_model_state_dict

    from thresher.trainer.model import attach_adapter, load_model

    torch.manual_seed(cfg.seed)
    model = attach_adapter(cfg, load_model(cfg, Path(cfg.model), torch.device("cpu"), torch.float32, "sdpa"))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def test_adapter_reloads_with_the_same_logits_and_merged_model_matches(run: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, cfg = run["result"], run["cfg"]
    ids = torch.tensor([[1, 4093, 198, 6004, 665, 2, 198, 1, 520, 9531, 198]])
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        tuned_logits = tuned(ids).logits
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), result.adapter_dir).eval()
        torch.testing.assert_close(again(ids).logits, tuned_logits, rtol=0, atol=0)
        merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
        torch.testing.assert_close(merged(ids).logits, tuned_logits, rtol=1e-4, atol=1e-4)
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the adapter does something


def test_logs_are_written(run: dict[str, Any]) -> None:
    out = run["result"].output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens_per_s", "mfu", "peak_memory_gb"} <= set(
        train_records[0]
    )
    assert all(r["tokens_per_s"] > 0 and r["supervised_tokens"] <= r["tokens"] for r in train_records)
    assert any(r["kind"] == "eval" for r in records)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file() and (run["result"].adapter_dir / "adapter_config.json").is_file()


def test_mfu_counts_the_base_model_matmuls(run: dict[str, Any]) -> None:
    """MFU = 4N x tokens/s / peak, N the base model's matmul weights (LoRA's own A/B matrices not included)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run["cfg"].model)
    n = sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, torch.nn.Linear))
    records = [r for r in run["result"].history if r["kind"] == "train"]
    for r in records:
        assert r["mfu"] == pytest.approx(4 * n * r["tokens_per_s"] / 1e12, rel=1e-9)


def test_matmul_params_count_logical_weights_not_packed_storage() -> None:
    from thresher.trainer.model import count_matmul_params

    layer = torch.nn.Linear(64, 32, bias=False)
    # bitsandbytes' Params4bit holds two 4-bit values per byte: numel is half of in_features x out_features.
    layer.weight = torch.nn.Parameter(torch.zeros(64 * 32 // 2, 1, dtype=torch.uint8), requires_grad=False)
    assert count_matmul_params(torch.nn.Sequential(layer, torch.nn.Linear(32, 8))) == 64 * 32 + 32 * 8


@pytest.mark.parametrize(
    ("gpu", "precision", "matmul_precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", "highest", 989.0),
        ("NVIDIA H100 80GB HBM3", "fp32", "highest", 67.0),  # torch's default: true fp32, no TF32
        ("NVIDIA H100 80GB HBM3", "fp32", "high", 494.5),  # TF32 matmuls switched on by the user
        ("NVIDIA H100 PCIe", "bf16", "highest", 756.0),  # not the SXM figure
        ("NVIDIA A100-SXM4-80GB", "bf16", "highest", 312.0),  # not the A10's
        ("NVIDIA GeForce GTX 1080", "bf16", "highest", None),  # unknown: MFU is left out, not guessed
    ],
)
def test_peak_flops_follow_the_gpu_and_the_matmul_precision(
    monkeypatch: pytest.MonkeyPatch, gpu: str, precision: str, matmul_precision: str, expected: float | None
) -> None:
    from thresher.trainer.metrics import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert peak_tflops(torch.device("cuda"), precision) == expected
    finally:
        torch.set_float32_matmul_precision(before)
    assert peak_tflops(torch.device("cuda"), precision, override=123.0) == 123.0
    assert peak_tflops(torch.device("cpu"), precision) is None  # CPU peaks are measured by the caller, not tabled


def test_gradient_accumulation_averages_over_all_supervised_tokens(smol_dir: Path, tmp_path: Path) -> None:
    """One micro-batch of 4 rows and two of 2 rows each are the same optimizer step: same loss, same gradient."""
    steps = {}
    for budget, accum in ((256, 1), (128, 2)):  # rows of 64, 51, 64, 64 tokens: all fit 256; any two fit 128
        cfg = _config(smol_dir, tmp_path / f"accum{accum}", max_rows=4, micro_batch_tokens=budget,
                      grad_accum_steps=accum, max_steps=1, tensorboard=False)
        (record,) = [r for r in train(cfg).history if r["kind"] == "train"]
        steps[accum] = record
    assert steps[1]["tokens"] == steps[2]["tokens"] and steps[1]["supervised_tokens"] == steps[2]["supervised_tokens"]
    assert steps[2]["loss"] == pytest.approx(steps[1]["loss"], abs=1e-5)
    assert steps[2]["grad_norm"] == pytest.approx(steps[1]["grad_norm"], rel=1e-4)


def test_packed_loss_equals_transformers_own_loss_per_example(smol_dir: Path, tmp_path: Path) -> None:
    """An independent reference: the model's own labels loss, one row at a time, with system prompt and history."""
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.model import attach_adapter, load_model, load_tokenizer
    from thresher.trainer.packing import collate
    from thresher.trainer.sft import _loss_sum

    tokenizer = load_tokenizer(smol_dir)
    rows = [
        {"id": "a", "system": "Be terse.", "instruction": "2+2?", "input": "", "output": "4",
         "history": [["hi", "hello there"]]},
        {"id": "b", "instruction": "Name a colour", "input": "one word", "output": " Blue.\n"},
    ]
    examples, _ = render_rows(rows, tokenizer, chat_template=resolve_chat_template(tokenizer, None), max_seq_len=64,
                              eot_ids=end_of_turn_ids(tokenizer, None))
    cfg = _config(smol_dir, tmp_path)
    torch.manual_seed(0)
    model = attach_adapter(cfg, load_model(cfg, smol_dir, torch.device("cpu"), torch.float32, "sdpa"))
    batch = collate(examples, packing=True, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = _loss_sum(model, batch, attn="sdpa", dtype=torch.float32, fast_head=True).item()
        reference = 0.0
        for ex in examples:  # transformers shifts labels itself and averages over the non-ignored ones
            labels = [t if s else -100 for t, s in zip(ex.input_ids, ex.supervised, strict=True)]
            loss = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([labels])).loss
            reference += loss.item() * ex.n_supervised
    assert ours == pytest.approx(reference, rel=1e-5)


def test_packing_refuses_a_sliding_window_it_would_drop(smol_dir: Path, tmp_path: Path) -> None:
    """Packed attention is plain causal within each example: a model whose window is shorter than a row is refused."""
    from transformers import Gemma2Config, MistralConfig, MistralForCausalLM

    from thresher.trainer.model import load_model

    tiny = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    mistral = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(**tiny, sliding_window=16)).save_pretrained(mistral)
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="sliding window of 16 tokens"):
        load_model(_config(smol_dir, tmp_path, max_seq_len=64), mistral, cpu, torch.float32, "sdpa")
    load_model(_config(smol_dir, tmp_path, max_seq_len=16), mistral, cpu, torch.float32, "sdpa")  # never bites
    load_model(_config(smol_dir, tmp_path, max_seq_len=64, packing=False), mistral, cpu, torch.float32, "sdpa")
    gemma = tmp_path / "gemma2"
    Gemma2Config(**tiny, sliding_window=4096).save_pretrained(gemma)  # soft-capped scores; the config is enough
    with pytest.raises(ConfigError, match="soft-caps attention scores"):
        load_model(_config(smol_dir, tmp_path, max_seq_len=64), gemma, cpu, torch.float32, "sdpa")


def test_packed_and_unpacked_give_the_same_loss_and_gradients(smol_dir: Path, tmp_path: Path) -> None:
    """Same rows, three layouts: padded rows, packed with a block-diagonal SDPA mask, packed with varlen."""
    from thresher.data import read_records
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.model import attach_adapter, load_model, load_tokenizer
    from thresher.trainer.packing import collate
    from thresher.trainer.sft import _loss_sum

    tokenizer = load_tokenizer(smol_dir)
    rows = read_records(DEMO, limit=4).to_pylist()
    examples, _ = render_rows(
        rows, tokenizer, chat_template=resolve_chat_template(tokenizer, None), max_seq_len=64,
        eot_ids=end_of_turn_ids(tokenizer, None),
    )
    results = {}
    for attn, packing in [("sdpa", False), ("sdpa", True), ("varlen", True)]:
        cfg = _config(smol_dir, tmp_path, attn_implementation=attn, packing=packing)
        from thresher.trainer.model import choose_attention

        torch.manual_seed(0)
        model = attach_adapter(cfg, load_model(cfg, smol_dir, torch.device("cpu"), torch.float32,
                                               choose_attention(cfg, torch.device("cpu"), torch.float32)))
        with torch.no_grad():  # non-zero B so gradients reach A as well
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        batch = collate(examples, packing=packing, pad_id=tokenizer.pad_token_id)
        loss = _loss_sum(model, batch, attn=choose_attention(cfg, torch.device("cpu"), torch.float32),
                         dtype=torch.float32, fast_head=True) / batch.n_supervised
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[(attn, packing)] = (loss.item(), grads)
    ref_loss, ref_grads = results[("sdpa", False)]
    for key, (loss, grads) in results.items():
        assert abs(loss - ref_loss) < 1e-4, key
        torch.testing.assert_close(grads, ref_grads, rtol=1e-3, atol=1e-5), key


def test_gradient_checkpointing_gives_the_same_gradients(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.data import read_records
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.model import attach_adapter, load_model, load_tokenizer
    from thresher.trainer.packing import collate
    from thresher.trainer.sft import _loss_sum

    tokenizer = load_tokenizer(smol_dir)
    examples, _ = render_rows(
        read_records(DEMO, limit=2).to_pylist(), tokenizer, chat_template=resolve_chat_template(tokenizer, None),
        max_seq_len=48, eot_ids=end_of_turn_ids(tokenizer, None),
    )
    batch = collate(examples, packing=True, pad_id=tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        cfg = _config(smol_dir, tmp_path, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = attach_adapter(cfg, load_model(cfg, smol_dir, torch.device("cpu"), torch.float32, "sdpa"))
        model.train()
        decoder = model.get_base_model().get_decoder()
        # transformers >= 4.52 flags each layer (GradientCheckpointingLayer); older releases flag the decoder only.
        flags = [getattr(layer, "gradient_checkpointing", decoder.gradient_checkpointing) for layer in decoder.layers]
        assert all(flag == checkpointing for flag in flags)
        _loss_sum(model, batch, attn="sdpa", dtype=torch.float32, fast_head=True).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_compiled_layers_train_like_eager_ones(smol_dir: Path, tmp_path: Path) -> None:
    """compile: true runs each decoder layer through torch.compile (inductor, here on CPU) with dynamic shapes:
    packed micro-batches of different lengths must neither fail nor change the numbers."""
    losses = {}
    for compiled in (False, True):
        cfg = _config(smol_dir, tmp_path / str(compiled), max_steps=3, compile=compiled, tensorboard=False)
        result = train(cfg)
        losses[compiled] = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert len(losses[True]) == len(losses[False]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_train(smol_dir: Path, tmp_path: Path, adapter: str) -> None:
    cfg = _config(smol_dir, tmp_path, adapter=adapter, packing=False, max_rows=2, max_steps=2,
                  num_virtual_tokens=4, learning_rate=1e-2)
    result = train(cfg)
    assert result.steps == 2 and all(r["loss"] > 0 for r in result.history if r["kind"] == "train")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter.upper() and config["num_virtual_tokens"] == 4


def test_lora_variants_reach_peft(smol_dir: Path, tmp_path: Path) -> None:
    from thresher.trainer.model import attach_adapter, load_model

    cfg = _config(smol_dir, tmp_path, use_rslora=True, use_dora=True, lora_target_modules=["q_proj", "v_proj"])
    model = attach_adapter(cfg, load_model(cfg, smol_dir, torch.device("cpu"), torch.float32, "sdpa"))
    peft_config = model.peft_config["default"]
    assert peft_config.use_rslora and peft_config.use_dora and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    trainable = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert trainable == {"q_proj", "v_proj"}


def test_a_peft_that_does_not_load_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from thresher.trainer.model import attach_adapter

    monkeypatch.setitem(sys.modules, "peft", None)  # what an old peft under transformers 5 amounts to: ImportError
    cfg = TrainConfig(model="unused", dataset="unused", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"peft does not load with transformers .* pip install -U 'peft>=0.18'"):
        attach_adapter(cfg, model=None)
