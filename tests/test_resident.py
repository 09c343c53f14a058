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

    with Engine(mixtral_folder, device="cuda", policy="gpu-only", quiet=True) as eng:
        prompt = [5, 6, 7, 8, 9, 10]
        cache, mask, last, logits = eng._prefill([prompt])
        nxt = logits.argmax(-1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = eng._forward(nxt[:, None], mask, (last + 1)[:, None], cache, torch.ones(1, 1, dtype=torch.bool))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.shape[-1] == eng.cfg.vocab_size
        assert eng.stats()["resident_forwards"] >= eng.cfg.num_moe_layers
