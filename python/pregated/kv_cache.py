"""KV cache layers that append in place: transformers' DynamicLayer concatenates its keys and
values with every new token (torch.cat copies the whole cache, so a decode step costs time in
proportion to the context, and a generation its square). A GrowingLayer keeps them in buffers with
spare room for more keys and hands out views [B, heads, S, head_dim] of them; a step writes only
its new rows, and the room grows by a quarter (at least 256 keys) when it runs out.

The views are not contiguous across heads; transformers' attention and the CPU backend's
`cpu_attention` take them as they are. Anything that replaces a layer's keys or values (crop,
selecting or repeating rows of the batch, the server joining batches) leaves the buffers behind:
the next update copies what the layer then holds into new ones.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 256  # keys of room added at least, per growth


def _fits(buf: torch.Tensor, states: torch.Tensor) -> bool:
    """Whether `states` [..., n, d] can be written into `buf` [..., capacity, d]."""
    return (buf.shape[:-2] == states.shape[:-2] and buf.shape[-1] == states.shape[-1] and buf.dtype == states.dtype
            and buf.device == states.device)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room to append."""

    _key_buffer = _value_buffer = None  # [B, heads, capacity, head_dim]
    _key_view = _value_view = None      # what update() last returned

    def _adopt(self, length: int, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers of room for `need` keys and more (keys and values may differ in head size),
        holding the layer's first `length` keys and values."""
        capacity = need + max(MIN_ROOM, need // 4)

        def room(like: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
            buf = torch.empty((*like.shape[:-2], capacity, like.shape[-1]), dtype=like.dtype, device=like.device)
            if length:
                buf[..., :length, :].copy_(held)
            return buf

        self._key_buffer, self._value_buffer = room(key_states, self.keys), room(value_states, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == key_states.dim() else 0
        need = length + key_states.shape[-2]
        kb, vb = self._key_buffer, self._value_buffer
        if (kb is None or self.keys is not self._key_view or self.values is not self._value_view
                or kb.shape[-2] < need or not _fits(kb, key_states) or not _fits(vb, value_states)):
            self._adopt(length, need, key_states, value_states)
        self._key_buffer[..., length:need, :].copy_(key_states)
        self._value_buffer[..., length:need, :].copy_(value_states)
        self.keys = self._key_view = self._key_buffer[..., :need, :]
        self.values = self._value_view = self._value_buffer[..., :need, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._key_view = self._value_view = None
        super().reset()


def grow_in_place(cache) -> None:
    """Turns every plain DynamicLayer of `cache` (a transformers Cache) into a GrowingLayer, its
    keys and values kept; other layers (sliding windows, state spaces) stay as they are."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
