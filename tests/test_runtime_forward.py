"""The runtime's MoE block against a plain PyTorch loop, on every backend this machine has."""

import pytest
import torch

from moe_reference import KINDS, TOLERANCE, make_runtime, moe_reference, random_experts, random_routing, relative_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("budget", ["one-slot", "half", "all"])
def test_forward_matches_reference(device, dtype, K, budget):
    layers, E, H, I = 2, 8, 37, 23  # odd sizes on purpose
    weights = random_experts(layers, E, H, I, "gated_silu", dtype, seed=K)
    slots = {"one-slot": 1, "half": E * layers // 2, "all": None}[budget]
    rt = make_runtime(weights, "gated_silu", dtype, slots=slots, device=device)
    for T in (1, 7, 64, 512):
        for layer in range(layers):
            x = torch.randn(T, H).to(dtype)
            ids, w = random_routing(T, K, E, seed=T + layer)
            out = rt.forward(layer, x.to(device), ids, w)
            assert out.shape == (T, H) and out.dtype == dtype and out.device.type == device
            ref = moe_reference(weights[layer], x, ids, w, "gated_silu")
            err = relative_error(out, ref)
            assert err < TOLERANCE[dtype], f"T={T} layer={layer}: relative error {err:.2e}"
    rt.check()
    rt.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("ffn", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_expert_kind(device, ffn, has_bias, dtype):
    weights = random_experts(1, 4, 48, 40, ffn, dtype, seed=3, has_bias=has_bias)
    # a limit small enough that the clamped kinds clamp on these values
    rt = make_runtime(weights, ffn, dtype, slots=2, device=device, alpha=1.5, limit=0.5)
    for T in (1, 33):
        x = (torch.randn(T, 48) * 2).to(dtype)
        ids, w = random_routing(T, 2, 4, seed=T)
        out = rt.forward(0, x.to(device), ids, w)
        ref = moe_reference(weights[0], x, ids, w, ffn, alpha=1.5, limit=0.5)
        assert relative_error(out, ref) < TOLERANCE[dtype], f"T={T}"
    rt.close()


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_decode_kernels_on_every_instruction_set(isa, dtype):
    """The CPU backend's few-row kernels (T <= 8), each path this CPU can run, against PyTorch;
    widths that are not multiples of the vector length on purpose. 96 x 85: the gate and up GEMMs
    (k = 96) take AMX tiles where chosen, with 85 columns (two tiles of 32 and a tail of 5), the down
    GEMM (k = 85) does not; 128 x 160: every GEMM on tiles; T = 17 and 40: rows past one tile."""
    from pregated import _core

    best = _core.cpu_kernel_isa()
    if not _core._force_cpu_kernel(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {best})")
    try:
        for H, I, rows in ((45, 37, range(1, 9)), (96, 85, (1, 3, 8, 17, 40)), (128, 160, (1, 8, 40))):
            weights = random_experts(1, 8, H, I, "gated_silu", dtype, seed=5)
            rt = make_runtime(weights, "gated_silu", dtype)
            for T in rows:
                for K in (1, 2, 8):
                    x = torch.randn(T, H).to(dtype)
                    ids, w = random_routing(T, K, 8, seed=T * 10 + K)
                    err = relative_error(rt.forward(0, x, ids, w), moe_reference(weights[0], x, ids, w, "gated_silu"))
                    assert err < TOLERANCE[dtype], f"{isa} {H}x{I} T={T} K={K}: {err:.2e}"
            rt.close()
    finally:
        _core._force_cpu_kernel(best)


@pytest.mark.parametrize("device", DEVICES)
def test_out_argument_and_aliasing(device):
    weights = random_experts(1, 4, 16, 8, "gated_silu", torch.float32, seed=4)
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=2, device=device)
    x = torch.randn(5, 16)
    ids, w = random_routing(5, 2, 4)
    ref = moe_reference(weights[0], x, ids, w, "gated_silu")
    out = torch.full((5, 16), float("nan"), device=device)
    assert rt.forward(0, x.to(device), ids, w, out=out) is out
    assert relative_error(out, ref) < 1e-5
    xd = x.clone().to(device)
    rt.forward(0, xd, ids, w, out=xd)  # in place: x is read before out is written
    assert relative_error(xd, ref) < 1e-5
    # Zero tokens is a valid, empty block.
    empty = rt.forward(0, torch.zeros(0, 16, device=device), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 16)
    rt.close()


@pytest.mark.parametrize("device", DEVICES)
def test_forward_with_next_layer_prefetch(device):
    weights = random_experts(2, 8, 16, 8, "gated_silu", torch.float32, seed=5)
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=4, device=device)
    x = torch.randn(3, 16)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.full((3, 2), 0.5)
    rt.forward(0, x.to(device), ids, w, next_layer=1, next_experts=[6, 7])
    rt.wait_idle()
    s = rt.stats()
    assert s["layers"][1]["prefetch_issued"] == 2
    out = rt.forward(1, x.to(device), torch.tensor([[6, 7]] * 3), w)
    s = rt.stats()
    assert s["layers"][1]["prefetch_used"] == 2 and s["layers"][1]["expert_misses"] == 0
    assert relative_error(out, moe_reference(weights[1], x, torch.tensor([[6, 7]] * 3), w, "gated_silu")) < 1e-5
    rt.check()
