"""Quantized experts (int8, int4, int3, int2; groups of 32, 64, 128 along the input dimension):
quantize -> dequantize within the format's bound, HQQ better than round-to-nearest, and the
runtime's kernels against a plain PyTorch "dequantize, then matmul" reference."""

import pytest
import torch

import pregated
from moe_reference import moe_reference, parts_of, random_experts, random_routing, relative_error
from pregated.quantize import BITS, QuantSpec, dequantize, pack, quantize, unpack

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The CPU kernel paths: above "avx2" the int8-activation kernels take vpdpbusd where the CPU has VNNI.
ISAS = ["amx", "avx512bf16", "avx512", "avx2", "portable"]


@pytest.mark.parametrize("fmt", list(BITS))
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("cols", [128, 200, 37])  # whole groups, a short last group, less than a group
def test_round_trip_within_the_format_bound(fmt, group, cols):
    spec = QuantSpec(BITS[fmt], group)
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(cols))
    codes, scale, zero = quantize(w, spec)
    assert int(codes.max()) < 2 ** spec.bits and scale.dtype == torch.float16 and scale.shape == (24, spec.groups(cols))
    packed = pack(codes, spec.bits)
    assert packed.shape == (24, spec.row_bytes(cols)) and torch.equal(unpack(packed, spec.bits, cols), codes)
    err = (w - dequantize(codes, scale, zero, group)).abs()
    half_step = scale.float().repeat_interleave(group, 1)[:, :cols] / 2
    assert (err <= half_step * 1.02 + 2e-3 * w.abs()).all(), f"{fmt} g{group}: error beyond half a step"


@pytest.mark.parametrize("fmt", list(BITS))
def test_hqq_lowers_the_reconstruction_error(fmt):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errs = {}
    for method in ("rtn", "hqq"):
        codes, scale, zero = quantize(w, QuantSpec(BITS[fmt], 64, method))
        errs[method] = float(((w - dequantize(codes, scale, zero, 64)) ** 2).mean())
    assert errs["hqq"] < errs["rtn"], errs


def quantized_runtime(weights, ffn, dtype, fmt, group, device="cpu", slots=None):
    """A runtime holding `weights` quantized; returns it and the dequantized weights (the reference)."""
    spec = QuantSpec(BITS[fmt], group)
    layers, experts = len(weights), len(weights[0])
    inter, hidden = weights[0][0][parts_of(ffn)[0]].shape
    has_bias = any(p.endswith("_bias") for p in weights[0][0])
    dname = str(dtype).replace("torch.", "")
    one = pregated.expert_bytes(hidden, inter, ffn, dname, has_bias, fmt, group)
    rt = pregated.Runtime(layers, experts, hidden, inter, ffn=ffn, dtype=dname, device=device, has_bias=has_bias,
                          expert_format=fmt, group_size=group, expert_memory=None if slots is None else slots * one)
    deq = []
    for l, layer in enumerate(weights):
        deq.append([])
        for e, parts in enumerate(layer):
            d = {}
            for name, w in parts.items():
                if name.endswith("_bias"):  # biases stay in the model's dtype
                    rt.set_expert(l, e, name, w.to(dtype))
                    d[name] = w.to(dtype).float()
                    continue
                codes, scale, zero = quantize(w.float(), spec)
                rt.set_expert(l, e, name, pack(codes, spec.bits))
                rt.set_expert(l, e, f"{name}.scale", scale)
                rt.set_expert(l, e, f"{name}.zero", zero)
                d[name] = dequantize(codes, scale, zero, group)
            deq[-1].append(d)
    return rt, deq


# bf16 activations are rounded between the GEMMs; int2's coarse codes add nothing to that
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The CPU's AVX2 decode kernel for int8/int4/int2 rounds activations to int8 per group (about
# 0.5% per GEMM; checked exactly against the same rounding in test_cpu_gemm_kernels_...).
ROUNDED_TOL = 3e-2


def tolerance(dtype, fmt: str, device: str, isa: str | None = None) -> float:
    from pregated import _core

    rounded = device == "cpu" and (isa or _core.cpu_kernel_isa()) != "portable"
    return max(TOL[dtype], ROUNDED_TOL) if rounded else TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,group", [("int8", 64), ("int4", 32), ("int4", 128), ("int3", 64), ("int2", 64)])
