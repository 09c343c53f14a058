"""Dense layers of a decode step on the CPU backend's pool.

A decode step multiplies a few rows by every dense weight (attention projections, routers, the
LM head): reading each weight once at the machine's memory bandwidth is all that matters. PyTorch's
CPU matmul reads a float32 GEMV at about half of it here (8 GB/s against 16 on two cores, bf16
5-13 GB/s) and wakes its own OpenMP team, which then spins against the pool that computes the
experts. With few rows, `nn.Linear` layers of the dense model go through the runtime's few-row
kernels on the same persistent pool; anything else (prefill, autograd, other dtypes) stays with
PyTorch.

The dense weights move onto 2 MiB pages (`place_on_huge_pages`, Linux's transparent huge pages in
`madvise` mode): a few-row kernel streams each weight once, and on 4 KiB pages it stalls at every
page (the hardware prefetcher stops at the page's end, each page is a TLB miss); a 512 KiB
projection read from memory took 130 us on 4 KiB pages and 32 us on 2 MiB pages here. The
runtime's own allocations (expert store, slab) get the same advice in the CPU backend.

During decode PyTorch's own intra-op threads are set to one (`decode_threads`): what is left to
it (attention over a few rows, norms, elementwise ops) is too small to split, and an OpenMP team
that spins after each parallel region takes the cores the pool needs. A prefill of up to
LEAN_PREFILL_ROWS rows does the same, its nn.Linear layers on the pool whatever their rows;
longer prefills keep PyTorch's threads. The pool's threads, which sleep after 50 us without
work, spin for 1 ms during decode where nothing else of ours needs the cores (gpu-only: no copy
thread, no host lane): the gaps between its jobs inside a step (norms, attention) last 50-300 us,
and waking a sleeping worker costs tens of microseconds on a virtual machine (a 512x512 fp32
projection inside a step took 93 us with the short spin, 40 us with the long one; mixtral-cpu
fp32 decode went from 16.0 to 12.6-13.4 ms per token).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import types

import torch

from . import _core

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 8  # the few-row kernels' limit (above it the backend tiles to sgemm: PyTorch's is as good)
# A prefill of up to this many rows (prompts x tokens) runs like decode (`decode_threads`): on two
# cores a 32-token prompt took 31 ms that way and 46 ms with PyTorch's two threads spinning
# against the pool, 256 tokens 107-112 against 129 ms; at 1024 PyTorch's threads won (397 against
# 421 ms), its multi-threaded attention then outweighing the contention.
LEAN_PREFILL_ROWS = 256


# Linear layers that transformers' modules call one after another on the same input (attention's
# projections, a gated MLP's two inputs): their weights lie side by side and the first call
# computes all of them in one pass of the pool; the others take their share of its output. Each
# call inside a step paid 35-45 us besides reading its weight (a dispatch of the pool, a Python
# path whose code the experts' stream had evicted from the caches).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Siblings:
    """Linear layers of one module that read the same input: their weights [sum n, k] (each
    layer's weight is a view of its rows), biases, the column span of each and the last output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spans: list[tuple[int, int]]):
        self.weight, self.bias, self.spans = weight, bias, spans
        self.last: tuple | None = None  # (input, output [..., sum n]) until the last sibling took its share

    def forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """All siblings' outputs for x (of `rows` rows): [..., sum n]."""
        return _linear(x, self.weight, self.bias, rows)


def siblings_of(layer: torch.nn.Module) -> _Siblings | None:
    """The group of a Linear layer whose weights still are the group's views, else None."""
    group = getattr(layer, "_pregated_siblings", None)
    return group if group is not None and layer.weight.data_ptr() == layer._pregated_ptr else None


def host_call(x: torch.Tensor, w: torch.Tensor) -> bool:
    """A call the CPU backend's kernels take: on the CPU, one dtype, no autograd."""
    return (x.dtype == w.dtype and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def few_rows(x: torch.Tensor, w: torch.Tensor) -> int:
    """Rows of x for the pool's kernels, 0 where PyTorch's linear should run."""
    rows = x.numel() // max(x.shape[-1], 1)
    # inside decode_threads PyTorch has one thread: any number of rows is better on the pool
    return rows if 0 < rows and (rows <= MAX_ROWS or _decode_loops > 0) and host_call(x, w) else 0


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    out = torch.empty(rows, w.shape[0], dtype=x.dtype)
    _core.cpu_linear(x.reshape(rows, -1).contiguous(), w, out)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], w.shape[0])


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    rows = few_rows(x, w)
    if not rows:
        return torch.nn.functional.linear(x, w, self.bias)
    group = siblings_of(self)
    if group is None:  # not grouped, or its weight was replaced
        return _linear(x, w, self.bias, rows)
    last = group.last
    if last is None or last[0] is not x:
        last = (x, group.forward(x, rows))
        group.last = last
    index = self._pregated_index
    if index == len(group.spans) - 1:
        group.last = None
    start, end = group.spans[index]
    return last[1][..., start:end]


def _sibling_sets(model: torch.nn.Module):
    """Each module's SIBLINGS that are all plain nn.Linear layers, in order."""
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if all(type(lin) is torch.nn.Linear for lin in layers):
                yield layers


def _adjacent(weights: list[torch.Tensor]) -> bool:
    """The weights lie one after another in one storage (place_on_huge_pages puts them so)."""
    return all(a.is_contiguous() and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
               and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(weights, weights[1:]))


