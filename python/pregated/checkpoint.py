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


class Checkpoint:
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
        path = self._file_of.get(name)
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
        return self._entry(name)[1][1]

    def _check_shape(self, name: str, path: str, got, want) -> None:
        if want is not None and tuple(got) != tuple(want):
            raise CheckpointError(
                f"tensor '{name}' in {path} has shape {list(got)}, expected {list(want)}: the "
                "checkpoint does not match its config.json")

    def get(self, name: str, shape=None) -> torch.Tensor:
        """One tensor, checked against `shape` when given."""
        shard, (dtype, full, start, end) = self._entry(name)
        self._check_shape(name, shard.path, full, shape)
        return shard.read(start, end - start, dtype, full)

    def get_row(self, name: str, index: int, shape=None) -> torch.Tensor:
        """tensor[index] of a stacked tensor (one expert of a fused 3D tensor), read alone."""
        shard, (dtype, full, start, end) = self._entry(name)
        if shape is not None:
            self._check_shape(name, shard.path, full, shape)
        if not full or not 0 <= index < full[0]:
            raise CheckpointError(f"'{name}' in {shard.path} has no row {index} (shape {list(full)})")
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
