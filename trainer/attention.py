"""Varlen attention for packed batches, registered with transformers as the attention kernel "thresher_varlen".

How: transformers calls the registered function with (batch, heads, T, head_dim) query/key/value and forwards the
extra keyword arguments the model was called with; we pass `cu_seq_lens_q` and `max_length_q` (the names
transformers' own flash-attention kwargs use). Because no mask function is registered under this name,
transformers builds no (T x T) mask at all. On CUDA the kernel is flash-attn's `flash_attn_varlen_func` when that
package is installed, else torch's own `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10); on CPU a loop of
causal SDPA calls, one per example, does the same computation (used by the tests as the reference path).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

NAME = "thresher_varlen"

log = logging.getLogger("thresher.trainer")


def register() -> str:
    """Register the kernel with transformers (idempotent) and return its attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


@cache
def cuda_varlen_backend() -> str | None:
    """Which fused varlen kernel CUDA would use here: 'flash_attn', 'torch', or None."""
    if not torch.cuda.is_available():
        return None
    if importlib.util.find_spec("flash_attn") is not None:
        try:  # a wheel built against another torch is installed but fails to load (undefined symbol)
            from flash_attn import flash_attn_varlen_func  # noqa: F401

            return "flash_attn"
        except (ImportError, OSError) as exc:
            log.warning("flash-attn is installed but does not load (%s): using torch's varlen kernel", exc)
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        return "torch"
    return None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example. Returns (batch, T, heads, head_dim) like transformers' kernels."""
    if cu_seq_lens_q is None:
        # Not a packed call (generation, an unpacked batch): plain causal SDPA is right for right-padded rows.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed varlen attention expects batch size 1, got {query.shape[0]}")
    max_len = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    # What this kernel does not implement must fail, not be dropped: a sliding window that bites (Gemma 2/3,
    # Mistral v0.1), tanh soft-capping of scores (Gemma 2), attention sinks (gpt-oss).
    window = kwargs.get("sliding_window")
    if window is not None and max_len > window:
        raise ValueError(f"packed varlen attention has no sliding window ({window} tokens) and an example is "
                         f"{max_len} tokens long: set packing: false")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"packed varlen attention does not implement {name!r}: set packing: false")
    # (1, H, T, D) -> (T, H, D): the token-major layout varlen kernels take. transformers' projections are laid out
    # token-major already (a transposed view), so contiguous() is normally free.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 activations under bf16 autocast: QLoRA upcasts norms and embeddings to fp32 and bitsandbytes returns
        # its input dtype, so q/k/v arrive in fp32. Run the fused kernel in the autocast dtype, as transformers'
        # flash-attention path does, instead of falling back to the slow per-example loop.
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and cuda_varlen_backend() is not None:
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, max_len, scaling, dropout)
    else:  # CPU, fp32, or no fused kernel: the exact per-example loop
        out = _reference_varlen(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def _cuda_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None,
    dropout: float,
) -> torch.Tensor:
    cu = cu.to(torch.int32)
    if cuda_varlen_backend() == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        # flash-attn handles grouped-query attention itself (fewer k/v heads than q heads).
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True
        )
    if dropout:
        raise ValueError("attention dropout is not supported by torch's varlen kernel: install flash-attn")
    varlen_attn, causal_kwargs, native_gqa, takes_scale = _torch_varlen()
    kwargs: dict[str, Any] = dict(causal_kwargs)
    if takes_scale:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen kernel has no scale argument and the model needs one: install flash-attn")
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


@cache
def _torch_varlen() -> tuple[Callable[..., Any], dict[str, Any], bool, bool]:
    """torch's varlen op and what its signature takes: torch 2.10 asks for is_causal, later ones for a window."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def _reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """One causal SDPA call per example: slow, exact, runs anywhere."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        # (L, H, D) -> (1, H, L, D) for SDPA
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)