def test_quantized_forward_against_dequantize_then_matmul(device, dtype, fmt, group):
    H, I, E = 72, 40, 8  # not multiples of 64: short last groups
    weights = random_experts(2, E, H, I, "gated_silu", torch.float32, seed=7)
    rt, deq = quantized_runtime(weights, "gated_silu", dtype, fmt, group, device=device, slots=8)
    for T in (1, 3, 8, 64, 512):
        for K in (1, 2, 8):
            x = torch.randn(T, H).to(dtype)
            ids, w = random_routing(T, K, E, seed=T + K)
            out = rt.forward(1, x.to(device), ids, w)
            err = relative_error(out, moe_reference(deq[1], x, ids, w, "gated_silu"))
            assert err < tolerance(dtype, fmt, device), f"T={T} K={K}: {err:.2e}"
    rt.check()
    rt.close()


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("int3", 32)])
def test_bf16_prefill_with_quantized_experts(fmt, group):
    """More than 8 rows of a bf16 model: with AMX, int8/int4 weights dequantized to bf16 and run on
    the tiles (k whole groups and whole 32s: gate/up here; the down GEMM's k = 96 takes it only
    where 96 is whole groups), else dequantized to fp32 for sgemm; against dequantize-then-matmul
    in float64, on the kernels this CPU chose."""
    H, I, E = 128, 96, 4
    weights = random_experts(1, E, H, I, "gated_silu", torch.float32, seed=group + len(fmt))
    rt, deq = quantized_runtime(weights, "gated_silu", torch.bfloat16, fmt, group, slots=E)
    for T in (9, 40, 100):
        x = torch.randn(T, H).to(torch.bfloat16)
        ids, w = random_routing(T, 2, E, seed=T)
        out = rt.forward(0, x, ids, w)
        assert not out.isnan().any()
        err = relative_error(out, moe_reference(deq[0], x, ids, w, "gated_silu"))
        assert err < TOL[torch.bfloat16], f"{fmt} group {group} T={T}: {err:.2e}"
    rt.check()
    rt.close()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(BITS))
def test_cpu_decode_kernels_for_every_format(isa, fmt):
    """T <= 8 uses the few-row kernels: each path this CPU can run, K up to 8, with biases."""
    from pregated import _core

    best = _core.cpu_kernel_isa()
    if not _core._force_cpu_kernel(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {best})")
    try:
        weights = random_experts(1, 8, 80, 48, "gated_swiglu_oai", torch.float32, seed=3, has_bias=True)
        rt, deq = quantized_runtime(weights, "gated_swiglu_oai", torch.float32, fmt, 32)
        for T in range(1, 9):
            for K in (1, 2, 8):
                x = torch.randn(T, 80)
                ids, w = random_routing(T, K, 8, seed=T * 10 + K)
                err = relative_error(rt.forward(0, x, ids, w), moe_reference(deq[0], x, ids, w, "gated_swiglu_oai"))
                assert err < tolerance(torch.float32, fmt, "cpu", isa), f"{isa} {fmt} T={T} K={K}: {err:.2e}"
        rt.close()
    finally:
        _core._force_cpu_kernel(best)


