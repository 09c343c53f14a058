"""Checkpoints that ship packed integer weights (GPTQ, AWQ, compressed-tensors pack-quantized)
load their experts packed, with no second rounding: the expert store holds the checkpoint's own
codes, and the logits equal transformers' on the same weights dequantized. Dense layers the
checkpoint quantized are dequantized into the model's dtype. Formats pregated cannot keep packed
are refused with what to do.

The checkpoints are written here the way each format's writer packs them (GPTQ: codes along the
input, zeros along the output, version 1 zeros stored minus one; AWQ: along the output in the
order 0 2 4 6 1 3 5 7; compressed-tensors: signed codes + 2^(bits-1) along the input, zero points
along the output), one loop per packed position, independent of pregated's unpacking."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pregated.engine import Engine
from pregated.quantize import pack
from test_quantized_checkpoints import rewrite, tensors_of
from tiny_models import reference_model

PROMPT = list(range(5, 40))
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packs non-negative codes (< 2^bits) into int32 words along `dim`: the code at position
    w * per + i of that dimension goes to bits i*bits.. of word w (zero-padded)."""
    per = 32 // bits
    v = values.long() if dim == 1 else values.long().t()
    pad = -v.shape[1] % per
    v = torch.nn.functional.pad(v, (0, pad))
    out = torch.zeros(v.shape[0], v.shape[1] // per, dtype=torch.long)
    for w in range(out.shape[1]):
        for i in range(per):
            out[:, w] |= v[:, w * per + i] << (bits * i)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)
    return out if dim == 1 else out.t().contiguous()


def quantized_linear(w: torch.Tensor, bits: int, gs: int, symmetric: bool, scale_dtype=torch.float16):
    """w [out, in] -> (codes [out, in] in 0..2^bits-1, integer zeros [out, groups], fp16 scales
    [out, groups], the dequantized weight (codes - zero) * scale)."""
    out, cols = w.shape
    groups = -(-cols // gs)
    g = torch.nn.functional.pad(w.float(), (0, groups * gs - cols)).view(out, groups, gs)
    top = 2 ** bits - 1
    if symmetric:
        zero = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.long)
        scale = (g.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp_min(1e-4).to(scale_dtype).half()
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / top).clamp_min(1e-4).to(scale_dtype).half()
        zero = (-lo / scale.float()).round().clamp(1, top).long()  # GPTQ v1 stores zero - 1: no zero of 0
    codes = (g / scale.float()[..., None] + zero[..., None]).round().clamp(0, top).long().view(out, -1)[:, :cols]
    full = lambda t: t.repeat_interleave(gs, 1)[:, :cols]  # noqa: E731
    return codes, zero, scale, (codes - full(zero)).float() * full(scale.float())


