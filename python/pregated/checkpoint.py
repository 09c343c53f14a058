"""Memory-mapped access to a Hugging Face safetensors checkpoint (single file or sharded).

Tensors are read one at a time from memory-mapped files; a fused 3D expert tensor is read one
expert slice at a time, so loading never holds a second copy of all experts.
"""

from __future__ import annotations

import difflib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or lacks / misshapes a tensor."""


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
        self._handles: dict[str, object] = {}
        if self._file_of is None:
            handle = self._open(single)
            self._file_of = {name: single for name in handle.keys()}
        else:
            for path in sorted(set(self._file_of.values())):
                self._open(path)  # fail early on a corrupt shard

    def _open(self, path: str):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{path} is not a valid safetensors file ({e}); it may be truncated or "
                    "corrupt: download or save it again") from e
            self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        """The file holding tensor `name` (for messages)."""
        return self._file_of.get(name, "?")

    def _handle_of(self, name: str):
        path = self._file_of.get(name)
        if path is None:
            close = difflib.get_close_matches(name, self._file_of, n=3)
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise CheckpointError(f"tensor '{name}' is not in the checkpoint at {self.folder}{hint}")
        handle = self._open(path)
        if name not in handle.keys():
            raise CheckpointError(f"tensor '{name}' is listed for {path} but that file does not hold it")
        return path, handle

    def shape(self, name: str) -> tuple[int, ...]:
        _, handle = self._handle_of(name)
        return tuple(handle.get_slice(name).get_shape())

    def _check_shape(self, name: str, path: str, got, want) -> None:
        if want is not None and tuple(got) != tuple(want):
            raise CheckpointError(
                f"tensor '{name}' in {path} has shape {list(got)}, expected {list(want)}: the "
                "checkpoint does not match its config.json")

    def get(self, name: str, shape=None) -> torch.Tensor:
        """One tensor, checked against `shape` when given."""
        path, handle = self._handle_of(name)
        self._check_shape(name, path, handle.get_slice(name).get_shape(), shape)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {path} ({e}); the file may be corrupt") from e

    def get_row(self, name: str, index: int, shape=None) -> torch.Tensor:
        """tensor[index] of a stacked tensor (one expert of a fused 3D tensor), read alone."""
        path, handle = self._handle_of(name)
        sl = handle.get_slice(name)
        full = sl.get_shape()
        if shape is not None:
            self._check_shape(name, path, full, shape)
        try:
            return sl[index]
        except Exception as e:
            raise CheckpointError(f"cannot read '{name}'[{index}] from {path} ({e}); the file may be corrupt") from e


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
