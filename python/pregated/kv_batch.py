"""A running decode batch's KV cache: rows leave it and new rows join it at step boundaries
(continuous batching). Works on transformers' DynamicCache whose layers are all full-attention
DynamicLayers ([B, heads, S, head_dim] keys and values); other caches (sliding windows, state
spaces) cannot take a row of another length, and `can_join` says so. A GrowingLayer (kv_cache.py)
takes the concatenated tensors as any DynamicLayer does and copies them into new room on its next
update.

Rows are left-padded: a batch of S cached positions and a new row of L < S positions gets S - L
zeros in front of the new row's keys and values, and zeros in the attention mask, so neither
side's attention changes.
"""

from __future__ import annotations

import torch


def can_join(cache) -> bool:
    """Whether rows of other lengths can join `cache` (every layer a plain DynamicLayer, or the
    GrowingLayer a CPU Engine turns it into)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from .kv_cache import GrowingLayer

    return (type(cache) is DynamicCache and len(cache.layers) > 0
            and all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers))


def keep_rows(cache, mask: torch.Tensor, rows: list[int]):
    """The batch without the rows not in `rows` (positions into the batch, in order)."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    return cache, mask.index_select(0, index)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, length, D], zeros in front."""
    extra = length - t.shape[-2]
    if extra == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], extra, t.shape[-1]), t], dim=-2)


def join(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor):
    """The batch (cache, mask [B, S]) with the rows of (new_cache, new_mask [b, L]) appended
    after its own; the shorter side is left-padded. Returns (cache, mask)."""
    S, L = mask.shape[1], new_mask.shape[1]
    n = max(S, L)
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, n), _pad_left(new.keys, n)], dim=0)
        layer.values = torch.cat([_pad_left(layer.values, n), _pad_left(new.values, n)], dim=0)
    pad = lambda m: torch.cat([m.new_zeros(m.shape[0], n - m.shape[1]), m], dim=1)  # noqa: E731
    return cache, torch.cat([pad(mask), pad(new_mask)], dim=0)