def gptq(prefix, codes, zero, scale, bits, gs, v1=True):
    cols = codes.shape[1]
    assert not v1 or zero.min() >= 1, "GPTQ v1 cannot store a zero of 0"
    return {prefix + ".qweight": words(codes.t(), bits, dim=0),
            prefix + ".qzeros": words((zero - 1 if v1 else zero).t(), bits, dim=1),
            prefix + ".scales": scale.t().contiguous(),
            prefix + ".g_idx": (torch.arange(cols) // gs).to(torch.int32)}


def awq(prefix, codes, zero, scale, bits, gs):
    def reorder(t):  # [in, out] -> packed position i of each 8 holds column AWQ_ORDER[i]
        idx = torch.tensor([c * 8 + o for c in range(t.shape[1] // 8) for o in AWQ_ORDER])
        return t[:, idx]
    return {prefix + ".qweight": words(reorder(codes.t()), bits, dim=1),
            prefix + ".qzeros": words(reorder(zero.t()), bits, dim=1),
            prefix + ".scales": scale.t().contiguous()}


def compressed(prefix, codes, zero, scale, bits, gs, symmetric=True):
    # stored as signed value + 2^(bits-1): the unsigned code itself when zero is 2^(bits-1)
    t = {prefix + ".weight_packed": words(codes, bits, dim=1),
         prefix + ".weight_scale": scale.to(torch.bfloat16),
         prefix + ".weight_shape": torch.tensor(list(codes.shape), dtype=torch.int32)}
    if not symmetric:
        t[prefix + ".weight_zero_point"] = words(zero, bits, dim=0)
    return t


def config_of(fmt, bits, gs, symmetric):
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": False, "sym": symmetric,
                "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": gs, "zero_point": True, "version": "gemm"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": gs,
                "actorder": None}}}, "ignore": ["lm_head"]}


def packed_checkpoint(src, dst, fmt, bits=4, gs=32, symmetric=None, dense=True):
    """(folder of the packed checkpoint, folder of the same weights dequantized, codes by name)."""
    if symmetric is None:  # as each format's usual writer: GPTQ and compressed-tensors symmetric, AWQ not
        symmetric = fmt != "awq"
    quant, deq, codes_of = {}, {}, {}
    for name, t in tensors_of(src).items():
        linear = name.endswith(".weight") and t.dim() == 2 and (
            ".experts." in name or (dense and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")))
        if not linear:
            quant[name] = deq[name] = t
            continue
        prefix = name[:-len(".weight")]
        codes, zero, scale, w = quantized_linear(t, bits, gs, symmetric,  # compressed-tensors: the model's dtype
                                                 torch.bfloat16 if fmt == "compressed-tensors" else torch.float16)
        writer = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed}[fmt]
        quant.update(writer(prefix, codes, zero, scale, bits, gs, **({"symmetric": symmetric} if fmt == "compressed-tensors" else {})))
        deq[name], codes_of[name] = w, codes
    folder = rewrite(src, dst / fmt, quant, config_of(fmt, bits, gs, symmetric))
    return folder, rewrite(src, dst / "deq", deq), codes_of


CASES = [("gptq", "mixtral"), ("awq", "qwen3_moe"), ("compressed-tensors", "olmoe")]


@pytest.mark.parametrize("fmt,family", CASES)
def test_packed_experts_load_as_shipped(fmt, family, checkpoint_factory, tmp_path, kernels):
    """The store holds the checkpoint's codes bit for bit; with fp32 activations (portable
    kernels) the logits equal transformers' on the dequantized weights to 1e-4."""
    kernels("portable")
    src = checkpoint_factory(family, hidden_size=96)  # 96 = 3 groups of 32: whole groups, 12 words of int4
    folder, deq, codes_of = packed_checkpoint(src, tmp_path, fmt)
    with torch.no_grad():
        want = reference_model(deq)(torch.tensor([PROMPT])).logits[0].float()
    with Engine(folder, device="cpu", dtype="float32", quiet=True) as eng:
        assert (eng.cfg.expert_format, eng.cfg.group_size) == ("int4", 32)
        got = eng.logits(PROMPT)
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-4
        stored = eng.runtime.host_expert(0, 1)
        assert len(stored) == eng.cfg.expert_bytes()
        mine = [n for n in codes_of if ".experts.1." in n and f"layers.{eng.blocks[0].layer}." in n]
        assert len(mine) == 3
        for name in mine:  # every projection's codes, packed the store's way, are in the expert's bytes
            assert pack(codes_of[name].to(torch.uint8), 4).numpy().tobytes() in stored, name
        eng.runtime.check()


def test_packed_experts_with_the_best_kernels_and_asymmetric_zero_points(checkpoint_factory, tmp_path, kernels):
    """compressed-tensors with packed zero points (asymmetric), GPTQ v2 zeros, 8 and 2 bits,
    on the CPU's best kernels (activations rounded to int8 per group: 2e-2)."""
    kernels("best")
    src = checkpoint_factory("qwen3_moe", hidden_size=96)
    for fmt, bits, sym in [("compressed-tensors", 4, False), ("gptq", 8, False), ("gptq", 2, True)]:
        folder, deq, _ = packed_checkpoint(src, tmp_path / f"{fmt}-{bits}", fmt, bits=bits, symmetric=sym)
        with torch.no_grad():
            want = reference_model(deq)(torch.tensor([PROMPT])).logits[0].float()
        with Engine(folder, device="cpu", dtype="float32", quiet=True) as eng:
            one = eng.cfg.expert_bytes()
        with Engine(folder, device="cpu", dtype="float32", quiet=True, policy="on-demand",
                    expert_memory=4 * one) as eng:
            assert eng.cfg.expert_format == f"int{bits}"
            got = eng.logits(PROMPT)
            assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 2e-2, (fmt, bits)
            eng.runtime.check()


def test_gptq_v2_zeros_are_stored_as_they_are(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral", hidden_size=96)
    v1, deq, _ = packed_checkpoint(src, tmp_path / "v1", "gptq")
    tensors = tensors_of(v1)
    for k in [k for k in tensors if k.endswith(".qzeros")]:  # stored zero + 1, nibble by nibble (no carries: zeros < 15)
        tensors[k] = tensors[k] + sum(1 << (4 * i) for i in range(8))
    cfg = json.load(open(os.path.join(v1, "config.json")))["quantization_config"]
    v2 = rewrite(src, tmp_path / "v2", tensors, dict(cfg, checkpoint_format="gptq_v2"))
    with Engine(v1, device="cpu", dtype="float32", quiet=True) as a, \
            Engine(v2, device="cpu", dtype="float32", quiet=True) as b:
        assert torch.equal(a.logits(PROMPT), b.logits(PROMPT))


def test_packed_formats_pregated_cannot_keep_are_refused(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral", hidden_size=96)
    folder, _, _ = packed_checkpoint(src, tmp_path, "gptq")
    tensors = tensors_of(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]

    def refused(name, quantization, match, tensors=tensors, **kw):
        bad = rewrite(src, tmp_path / name, tensors, quantization)
        with pytest.raises(ValueError, match=match):
            Engine(bad, device="cpu", quiet=True, **kw)

    refused("g-1", dict(cfg, group_size=-1), r"quantizes whole rows \(group_size -1\).*dequantize it first")
    refused("g256", dict(cfg, group_size=256), r"has groups of 256; pregated loads packed gptq experts with 8/4/2 "
                                               "bits and groups of 32/64/128")
    refused("int3", dict(cfg, bits=3), "has 3-bit weights")
    refused("marlin", dict(cfg, checkpoint_format="marlin"), "checkpoint_format 'marlin'")
    refused("gemv", {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"},
            "packed for AWQ's 'gemv' kernels")
    ct = config_of("compressed-tensors", 4, 32, True)
    refused("channel", dict(ct, config_groups={"g": {"weights": dict(
        ct["config_groups"]["group_0"]["weights"], strategy="channel")}}), "strategy 'channel'")
    refused("fp8", dict(ct, format="float-quantized", config_groups={"g": {"weights": {"type": "float"}}}),
            "pregated reads pack-quantized")
    act = dict(tensors)
    g_idx = next(k for k in act if k.endswith(".g_idx") and ".experts." in k)
    act[g_idx] = act[g_idx].flip(0).contiguous()
    refused("act-order", dict(cfg, desc_act=True), r"reorders its inputs \(act-order", tensors=act)
    # asking for another format would round the codes a second time
    refused("asked", cfg, r"ships its experts packed as int4 in groups of 32 \(gptq\).*expert_dtype='int8'",
            expert_dtype="int8")
    refused("asked-group", cfg, "group_size=64", group_size=64)


def test_info_shows_packed_experts(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral", hidden_size=96)
    folder, _, _ = packed_checkpoint(src, tmp_path, "awq")
    run = subprocess.run([sys.executable, "-m", "pregated", "info", "--model", folder], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "(int4, group 32, packed in the checkpoint (awq))" in run.stdout