def round_activations(a: torch.Tensor, group: int) -> torch.Tensor:
    """A rounded to int8 per row and group (scale = the group's largest |a| / 127), back in
    float32: what the AVX2 decode kernel for int8/int4/int2 weights multiplies."""
    m, k = a.shape
    out = torch.empty_like(a)
    for c0 in range(0, k, group):
        g = a[:, c0:c0 + group]
        amax = g.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        out[:, c0:c0 + group] = (g * inv).round().clamp(-127, 127) * (amax / 127.0)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(BITS))
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cpu_gemm_kernels_against_dequantize_then_matmul(isa, fmt, group):
    """Each CPU kernel on its own: up to 8 rows the decode kernels (activations rounded to int8
    per group, compared with the same rounding done in PyTorch: vpdpbusd where the CPU has VNNI
    and a path above "avx2" is chosen, vpmaddubsw on "avx2"; portable: fp32 activations), above
    8 rows dequantized tiles + sgemm.
    k not a multiple of the group or of the kernel's 32-byte chunk, float64 references."""
    from pregated import _core

    best = _core.cpu_kernel_isa()
    if not _core._force_cpu_kernel(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {best})")
    try:
        spec = QuantSpec(BITS[fmt], group)
        torch.manual_seed(group + spec.bits)
        for k in (37, 200, 256, 320, 384):
            n = 45
            codes, scale, zero = quantize(torch.randn(n, k), spec)
            w = dequantize(codes, scale, zero, group).double()
            packed = pack(codes, spec.bits)
            for m in (1, 2, 3, 4, 5, 8, 9, 64):
                a = torch.randn(m, k) * torch.linspace(0.1, 3, k)  # groups of different ranges
                out = torch.zeros(m, n)
                _core._quantized_gemm(a, packed, scale, zero, spec.bits, group, out)
                rounded = m <= 8 and isa != "portable"
                ref = (round_activations(a, group) if rounded else a).double() @ w.T
                err = float((out.double() - ref).norm() / ref.norm())
                assert err < 1e-5, f"{isa} {fmt} group {group} k={k} m={m}: {err:.2e}"
                if rounded:  # and the rounding stays small against fp32 activations
                    exact = a.double() @ w.T
                    assert float((out.double() - exact).norm() / exact.norm()) < 2e-2
    finally:
        _core._force_cpu_kernel(best)


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_bf16_prefill_gemm_of_quantized_weights(isa, fmt):
    """A bf16 model's prefill rows (more than 8) against int8 / int4 weights: on AVX-512 BF16
    without AMX the dequantized tiles go through bf16_pairs (vdpbf16ps), elsewhere dequantized
    fp32 tiles and sgemm; against dequantize-then-matmul in float64 (bf16 rounding of A and C)."""
    from pregated import _core

    best = _core.cpu_kernel_isa()
    if not _core._force_cpu_kernel(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {best})")
    try:
        spec = QuantSpec(BITS[fmt], 64)
        torch.manual_seed(spec.bits)
        for k, n in ((256, 45), (384, 150)):
            codes, scale, zero = quantize(torch.randn(n, k), spec)
            w = dequantize(codes, scale, zero, 64).double()
            packed = pack(codes, spec.bits)
            for m in (9, 64, 100):
                a = (torch.randn(m, k) * torch.linspace(0.1, 3, k)).to(torch.bfloat16)
                out = torch.zeros(m, n, dtype=torch.bfloat16)
                _core._quantized_gemm(a, packed, scale, zero, spec.bits, 64, out)
                ref = a.double() @ w.T
                err = float((out.double() - ref).norm() / ref.norm())
                assert err < 1e-2, f"{isa} {fmt} k={k} m={m}: {err:.2e}"
    finally:
        _core._force_cpu_kernel(best)


def test_packed_bytes_and_clear_errors():
    bf16 = pregated.expert_bytes(512, 1536, "gated_silu", "bfloat16")
    for fmt, bits in BITS.items():
        packed = pregated.expert_bytes(512, 1536, "gated_silu", "bfloat16", False, fmt, 64)
        assert packed / bf16 == pytest.approx((bits + 0.5) / 16, rel=0.02)  # fp16 scale + zero per 64
    with pytest.raises(ValueError, match="group size of 32, 64 or 128, got 48"):
        pregated.Runtime(1, 2, 64, 32, dtype="float32", expert_format="int4", group_size=48)
    with pytest.raises(ValueError, match="unknown expert weight format 'int5'"):
        pregated.Runtime(1, 2, 64, 32, dtype="float32", expert_format="int5")
    rt = pregated.Runtime(1, 2, 64, 32, dtype="float32", expert_format="int4", group_size=32)
    with pytest.raises(ValueError, match=r"weight 'gate' must be torch.uint8"):
        rt.set_expert(0, 0, "gate", torch.zeros(32, 64))
    with pytest.raises(ValueError, match=r"weight 'gate.scale' must have shape \[32, 2\] \(rows, groups\)"):
        rt.set_expert(0, 0, "gate.scale", torch.zeros(32, 3, dtype=torch.float16))
    rt.close()
