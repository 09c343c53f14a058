"""Group-wise quantization of expert weights: int8, int4, int3 and int2 codes with one scale and
one zero per group of `group_size` weights along the input dimension, by round-to-nearest or
refined with HQQ's half-quadratic solver (Badri & Shaji 2023), and the packed layout the runtime
reads.

A weight W [rows, cols] becomes
    codes  [rows, cols]            integers in 0 .. 2^bits - 1, packed little-endian along cols
                                    (int3: 8 codes in 3 bytes), each row padded to whole bytes
    scale  [rows, groups] fp16     groups = ceil(cols / group_size); the last group may be short
    zero   [rows, groups] fp16     a real number (HQQ moves it off the integer grid)
and W ~= (codes - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _core

BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "hqq")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in BITS.values():
            raise ValueError(f"cannot quantize to {self.bits} bits: use int8, int4, int3 or int2")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be rtn or hqq, got {self.method!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of packed codes (rows padded to whole bytes; int3 to 8 codes)."""
        if self.bits == 3:
            return 3 * -(-cols // 8)
        return -(-cols * self.bits // 8)


def _grouped(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> ([rows, groups, g] padded by repeating each row's last value, mask of real
    columns) so a short last group takes its range from its own values."""
    rows, cols = w.shape
    pad = -cols % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    mask = torch.arange(cols + pad, device=w.device) < cols
    return w.view(rows, -1, g), mask.view(-1, g)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec):
    """Round-to-nearest, asymmetric per group -> (codes [rows, cols] uint8, scale, zero [rows, groups] fp32)."""
    rows, cols = w.shape
    wg, _ = _grouped(w.float(), spec.group_size)
    top = 2 ** spec.bits - 1
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / top).clamp_min(1e-8)
    zero = -lo / scale
    codes = (wg / scale[..., None] + zero[..., None]).round().clamp(0, top)
    return codes.view(rows, -1)[:, :cols].to(torch.uint8), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(codes [rows, cols], scale, zero [rows, groups]) -> float32 [rows, cols]."""
    rows, cols = codes.shape
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :cols]
    return (codes.float() - z) * s


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def quantize_hqq(w: torch.Tensor, spec: QuantSpec, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01):
    """HQQ: starting from round-to-nearest, the zeros minimise the lp-norm (p < 1) of the
    reconstruction error by half-quadratic splitting, the scales fixed; the best iterate by
    squared error is kept, so the result is never worse than round-to-nearest on these weights."""
    rows, cols = w.shape
    wg, mask = _grouped(w.float(), spec.group_size)
    top = 2 ** spec.bits - 1
    _, scale, zero = quantize_rtn(w, spec)
    mask = mask.to(wg.dtype)

    def codes_and_error(z):
        q = (wg / scale[..., None] + z[..., None]).round().clamp(0, top)
        r = (q - z[..., None]) * scale[..., None]
        return q, (((wg - r) ** 2) * mask).sum()

    q, best_err = codes_and_error(zero)
    best = (q, zero)
    for _ in range(iters):
        q, _ = codes_and_error(zero)
        r = (q - zero[..., None]) * scale[..., None]
        e = _shrink_lp(wg - r, beta, p)
        zero = ((q - (wg - e) / scale[..., None]) * mask).sum(-1) / mask.sum(-1)
        beta *= kappa
        q, err = codes_and_error(zero)
        if err < best_err:
            best_err, best = err, (q, zero)
    q, zero = best
    return q.view(rows, -1)[:, :cols].to(torch.uint8), scale, zero


def quantize(w: torch.Tensor, spec: QuantSpec):
    """w [rows, cols] -> (codes uint8 [rows, cols], scale fp16, zero fp16 [rows, groups])."""
    codes, scale, zero = (quantize_hqq if spec.method == "hqq" else quantize_rtn)(w, spec)
    scale16 = scale.to(torch.float16)
    zero16 = zero.to(torch.float16)
    # The codes were chosen for the float32 scale and zero; the runtime dequantizes with the
    # fp16 ones, so the codes follow them (a code may move by one where rounding flips).
    top = 2 ** spec.bits - 1
    rows, cols = w.shape
    wg, _ = _grouped(w.float(), spec.group_size)
    codes = (wg / scale16.float()[..., None] + zero16.float()[..., None]).round().clamp(0, top)
    return codes.view(rows, -1)[:, :cols].to(torch.uint8), scale16, zero16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [rows, cols] (< 2^bits) -> packed uint8 [rows, row_bytes], little-endian
    along each row; int3 packs 8 codes in 3 bytes."""
    rows, cols = codes.shape
    per = 8 if bits == 3 else 8 // bits  # codes per packing unit (3 bytes for int3, 1 byte else)
    pad = -cols % per
    c = torch.cat([codes, codes.new_zeros(rows, pad)], dim=1).to(torch.int32) if pad else codes.to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8)
    c = c.view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # one unit's bits
    if bits == 3:
        return torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=-1).view(rows, -1).to(torch.uint8)
    return word.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack: uint8 [rows, row_bytes] -> codes uint8 [rows, cols]."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :cols].clone()
    p = packed.to(torch.int32)
    if bits == 3:
        b = p.view(rows, -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        per = 8
    else:
        word, per = p, 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.view(rows, -1)[:, :cols].to(torch.uint8)


DEFAULT_GROUP_SIZE = _core.DEFAULT_GROUP_SIZE


def expert_quantization(expert_dtype, group_size: int | None = DEFAULT_GROUP_SIZE,
                        method: str = "rtn") -> QuantSpec | None:
    """Engine's expert_dtype / group_size (None: 64) / quantize arguments -> a QuantSpec, or None
    for experts kept in the model's dtype."""
    if expert_dtype is None or expert_dtype in ("dense", "model"):
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if expert_dtype not in BITS:
        raise ValueError(f"expert_dtype {expert_dtype!r} is not supported: use int8, int4, int3 or int2 "
                         "(or None to keep the model's dtype)")
    return QuantSpec(BITS[expert_dtype], group_size, method)


def checkpoint_quantization(fmt, expert_dtype=None, group_size=None, method: str = "rtn") -> QuantSpec:
    """The QuantSpec of experts a checkpoint ships packed (`fmt`, a PackedFormat): they load as
    they are; asking for another format is refused rather than rounded a second time."""
    if expert_dtype in (None, "model", fmt.name) and group_size in (None, fmt.group_size) and method == "rtn":
        return QuantSpec(fmt.bits, fmt.group_size)
    asked = f"expert_dtype={expert_dtype!r}, group_size={group_size!r}, quantize={method!r}"
    raise ValueError(
        f"this checkpoint ships its experts packed as {fmt.name} in groups of {fmt.group_size} ({fmt.method}) and "
        f"pregated loads them as they are; {asked} would round them a second time: leave expert_dtype, "
        f"group_size and quantize unset (or give expert_dtype={fmt.name!r}, group_size={fmt.group_size})")


def resolve_expert_quantization(packed, expert_dtype, group_size, method: str = "rtn") -> QuantSpec | None:
    """The experts' format: the one a checkpoint ships them packed in (`packed`, a PackedFormat
    or None), else the one asked for (None: the model's dtype)."""
    if packed is not None:
        return checkpoint_quantization(packed, expert_dtype, group_size, method)
    return expert_quantization(expert_dtype, group_size, method)


def store_writer(runtime, spec: QuantSpec | None):
    """set_expert(m, e, part, tensor) for loaders: weight parts are quantized and packed on the
    way into the store when `spec` is given; biases (and everything without a spec) go as they are."""
    if spec is None:
        return runtime.set_expert

    def write(m: int, e: int, part: str, w: torch.Tensor) -> None:
        if part.endswith("_bias"):
            runtime.set_expert(m, e, part, w)
            return
        codes, scale, zero = quantize(w.float(), spec)
        runtime.set_expert(m, e, part, pack(codes, spec.bits))
        runtime.set_expert(m, e, f"{part}.scale", scale)
        runtime.set_expert(m, e, f"{part}.zero", zero)

    return write
