"""The memory a run needs, estimated before anything is allocated, and the check that refuses a
run the machine cannot hold with a message that says what to pass instead."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _core

# Python, torch and the allocators' own use, beyond the tensors counted here.
HOST_OVERHEAD = 1 << 30
SLACK = 1.10


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else all RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_bytes(cfg) -> int:
    """Bytes of every parameter that is not a routed expert, in the config's dtype."""
    return cfg.dense_parameters * cfg.dtype.itemsize


@dataclass
class Footprint:
    host: int       # bytes of host memory
    device: int     # bytes of device memory (0 on the CPU, where the device is the host)
    parts: dict     # (where, what) -> bytes: what each figure is made of, for the message

    def describe(self, where: str) -> str:
        return ", ".join(f"{what} {_core.format_bytes(v)}" for (w, what), v in self.parts.items() if v and w == where)


def bench_footprint(cfg, device: str, largest_slab: int, hf_baselines: list[str]) -> Footprint:
    """What `pregated bench` holds at its peak: the expert store (host), the dense weights and
    the largest slab of the plan (device; host memory on the CPU) and, for HF baselines, a
    second whole model loaded by transformers while the engine stays open."""
    experts = cfg.all_expert_bytes()
    dense = dense_bytes(cfg)
    dev = "device" if device.startswith("cuda") else "host"  # the CPU backend's device is the host
    parts = {("host", "expert store"): experts, (dev, "dense weights"): dense,
             (dev, "expert slots"): largest_slab}
    if hf_baselines:
        # transformers holds the whole model: in host memory on the CPU, and accelerate keeps
        # offloaded weights in host memory on a GPU.
        parts[("host", "transformers' copy of the model")] = dense + experts
    host = sum(v for (w, _), v in parts.items() if w == "host")
    device_bytes = sum(v for (w, _), v in parts.items() if w == "device")
    return Footprint(host=int(host * SLACK) + HOST_OVERHEAD, device=int(device_bytes * SLACK), parts=parts)


def check_fits(fp: Footprint, device: str, advice: str) -> None:
    """Raises MemoryError naming what the run needs, what the machine has and `advice`."""
    have = available_host_bytes()
    fb = _core.format_bytes
    if fp.host > have:
        raise MemoryError(
            f"this run needs about {fb(fp.host)} of host memory ({fp.describe('host')}), and this "
            f"machine has {fb(have)} available; {advice}")
    if device.startswith("cuda") and fp.device:
        free, _ = torch.cuda.mem_get_info(device)
        if fp.device > free:
            raise MemoryError(
                f"this run needs about {fb(fp.device)} of device memory ({fp.describe('device')}), "
                f"and {device} has {fb(free)} free; {advice}")
