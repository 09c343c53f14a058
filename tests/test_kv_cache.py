"""KV cache layers that append in place (kv_cache.py) against transformers' DynamicLayer, and the
CPU backend's attention reading their views in place."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from pregated import _core
from pregated.engine import Engine
from pregated.kv_cache import MIN_ROOM, GrowingLayer, grow_in_place


def _states(gen, batch, heads, n, d=8, dtype=torch.float32):
    return (torch.randn(batch, heads, n, d, generator=gen).to(dtype), torch.randn(batch, heads, n, d, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_appends_give_what_concatenation_gives(dtype):
    gen = torch.Generator().manual_seed(0)
    plain, growing = DynamicLayer(), GrowingLayer()
    sizes = [5] + [1] * 300 + [7]  # a prefill, decode steps past the first room, a chunk
    buffers = set()
    for n in sizes:
        k, v = _states(gen, 2, 3, n, dtype=dtype)
        want = plain.update(k, v)
        got = growing.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert growing.get_seq_length() == plain.get_seq_length()
        buffers.add(growing._key_buffer.data_ptr())
    assert len(buffers) == 2  # room for 5 + 256, then one growth
    assert growing._key_buffer.shape[-2] >= 313
    assert got[0].data_ptr() == growing._key_buffer.data_ptr()  # a view, not a copy


def test_keys_and_values_of_different_head_sizes():
    """Multi-head latent attention caches keys wider than values."""
    gen = torch.Generator().manual_seed(4)
    plain, growing = DynamicLayer(), GrowingLayer()
    for n in (4, 1, 1):
        k, v = torch.randn(1, 2, n, 24, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
        want, got = plain.update(k, v), growing.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_a_layer_whose_tensors_were_replaced_takes_them_into_new_room():
    gen = torch.Generator().manual_seed(1)
    plain, growing = DynamicLayer(), GrowingLayer()
    for n in (6, 1, 1):
        k, v = _states(gen, 3, 2, n)
        plain.update(k, v)
        growing.update(k, v)
    rows = torch.tensor([2, 0])
    for layer in (plain, growing):
        layer.batch_select_indices(rows)  # what the server does when a row leaves
        layer.crop(-1)
    for n in (1, 2):
        k, v = _states(gen, 2, 2, n)
        want, got = plain.update(k, v), growing.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    growing.reset()
    k, v = _states(gen, 1, 2, 3)
    assert torch.equal(growing.update(k, v)[0], k) and growing.get_seq_length() == 3


def test_grow_in_place_keeps_the_cached_keys_and_other_layer_kinds():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    gen = torch.Generator().manual_seed(2)
    cache = DynamicCache()
    k, v = _states(gen, 1, 2, 4)
    cache.update(k, v, 0)
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=8))
    grow_in_place(cache)
    assert type(cache.layers[0]) is GrowingLayer and type(cache.layers[1]) is DynamicSlidingWindowLayer
    k2, v2 = _states(gen, 1, 2, 1)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k, k2], dim=-2)) and torch.equal(values, torch.cat([v, v2], dim=-2))
    cache.update(k2, v2, 2)  # a layer appended later is a growing one too
    assert type(cache.layers[2]) is GrowingLayer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_attention_reads_views_of_a_larger_buffer(dtype):
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D, cap = 2, 4, 2, 9, 16, 20
    kbuf, vbuf = (torch.randn(B, Hkv, cap, D, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(B, Hq * D, generator=gen).to(dtype)
    got, want = torch.empty(B, Hq * D, dtype=dtype), torch.empty(B, Hq * D, dtype=dtype)
    k, v = kbuf[:, :, :S], vbuf[:, :, :S]
    assert not k.is_contiguous()
    _core.cpu_attention(q, k, v, Hq, 0.25, got)
    _core.cpu_attention(q, k.contiguous(), v.contiguous(), Hq, 0.25, want)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="last two dimensions contiguous"):
        _core.cpu_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, Hq, 0.25, got)


def test_a_cpu_engine_decodes_into_growing_layers_with_the_same_tokens(mixtral_folder, monkeypatch):
    import pregated.kv_cache as kv_cache

    prompt = list(range(5, 30))
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        seen = []
        grow = kv_cache.grow_in_place
        monkeypatch.setattr(kv_cache, "grow_in_place", lambda cache: (seen.append(cache), grow(cache)))
        out = eng.generate(prompt, max_new_tokens=300)  # past the first room of 256 keys
        assert seen and all(type(layer) is GrowingLayer for layer in seen[0].layers)
        monkeypatch.setattr(kv_cache, "grow_in_place", lambda cache: None)
        assert eng.generate(prompt, max_new_tokens=300).token_ids == out.token_ids
        batch = [prompt, prompt[:9]]  # padded: transformers' attention over the views
        grown = eng.generate(batch, max_new_tokens=40)
        monkeypatch.setattr(kv_cache, "grow_in_place", grow)
        assert [r.token_ids for r in eng.generate(batch, max_new_tokens=40)] == [r.token_ids for r in grown]
