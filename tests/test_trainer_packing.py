"""Micro-batch planning, padding-free packing tensors, block-diagonal masks and the varlen reference kernel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from thresher.trainer.attention import _reference_varlen, varlen_attention_forward
from thresher.trainer.chat import Example
from thresher.trainer.packing import IGNORE, block_causal_mask, collate, plan_micro_batches


def _example(row_id: str, ids: list[int], n_prompt: int) -> Example:
    return Example(row_id, ids, [False] * n_prompt + [True] * (len(ids) - n_prompt))


@pytest.mark.parametrize("packing", [True, False])
def test_plan_covers_every_example_once_within_budget(packing: bool) -> None:
    lengths = [5, 17, 3, 30, 8, 8, 12, 1, 29, 16]
    plan = plan_micro_batches(lengths, budget=32, packing=packing, seed=3, epoch=0)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        cost = sum(lengths[i] for i in batch) if packing else len(batch) * max(lengths[i] for i in batch)
        assert cost <= 32
    assert plan == plan_micro_batches(lengths, budget=32, packing=packing, seed=3, epoch=0)
    assert plan != plan_micro_batches(lengths, budget=32, packing=packing, seed=3, epoch=1)


def test_packed_batch_restarts_positions_and_never_predicts_across_examples() -> None:
    a = _example("a", [10, 11, 12, 13], n_prompt=2)  # supervised: 12, 13
    b = _example("b", [20, 21, 22], n_prompt=1)  # supervised: 21, 22
    batch = collate([a, b], packing=True, pad_id=0)
    assert batch.packed and batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # position t predicts token t+1 of the same example; the last token of `a` predicts nothing (not 20).
    assert batch.targets.tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]]
    assert batch.cu_seqlens("cpu").tolist() == [0, 4, 7]
    assert (batch.n_tokens, batch.n_supervised) == (7, 4)
    assert batch.loss_index.tolist() == [1, 2, 4, 5] and batch.loss_targets.tolist() == [12, 13, 21, 22]


def test_unpacked_batch_pads_right() -> None:
    a = _example("a", [10, 11, 12, 13], n_prompt=2)
    b = _example("b", [20, 21, 22], n_prompt=1)
    batch = collate([a, b], packing=False, pad_id=0)
    assert not batch.packed
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.targets.tolist() == [[IGNORE, 12, 13, IGNORE], [21, 22, IGNORE, IGNORE]]
    assert batch.loss_index.tolist() == [1, 2, 4, 5] and (batch.n_tokens, batch.n_supervised) == (7, 4)


def test_block_causal_mask() -> None:
    mask = block_causal_mask([2, 3], device="cpu", dtype=None)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    additive = block_causal_mask([2, 3], device="cpu", dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)
    assert additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_varlen_reference_equals_sdpa_with_block_mask(kv_heads: int) -> None:
    torch.manual_seed(0)
    lens, heads, dim = [3, 5, 2], 4, 8
    total = sum(lens)
    q = torch.randn(1, heads, total, dim)
    k, v = torch.randn(1, kv_heads, total, dim), torch.randn(1, kv_heads, total, dim)
    mask = block_causal_mask(lens, device="cpu", dtype=None)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    module = torch.nn.Module()
    out, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5)
    assert out.shape == (1, total, heads, dim)  # transformers' (batch, T, heads, dim) convention
    torch.testing.assert_close(out[0], expected[0].transpose(0, 1))
    direct = _reference_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, None)
    torch.testing.assert_close(direct, out[0])


def test_varlen_refuses_attention_it_does_not_implement() -> None:
    """A sliding window, soft-capping or sinks passed by the model must fail, not be silently dropped."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cu, module = torch.tensor([0, 3, 8, 10], dtype=torch.int32), torch.nn.Module()
    plain, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5)
    # A window no example outgrows changes nothing, so it is allowed (layers pass it even for short rows).
    wide, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5, sliding_window=5)
    torch.testing.assert_close(wide, plain)
    with pytest.raises(ValueError, match="no sliding window"):
        varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5, sliding_window=4)
    with pytest.raises(ValueError, match="softcap"):
        varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5, softcap=50.0)
    with pytest.raises(ValueError, match="s_aux"):
        varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5, s_aux=torch.zeros(2))


@pytest.mark.parametrize(
    ("flash_attn_init", "expected"),
    [
        # a wheel built against another torch: the package is there, its extension does not load
        ("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')", "torch"),
        ("raise OSError('libcudart.so.12: cannot open shared object file')", "torch"),
        ("def flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError", "flash_attn"),
    ],
)
def test_a_broken_flash_attn_falls_back_to_torch_varlen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flash_attn_init: str,
    expected: str,
) -> None:
    """The kernel choice on a CUDA machine: a flash-attn that imports is used, one that fails to load is skipped with
    a warning (never a crash in the middle of a run), and torch's own varlen op takes over."""
    import sys

    from thresher.trainer import attention

    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        pytest.skip("this torch has no varlen op to fall back to")
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(flash_attn_init + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice only; no kernel runs here
    attention.cuda_varlen_backend.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="thresher.trainer"):
            assert attention.cuda_varlen_backend() == expected
    finally:
        attention.cuda_varlen_backend.cache_clear()
        sys.modules.pop("flash_attn", None)
    assert ("flash-attn is installed but does not load" in caplog.text) == (expected == "torch")