def _group_siblings(layers: list[torch.nn.Linear]) -> bool:
    """Marks `layers` as siblings with their weights side by side: viewed where they already lie
    so, else copied into one buffer; False where they cannot share a pass (different inputs,
    dtypes, bias or not)."""
    w0 = layers[0].weight
    if any(lin.in_features != w0.shape[1] or lin.weight.dtype != w0.dtype or (lin.bias is None) != (layers[0].bias is None)
           for lin in layers):
        return False
    rows = sum(lin.weight.shape[0] for lin in layers)
    if _adjacent([lin.weight.data for lin in layers]):
        weight = torch.empty(0, dtype=w0.dtype).set_(w0.untyped_storage(), w0.storage_offset(), (rows, w0.shape[1]))
    else:
        total = rows * w0.shape[1] * w0.element_size()
        buf = huge_page_buffer(total) if huge_pages_available() else torch.empty(total, dtype=torch.uint8)
        weight = buf.view(w0.dtype).view(rows, w0.shape[1])
    bias = None if layers[0].bias is None else torch.cat([lin.bias.data for lin in layers])
    spans, row = [], 0
    for lin in layers:
        n = lin.weight.shape[0]
        if lin.weight.data_ptr() != weight[row].data_ptr():
            weight[row:row + n].copy_(lin.weight.data)
            lin.weight.data = weight[row:row + n]
        if bias is not None:
            lin.bias.data = bias[row:row + n]
        spans.append((row, row + n))
        row += n
    group = _Siblings(weight, bias, spans)
    for index, lin in enumerate(layers):
        lin._pregated_siblings, lin._pregated_index, lin._pregated_ptr = group, index, lin.weight.data_ptr()
    return True


HUGE_PAGE = 2 << 20


def huge_pages_available() -> bool:
    """Transparent huge pages can be asked for per mapping (mode `always` or `madvise`) and
    PREGATED_HUGE_PAGES is not 0."""
    if os.environ.get("PREGATED_HUGE_PAGES") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed host memory (uint8) starting on a 2 MiB boundary, advised onto huge
    pages; the tensor keeps its mapping alive."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(m, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE
    return whole[start:start + nbytes]


def place_on_huge_pages(model: torch.nn.Module) -> int:
    """Copies every CPU parameter of `model` into one huge-page buffer (64-byte aligned views;
    tied parameters stay tied) and returns the bytes moved; 0 where huge pages are not offered."""
    # siblings' weights first, one after another, so that use_cpu_pool_for_dense can view them as
    # one matrix where it lies instead of copying them (the copy would leave the arena's holding)
    siblings = [lin.weight for layers in _sibling_sets(model) for lin in layers]
    params = list({id(p): p for p in siblings + list(model.parameters()) if p.device.type == "cpu" and p.numel()}.values())
    if not params or not huge_pages_available():
        return 0
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += (p.numel() * p.element_size() + 63) // 64 * 64  # 64-byte aligned (a weight's rows: no gap)
    arena = huge_page_buffer(total)
    for p, off in zip(params, offsets):
        view = arena[off:off + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
    return total


def use_cpu_pool_for_dense(model: torch.nn.Module) -> int:
    """Routes few-row calls of every plain nn.Linear of `model` with a contiguous CPU weight in
    float32/bfloat16/float16 through the CPU backend's kernels, siblings (SIBLINGS) in one call;
    returns how many layers."""
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (type(module) is torch.nn.Linear and isinstance(w, torch.Tensor) and w.device.type == "cpu"
                and w.dtype in DTYPES and w.is_contiguous()):
            module.forward = types.MethodType(_forward, module)
            module._pregated_siblings = None
            n += 1
    for layers in _sibling_sets(model):
        if all(getattr(lin, "_pregated_siblings", 0) is None for lin in layers):
            _group_siblings(layers)
    return n


def decode_spin_us() -> int:
    """How long the CPU pool's threads spin for their next job during a decode loop
    (PREGATED_DECODE_SPIN_US, default 1000 us)."""
    value = os.environ.get("PREGATED_DECODE_SPIN_US", "1000")
    try:
        us = int(value)
    except ValueError:
        us = -1
    if us < 0:
        raise ValueError(f"PREGATED_DECODE_SPIN_US={value!r}: give a whole number of microseconds, 0 or more")
    return us


_decode_lock = threading.Lock()
_decode_loops = 0
_saved: tuple[int, int] = (1, 0)


@contextlib.contextmanager
def decode_threads(device: str, spin: bool = True):
    """While a CPU decode loop (or a prefill of at most LEAN_PREFILL_ROWS rows) runs, restored
    after, also when the loop is left early; loops in several threads restore when the last one
    ends: PyTorch's intra-op threads at one, the dense layers of any number of rows on the pool,
    and with `spin` the pool's threads spinning through the gaps of a step (`decode_spin_us`)
    instead of falling asleep in them. No spin where other threads of ours need the cores while
    the model runs (the copy thread of offloading policies, the host lane's pool): a spinning
    worker starved them (pregated at 25% on two cores: 46.7 -> 31.9 tok/s). Nothing on other
    devices."""
    global _decode_loops, _saved
    if device != "cpu":
        yield
        return
    spin_us = decode_spin_us() if spin else 0
    with _decode_lock:
        if _decode_loops == 0:
            _saved = (torch.get_num_threads(), _core.cpu_spin_us())
            torch.set_num_threads(1)
            _core.set_cpu_spin_us(max(spin_us, _saved[1]))
        _decode_loops += 1
    try:
        yield
    finally:
        with _decode_lock:
            _decode_loops -= 1
            if _decode_loops == 0:
                torch.set_num_threads(_saved[0])
                _core.set_cpu_spin_us(_saved[1])
