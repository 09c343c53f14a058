"""Reading a Hugging Face safetensors checkpoint (single file or sharded) one tensor, or one
expert slice of a fused tensor, at a time.

Tensors are read with plain file reads into fresh buffers, not through memory maps: mapped
pages a process has touched count in its resident memory, so reading a whole checkpoint through
mmap would show it twice (file pages plus the expert store); read this way, the file's pages
stay in the kernel's page cache and the process holds one copy.
"""

from __future__ import annotations

import difflib
import json
import os
import struct

import torch
from safetensors.torch import save_file

from .packed_checkpoint import TENSORS, PackedFormat, PackedFormatError, packed_format
from .packed_checkpoint import shape_of as packed_shape
from .packed_checkpoint import unpack as unpack_packed
from .quantize import dequantize

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or lacks / misshapes a tensor."""


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file ({why}); it may be truncated or "
                           "corrupt: download or save it again")


class _Shard:
    """One safetensors file: its header, read and checked once."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file = open(path, "rb")
            size = os.fstat(self.file.fileno()).st_size
            head = self.file.read(8)
            if len(head) != 8:
                raise _corrupt(path, f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _corrupt(path, f"a header of {n} bytes in a file of {size}")
            header = json.loads(self.file.read(n))
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _corrupt(path, f"its header is not JSON: {e}") from e
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise _corrupt(path, f"tensor '{name}' has a bad entry: {e}") from e
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or self.base + end > size:
                raise _corrupt(path, f"tensor '{name}' runs past the end of the file or does not fit its shape")
            self.tensors[name] = (dtype, shape, self.base + start, self.base + end)

    def read(self, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        buf = bytearray(nbytes)
        got = os.preadv(self.file.fileno(), [buf], offset) if nbytes else 0
        if got != nbytes:
            raise _corrupt(self.path, f"read {got} of {nbytes} bytes at offset {offset}")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self.file.close()


QUANTIZED_FORMATS = ("fp8", "mxfp4")  # dequantized as read
PACKED_FORMATS = ("gptq", "awq", "compressed-tensors")  # integer codes, kept packed for experts


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 [..., N, K] with per-block scales [..., ceil(N/bn), ceil(K/bk)] -> float32."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [E, N, G, 16] (two FP4 values a byte) and scales [E, N, G] (E8M0) ->
    float32 [E, G*32, N], the layout of GPT-OSS's experts, by transformers' own conversion."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def _quantization(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return q if isinstance(q, dict) else {}


class Checkpoint:
    """Tensors by name. Checkpoints that ship FP8 weights with block scales (`W` +
    `W_scale_inv`, quant_method fp8) or MXFP4 experts (`W_blocks` + `W_scales`, quant_method mxfp4)
    show each such pair as one float32 tensor `W`, dequantized as it is read."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            self._file_of = {name: os.path.join(folder, f) for name, f in weight_map.items()}
            for path in sorted(set(self._file_of.values())):
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path} is listed in {index} but does not exist")
        elif os.path.isfile(single):
            self._file_of = None
        else:
            found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt")))
            raise CheckpointError(
                f"{folder} has no model.safetensors or model.safetensors.index.json"
                + (f" (found: {', '.join(found)}; only safetensors is supported)" if found else ""))
        self._shards: dict[str, _Shard] = {}
        if self._file_of is None:
            self._file_of = {name: single for name in self._open(single).tensors}
        else:
            for path in sorted(set(self._file_of.values())):
                self._open(path)  # fail early on a corrupt shard
        self._quantized: dict[str, tuple[str, str, str]] = {}  # name -> (format, data key, scale key)
        q = _quantization(folder)
        method = q.get("quant_method")
        if method is not None and method not in QUANTIZED_FORMATS + PACKED_FORMATS:
            raise CheckpointError(
                f"{folder} ships weights quantized with '{method}'; pregated reads checkpoints quantized with "
                f"{', '.join(QUANTIZED_FORMATS)} (dequantized at load), {', '.join(PACKED_FORMATS)} (int8/int4/int2 "
                "codes in groups of 32/64/128, loaded packed) or unquantized ones: dequantize it first "
                "(for example with transformers' dequantize()) and save it again")
        self.packed_format: PackedFormat | None = None
        self._packed: dict[str, dict[str, str]] = {}  # shown name X.weight -> {suffix: stored key}
        if method in PACKED_FORMATS:
            try:
                self.packed_format = packed_format(q)
            except PackedFormatError as e:
                raise CheckpointError(f"{folder}: {e}") from None
        block = q.get("weight_block_size")
        self._fp8_block = tuple(block) if block else None
        for name in list(self._file_of):
            if method == "fp8" and name.endswith("_scale_inv") and name[:-10] in self._file_of:
                self._quantized[name[:-10]] = ("fp8", name[:-10], name)
            elif method == "mxfp4" and name.endswith("_blocks") and name[:-7] + "_scales" in self._file_of:
                self._quantized[name[:-7]] = ("mxfp4", name, name[:-7] + "_scales")
        self._files = dict(self._file_of)  # every stored tensor; _file_of: the names the checkpoint shows
        for name, (fmt, data, scale) in self._quantized.items():
            self._file_of[name] = self._file_of.pop(data) if fmt == "mxfp4" else self._file_of[name]
            self._file_of.pop(scale)
        if self.packed_format is not None:
            self._find_packed()

    def _find_packed(self) -> None:
        """Shows each packed linear layer X (X.qweight + companions) as one tensor X.weight."""
        data, required, optional = TENSORS[self.packed_format.method]
        for name in [n for n in self._file_of if n.endswith(data)]:
            prefix = name[:-len(data)]
            parts = {data: name}
            for suffix in required + optional:
                if prefix + suffix in self._file_of:
                    parts[suffix] = prefix + suffix
                elif suffix in required:
                    raise CheckpointError(f"'{name}' in {self._file_of[name]} has no '{prefix + suffix}': the "
                                          "checkpoint is incomplete")
            self._packed[prefix + ".weight"] = parts
        for shown, parts in self._packed.items():
            self._file_of[shown] = self._file_of[parts[data]]
            for key in parts.values():
                self._file_of.pop(key)

    def packed_experts(self) -> PackedFormat | None:
        """The format of the experts when the checkpoint ships them packed, else None."""
        if self.packed_format is None or not any(".experts." in k for k in self._packed):
            return None
        return self.packed_format

    def is_packed(self, name: str) -> bool:
        """Whether `name` is a packed integer layer (`packed()` reads it without dequantizing)."""
        return name in self._packed

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A packed layer as (codes uint8 [out, in], scale fp16, zero fp16 [out, groups])."""
        parts = {suffix: self._read(key) for suffix, key in self._packed[name].items()}
        try:
            return unpack_packed(self.packed_format, parts, name[:-len(".weight")])
        except PackedFormatError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None

    def _open(self, path: str) -> _Shard:
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = _Shard(path)
        return shard

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        """The file holding tensor `name` (for messages)."""
        return self._file_of.get(name, "?")

    def _entry(self, name: str):
        q = self._quantized.get(name)
        if q is not None:  # a shown name: its stored data tensor
            name = q[1]
        path = self._files.get(name)
        if path is None:
            close = difflib.get_close_matches(name, self._file_of, n=3)
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise CheckpointError(f"tensor '{name}' is not in the checkpoint at {self.folder}{hint}")
        shard = self._open(path)
        entry = shard.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"tensor '{name}' is listed for {path} but that file does not hold it")
        return shard, entry

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self._packed.get(name)
        if parts is not None:
            shapes = {suffix: self._entry(key)[1][1] for suffix, key in parts.items()}
            return packed_shape(self.packed_format, shapes, lambda suffix: self._read(parts[suffix]))
        shape = self._entry(name)[1][1]
        q = self._quantized.get(name)
        if q is not None and q[0] == "mxfp4":  # [E, N, G, 16] packed -> [E, G * 32, N]
            return (shape[0], shape[2] * shape[3] * 2, shape[1])
        return shape

    def _fp8_block_of(self, weight_shape, scale_shape) -> tuple[int, int]:
        if self._fp8_block is not None:
            return self._fp8_block
        return tuple(-(-w // s) for w, s in zip(weight_shape[-2:], scale_shape[-2:]))

    def _dequantized(self, name: str, row: int | None) -> torch.Tensor:
        fmt, data, scale = self._quantized[name]
        read = (lambda k: self._read(k)) if row is None else (lambda k: self._read_row(k, row))
        w, s = read(data), read(scale)
        if fmt == "fp8":
            return dequantize_fp8(w, s, self._fp8_block_of(w.shape, s.shape))
        out = dequantize_mxfp4(w if row is None else w[None], s if row is None else s[None])
        return out if row is None else out[0]

    def _check_shape(self, name: str, path: str, got, want) -> None:
        if want is not None and tuple(got) != tuple(want):
            raise CheckpointError(
                f"tensor '{name}' in {path} has shape {list(got)}, expected {list(want)}: the "
                "checkpoint does not match its config.json")

    def get(self, name: str, shape=None) -> torch.Tensor:
        """One tensor, checked against `shape` when given."""
        self._check_shape(name, self.file_of(name), self.shape(name), shape)
        if name in self._packed:
            codes, scale, zero = self.packed(name)
            return dequantize(codes, scale, zero, self.packed_format.group_size)
        return self._dequantized(name, None) if name in self._quantized else self._read(name)

    def get_row(self, name: str, index: int, shape=None) -> torch.Tensor:
        """tensor[index] of a stacked tensor (one expert of a fused 3D tensor), read alone."""
        full = self.shape(name)
        if shape is not None:
            self._check_shape(name, self.file_of(name), full, shape)
        if not full or not 0 <= index < full[0]:
            raise CheckpointError(f"'{name}' in {self.file_of(name)} has no row {index} (shape {list(full)})")
        return self._dequantized(name, index) if name in self._quantized else self._read_row(name, index)

    def _read(self, name: str) -> torch.Tensor:
        shard, (dtype, full, start, end) = self._entry(name)
        return shard.read(start, end - start, dtype, full)

    def _read_row(self, name: str, index: int) -> torch.Tensor:
        shard, (dtype, full, start, end) = self._entry(name)
        row = (end - start) // full[0]
        return shard.read(start + index * row, row, dtype, full[1:])


class ShardWriter:
    """Writes a sharded safetensors checkpoint one shard at a time (only one shard's tensors in
    memory): model-0000k-of-0000N.safetensors plus model.safetensors.index.json."""

    def __init__(self, folder: str):
        self.folder = folder
        self.shards: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"  # renamed once N is known
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(self.folder, fname),
                  metadata={"format": "pt"})
        self.shards.append(fname)
        for n, t in tensors.items():
            self.weight_map[n] = fname
            self.total += t.numel() * t.element_size()

    def finish(self) -> None:
        final = {}
        for k, fname in enumerate(self.shards):
            final[fname] = f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(os.path.join(self.folder, fname), os.path.join(self.folder, final[fname]))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {n: final[f] for n, f in self.weight_map.items()}}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
