"""Checkpoints that ship integer weights already packed: GPTQ and AWQ (`qweight`, `qzeros`,
`scales`) and compressed-tensors' pack-quantized format (`weight_packed`, `weight_scale`,
`weight_zero_point`). Each such linear layer is unpacked into the expert store's own terms,
codes [out, in] in 0 .. 2^bits - 1 with an fp16 scale and zero per group along the input, so
that W = (codes - zero) * scale holds exactly as the checkpoint defines it: experts go into the
store packed, with no dequantize-and-quantize-again round trip.

The formats, as their writers define them:
- GPTQ: qweight int32 [in * bits / 32, out], codes packed along the input (code i of a word in
  bits i*bits..), qzeros int32 [groups, out * bits / 32] packed along the output, scales
  [groups, out], g_idx [in] (act-order when it is not i // group_size). Version 1 checkpoints
  (checkpoint_format "gptq", the default) store each zero minus one; "gptq_v2" stores it as is.
- AWQ (version "gemm"): qweight int32 [in, out * bits / 32] and qzeros [groups, out * bits / 32],
  both packed along the output in the order 0, 2, 4, 6, 1, 3, 5, 7; scales [groups, out].
- compressed-tensors pack-quantized: weight_packed int32 [out, ceil(in * bits / 32)] packed along
  the input, values stored as signed + 2^(bits-1); weight_scale [out, groups]; weight_zero_point
  (asymmetric only) [ceil(out * bits / 32), groups] packed along the output, same offset;
  weight_shape [2].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (8, 4, 2)  # 32 / bits codes a word; int3 words (GPTQ's) straddle int32s
SUPPORTED_GROUPS = (32, 64, 128)
AWQ_UNDO_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # natural column k of 8 sits at packed position UNDO[k]

# per format: the suffix of its data tensor, the suffixes of its companions (required, optional)
TENSORS = {
    "gptq": (".qweight", (".qzeros", ".scales"), (".g_idx",)),
    "awq": (".qweight", (".qzeros", ".scales"), ()),
    "compressed-tensors": (".weight_packed", (".weight_scale", ".weight_shape"),
                           (".weight_zero_point", ".weight_g_idx")),
}


class PackedFormatError(ValueError):
    pass


@dataclass(frozen=True)
class PackedFormat:
    method: str           # gptq, awq, compressed-tensors
    bits: int
    group_size: int
    symmetric: bool       # compressed-tensors: no zero-point tensors
    zero_offset: int = 0  # added to stored zeros (GPTQ v1: 1)

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def _refuse(method: str, what: str) -> PackedFormatError:
    return PackedFormatError(
        f"this {method} checkpoint {what}; pregated loads packed {method} experts with "
        f"{'/'.join(map(str, SUPPORTED_BITS))} bits and groups of {'/'.join(map(str, SUPPORTED_GROUPS))} "
        "along the input: dequantize it first (transformers' dequantize()) and save it again")


def _check(method: str, bits, group_size) -> None:
    if bits not in SUPPORTED_BITS:
        raise _refuse(method, f"has {bits}-bit weights")
    if group_size not in SUPPORTED_GROUPS:
        what = "quantizes whole rows (group_size -1)" if group_size in (-1, None) else f"has groups of {group_size}"
        raise _refuse(method, what)


def packed_format(q: dict) -> PackedFormat | None:
    """A config's quantization_config -> its packed integer format, None when it is not one of
    GPTQ, AWQ or compressed-tensors; PackedFormatError naming what is not supported."""
    method = q.get("quant_method")
    if method == "gptq":
        bits, gs = q.get("bits"), q.get("group_size")
        _check(method, bits, gs)
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(method, f"uses checkpoint_format {fmt!r} (pregated reads gptq and gptq_v2)")
        return PackedFormat(method, bits, gs, symmetric=False, zero_offset=1 if fmt == "gptq" else 0)
    if method == "awq":
        bits, gs = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
        _check(method, bits, gs)
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(method, f"is packed for AWQ's {version!r} kernels (pregated reads version 'gemm')")
        if q.get("zero_point", True) is False:
            raise _refuse(method, "has no zero points")
        return PackedFormat(method, bits, gs, symmetric=False)
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        formats = {g.get("format") or q.get("format") for g in groups.values()}
        if not weights or formats != {"pack-quantized"}:
            raise _refuse(method, f"is in format {', '.join(sorted(map(str, formats))) or q.get('format')!r} "
                                  "(pregated reads pack-quantized)")
        keys = ("num_bits", "type", "symmetric", "strategy", "group_size")
        first = {k: weights[0].get(k) for k in keys}
        if any({k: w.get(k) for k in keys} != first for w in weights[1:]):
            raise _refuse(method, "quantizes different layers differently")
        if first["type"] != "int" or first["strategy"] != "group":
            raise _refuse(method, f"has {first['type']} weights with strategy {first['strategy']!r} "
                                  "(pregated reads int weights with strategy 'group')")
        _check(method, first["num_bits"], first["group_size"])
        return PackedFormat(method, first["num_bits"], first["group_size"], symmetric=bool(first["symmetric"]))
    return None


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their codes (low bits first), the packed dimension `dim` grown by 32 / bits."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32)
    if dim == 0:
        codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(w.shape[0] * per, w.shape[1])
    codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], w.shape[1] * per)


def unpack(fmt: PackedFormat, t: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One linear layer's stored tensors (by suffix) -> (codes uint8 [out, in], scale fp16
    [out, groups], zero fp16 [out, groups])."""
    bits, gs = fmt.bits, fmt.group_size
    if fmt.method == "gptq":
        codes = _unpack_words(t[".qweight"], bits, dim=0).t()
        out = t[".qweight"].shape[1]
        zero = _unpack_words(t[".qzeros"], bits, dim=1)[:, :out].t() + fmt.zero_offset
        scale = t[".scales"].t()
        g_idx = t.get(".g_idx")
        if g_idx is not None:
            cols = g_idx.numel()  # the inputs; the last word may be padded
            if not 0 <= codes.shape[1] - cols < 32 // bits:
                raise PackedFormatError(f"'{name}.g_idx' has {cols} entries for {codes.shape[1]} packed inputs")
            codes = codes[:, :cols]
            if not torch.equal(g_idx.long(), torch.arange(cols) // gs):
                raise _refuse(fmt.method, f"reorders its inputs (act-order / desc_act, '{name}.g_idx')")
    elif fmt.method == "awq":
        undo = torch.tensor(AWQ_UNDO_ORDER)

        def natural(words):
            c = _unpack_words(words, bits, dim=1)
            return c.view(c.shape[0], -1, 8)[:, :, undo].reshape(c.shape)

        codes = natural(t[".qweight"]).t()
        zero = natural(t[".qzeros"]).t()
        scale = t[".scales"].t()
    else:
        out, cols = (int(v) for v in t[".weight_shape"].tolist())
        codes = _unpack_words(t[".weight_packed"], bits, dim=1)[:, :cols]
        scale = t[".weight_scale"]
        zp = t.get(".weight_zero_point")
        if zp is None or fmt.symmetric:
            zero = torch.full(scale.shape, float(1 << (bits - 1)))
        else:
            zero = _unpack_words(zp, bits, dim=0)[:out]
        g_idx = t.get(".weight_g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(cols) // gs):
            raise _refuse(fmt.method, f"reorders its inputs (actorder 'group', '{name}.weight_g_idx')")
    out, cols = codes.shape
    groups = -(-cols // gs)
    if tuple(scale.shape) != (out, groups) or tuple(zero.shape) != (out, groups):
        raise PackedFormatError(
            f"'{name}' unpacks to {out} x {cols} weights with scales {list(scale.shape)} and zeros "
            f"{list(zero.shape)}, expected [{out}, {groups}] for groups of {gs}: the checkpoint does not "
            "match its quantization_config")
    # fp16 scales, the store's: bf16 and fp16 values in fp16's normal range convert exactly
    return codes.to(torch.uint8).contiguous(), scale.to(torch.float16).contiguous(), zero.to(torch.float16).contiguous()


def shape_of(fmt: PackedFormat, shapes: dict[str, tuple[int, ...]], read) -> tuple[int, int]:
    """[out, in] of a packed linear layer from its stored tensors' shapes (`read(suffix)` for
    compressed-tensors' weight_shape)."""
    if fmt.method == "gptq":
        rows, out = shapes[".qweight"]
        cols = shapes[".g_idx"][0] if ".g_idx" in shapes else rows * 32 // fmt.bits
        return out, cols
    if fmt.method == "awq":
        cols, words = shapes[".qweight"]
        return words * 32 // fmt.bits, cols
    out, cols = (int(v) for v in read(".weight_shape").tolist())
    return out, cols
