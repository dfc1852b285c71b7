"""Micro-batches by token budget, padding-free packing, and the tensors one forward pass needs.

Packed, a micro-batch is one sequence of several examples laid end to end (batch dimension 1, no padding):
position ids restart at 0 for each example, `cu_seqlens` marks where each starts for varlen attention kernels,
and `block_causal_mask` gives the equivalent block-diagonal causal mask for kernels that take a mask instead.
Unpacked, a micro-batch is rows right-padded to the longest. Either way targets are shifted once here, per
example, so no example ever predicts the first token of the next one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thresher.trainer.chat import Example

IGNORE = -100


@dataclass
class Batch:
    """One micro-batch, ready for the model. Counts are Python ints so the loop never syncs to read them."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): next-token id at each position, IGNORE where there is no loss
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) padding mask when unpacked; None when packed
    seq_lens: list[int]  # example lengths, in order (packed) or one per row (unpacked)
    n_tokens: int  # real (non-pad) tokens
    n_supervised: int  # tokens that carry loss
    # Flat positions (into B*T) that carry loss and their targets, found on the CPU so the GPU never syncs for them.
    loss_index: torch.Tensor
    loss_targets: torch.Tensor

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so the host-to-GPU copy in `to` runs asynchronously."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            fn(self.input_ids),
            fn(self.targets),
            fn(self.position_ids),
            None if self.attention_mask is None else fn(self.attention_mask),
            self.seq_lens,
            self.n_tokens,
            self.n_supervised,
            fn(self.loss_index),
            fn(self.loss_targets),
        )

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """Cumulative example lengths [0, l0, l0+l1, ...] as int32, the layout varlen kernels take."""
        lens = torch.tensor([0, *self.seq_lens], dtype=torch.int32)
        return lens.cumsum(0, dtype=torch.int32).to(device, non_blocking=True)


def plan_micro_batches(
    lengths: Sequence[int], *, budget: int, packing: bool, seed: int, epoch: int
) -> list[list[int]]:
    """Shuffle example indices for this epoch and cut them into micro-batches that fit `budget` tokens.

    The plan depends only on (lengths, budget, packing, seed, epoch), so a resumed run rebuilds the same plan and
    skips to its saved position instead of storing it.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0  # packed: tokens so far; unpacked: rows x longest row so far
    longest = 0
    for i in order:
        n = lengths[i]
        cost = used + n if packing else (len(current) + 1) * max(longest, n)
        if current and cost > budget:
            batches.append(current)
            current, used, longest = [], 0, 0
        current.append(i)
        used, longest = used + n, max(longest, n)
    if current:
        batches.append(current)
    return batches


def collate(examples: Sequence[Example], *, packing: bool, pad_id: int) -> Batch:
    """Tensors for one micro-batch of examples."""
    per_example_targets = [_shifted_targets(ex) for ex in examples]
    lens = [len(ex) for ex in examples]
    n_supervised = sum(ex.n_supervised for ex in examples)
    if packing:
        ids = torch.tensor([t for ex in examples for t in ex.input_ids]).unsqueeze(0)
        targets = torch.tensor([t for tg in per_example_targets for t in tg]).unsqueeze(0)
        positions = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
        return Batch(ids, targets, positions, None, lens, sum(lens), n_supervised, *_loss_positions(targets))
    width = max(lens)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ex, tg) in enumerate(zip(examples, per_example_targets, strict=True)):
        ids[row, : len(ex)] = torch.tensor(ex.input_ids)
        targets[row, : len(ex)] = torch.tensor(tg)
        mask[row, : len(ex)] = 1
    positions = torch.arange(width).expand(len(examples), width)
    return Batch(ids, targets, positions, mask, lens, sum(lens), n_supervised, *_loss_positions(targets))


def block_causal_mask(seq_lens: Sequence[int], *, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """A (1, 1, T, T) mask letting each token see only earlier tokens of its own example.

    dtype None gives a boolean mask (True = may attend) for SDPA; a float dtype gives the additive form (0 or the
    dtype's minimum) that eager attention adds to its scores.
    """
    doc = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), torch.tensor(seq_lens, device=device))
    total = doc.numel()
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    allowed = causal & (doc[:, None] == doc[None, :])
    if dtype is None:
        return allowed[None, None]
    additive = torch.zeros(total, total, dtype=dtype, device=device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _loss_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = targets.reshape(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    return index, flat[index]


def _shifted_targets(example: Example) -> list[int]:
    """targets[t] = input_ids[t + 1] where that token is supervised, else IGNORE; the last position has none."""
    ids, sup = example.input_ids, example.supervised
    return [ids[t + 1] if sup[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
