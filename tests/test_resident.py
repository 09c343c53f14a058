"""The resident decode path (every expert pinned, as under gpu-only): experts found through the
device slot table, ids and weights never leave the device. Against the PyTorch reference on
every backend; on the GPU, a decode step asks the host nothing."""

import pytest
import torch

from moe_reference import TOLERANCE, make_runtime, moe_reference, random_experts, random_routing, relative_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pin_all(rt, layers, experts):
    for layer in range(layers):
        for e in range(experts):
            rt.pin(layer, e)
    rt.wait_idle()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ffn,has_bias", [("gated_silu", False), ("gated_swiglu_oai", True), ("relu2", False)])
def test_resident_forward_matches_reference(device, dtype, ffn, has_bias):
    layers, E, H, I = 2, 8, 40, 24
    weights = random_experts(layers, E, H, I, ffn, dtype, seed=2, has_bias=has_bias)
    rt = make_runtime(weights, ffn, dtype, device=device)
    pin_all(rt, layers, E)
    for T in (1, 3, 8):
        for K in (1, 2, 8):
            x = torch.randn(T, H).to(dtype)
            ids, w = random_routing(T, K, E, seed=T * 10 + K)
            out = rt.forward_resident(1, x.to(device), ids.to(device, torch.int32), w.to(device))
            assert out.shape == (T, H) and out.dtype == dtype and out.device.type == device
            err = relative_error(out, moe_reference(weights[1], x, ids, w, ffn))
            assert err < TOLERANCE[dtype], f"T={T} K={K}: {err:.2e}"
    assert rt.stats()["resident_forwards"] == 9
    assert all(s >= 0 for s in rt.slot_table())  # every expert has a ready slot
    rt.check()
    rt.close()


@pytest.mark.parametrize("device", DEVICES)
def test_reserve_resident_grows_the_workspace_ahead(device):
    """What a captured graph relies on: after reserve_resident(rows), blocks up to that many
    (token, expert) rows leave the workspace as it is; a larger one grows it."""
    weights = random_experts(1, 4, 16, 8, "gated_silu", torch.float32, seed=3)
    rt = make_runtime(weights, "gated_silu", torch.float32, device=device)
    pin_all(rt, 1, 4)
    assert rt.stats()["resident_workspace_bytes"] == 0
    reserved = rt.reserve_resident(12)
    assert reserved > 0 and rt.stats()["resident_workspace_bytes"] == reserved
    assert rt.reserve_resident(3) == reserved, "the workspace never shrinks"
    x = torch.randn(6, 16)
    ids, w = random_routing(6, 2, 4, seed=1)
    out = rt.forward_resident(0, x.to(device), ids.to(device, torch.int32), w.to(device))
    assert relative_error(out, moe_reference(weights[0], x, ids, w, "gated_silu")) < TOLERANCE[torch.float32]
    assert rt.stats()["resident_workspace_bytes"] == reserved, "12 rows reserved, 12 used: nothing grew"
    x = torch.randn(7, 16)
    ids, w = random_routing(7, 2, 4, seed=2)
    rt.forward_resident(0, x.to(device), ids.to(device, torch.int32), w.to(device))
    assert rt.stats()["resident_workspace_bytes"] > reserved
    with pytest.raises(ValueError, match="rows must be >= 0, got -1"):
        rt.reserve_resident(-1)
    rt.close()
    with pytest.raises(RuntimeError, match="closed"):
        rt.reserve_resident(4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 64), ("int4", 32), ("int3", 64), ("int2", 128)])
@pytest.mark.parametrize("ffn,has_bias", [("gated_silu", False), ("gated_swiglu_oai", True)])
def test_resident_forward_of_quantized_experts(device, dtype, fmt, group, ffn, has_bias):
    """Quantized experts on the resident path (decode-sized blocks) against dequantize-then-matmul."""
    from test_quantized_experts import quantized_runtime, tolerance

    layers, E, H, I = 2, 8, 128, 64
    weights = random_experts(layers, E, H, I, ffn, torch.float32, seed=4, has_bias=has_bias)
    rt, deq = quantized_runtime(weights, ffn, dtype, fmt, group, device=device)
    pin_all(rt, layers, E)
    for T, K in ((1, 2), (3, 8), (8, 8)):
        x = torch.randn(T, H).to(dtype)
        ids, w = random_routing(T, K, E, seed=T * 10 + K)
        out = rt.forward_resident(1, x.to(device), ids.to(device, torch.int32), w.to(device))
        err = relative_error(out, moe_reference(deq[1], x, ids, w, ffn))
        assert err < tolerance(dtype, fmt, device), f"T={T} K={K}: {err:.2e}"
    assert rt.stats()["resident_forwards"] == 3
    x = torch.randn(9, H).to(dtype)  # 72 rows: more than the resident path takes for quantized experts
    ids, w = random_routing(9, 8, E, seed=5)
    with pytest.raises(ValueError, match="72 .token, expert. rows of .* experts; the resident path takes up to 64"):
        rt.forward_resident(1, x.to(device), ids.to(device, torch.int32), w.to(device))
    rt.check()
    rt.close()


def test_resident_forward_refuses_what_it_cannot_run():
    weights = random_experts(1, 4, 16, 8, "gated_silu", torch.float32, seed=1)
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=3)
    x, ids, w = torch.randn(2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="not every expert of layer 0 is resident"):
        rt.forward_resident(0, x, ids, w)
    with pytest.raises(ValueError, match=r"ids must be torch.int32, got torch.int64"):
        rt.forward_resident(0, x, ids.long(), w)
    with pytest.raises(ValueError, match=r"weights must have shape \[2, 2\]"):
        rt.forward_resident(0, x, ids, w[:1])
    rt.close()


@pytest.mark.gpu
def test_gpu_only_decode_step_asks_the_host_nothing(mixtral_folder):
    """One decode step of a gpu-only engine runs without a device-to-host synchronisation
    (torch's sync debug mode raises on any): the experts resolve on the device."""
    from pregated.engine import Engine

    from conftest import decode_step_without_sync

    with Engine(mixtral_folder, device="cuda", policy="gpu-only", quiet=True) as eng:
        out = decode_step_without_sync(eng, [5, 6, 7, 8, 9, 10])
        assert out.shape[-1] == eng.cfg.vocab_size
        assert eng.stats()["resident_forwards"] >= eng.cfg.num_moe_layers
