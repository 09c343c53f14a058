"""Expert parallelism on torch.distributed: each rank owns a contiguous share of every MoE
layer's experts (in its own expert store and device slab); dense weights are replicated.

One MoE block, on every rank at once (the ranks hold the same tokens: the dense layers are
replicated, or split by tensor_parallel.py): each rank takes a contiguous slice of the block's
tokens as its own (DeepSpeed-TED's dropping of the duplicates; `drop_duplicates`), exchanges
row counts, then sends each of its (token, expert) rows, its expert's local id in 4 bytes
appended, to the rank that owns the expert (`all_to_all_single`, uneven splits), runs the rows
it received through its runtime, sends the outputs back the same way, combines its slice's rows
with their routing weights, and the slices are gathered into the block's output: four
collectives a block. So each (token, expert) row crosses once each way, and only routed rows
cross.

NCCL on GPUs, gloo on CPUs: the process group comes from torch.distributed's environment
(torchrun), nothing home-made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel group failed (a rank died, stalled or disagreed)."""


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel=True needs an initialised torch.distributed process group: run under "
                           "`torchrun --nproc-per-node N -m pregated ...`, or call "
                           "torch.distributed.init_process_group('gloo' or 'nccl') first")
    return dist


def init_from_environment(device: str | None) -> int:
    """Joins torchrun's process group (from RANK, WORLD_SIZE, MASTER_ADDR, ...) unless one is
    initialised already: NCCL for CUDA devices, gloo otherwise. Returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("--expert-parallel runs under torchrun: torchrun --nproc-per-node N -m pregated ...")
        if (device or "").startswith("cuda"):
            # one GPU per rank on each host: NCCL refuses two ranks on one device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank()


def checkpoint_fingerprint(folder: str | None) -> str | None:
    """config.json's contents and the names and sizes of the weight files: enough to tell two
    checkpoints apart without reading the weights."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == "config.json":
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(path)}".encode())
    return h.hexdigest()[:16]


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items, the first n % world ranks taking one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def add_parallel_args(p) -> None:
    """--expert-parallel and --tensor-parallel, for every command that runs an Engine."""
    p.add_argument("--expert-parallel", action="store_true",
                   help="spread the experts over the ranks of torchrun (--nproc-per-node N; gloo on CPUs, NCCL "
                        "on GPUs); every rank runs the command (budgets are per rank), rank 0 prints")
    p.add_argument("--tensor-parallel", action="store_true",
                   help="with --expert-parallel: also split attention heads and dense MLPs over the ranks")


class ExpertParallel:
    """The expert placement of one rank and the block's all-to-all (see the module docstring).

    Experts are spread in contiguous shares, the first E % N ranks holding one more."""

    def __init__(self, num_experts: int, group=None):
        dist = _dist()
        self.dist, self.group = dist, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts < self.world:
            raise ValueError(f"{num_experts} experts per MoE layer cannot be spread over {self.world} ranks: "
                             f"use at most {num_experts} ranks")
        spans = [share(num_experts, r, self.world) for r in range(self.world)]
        self.first = [a for a, _ in spans]
        self.counts = [b - a for a, b in spans]
        self.owner = torch.repeat_interleave(torch.arange(self.world), torch.tensor(self.counts))
        self.local_index = torch.cat([torch.arange(c) for c in self.counts])
        self.num_local = self.counts[self.rank]
        self.comm_cpu = dist.get_backend(group) == "gloo"
        self.bytes_sent = 0      # payload this rank sent in the blocks' all-to-alls (rows out and back)
        self.bytes_remote = 0    # the part of bytes_sent that went to other ranks (not to itself)
        self.bytes_gathered = 0  # payload this rank contributed to the gathers of the blocks' outputs
        # DeepSpeed-TED's duplicate dropping: every rank holds the block's tokens (the dense layers
        # are replicated or tensor-parallel), so each dispatches only its slice and the slices are
        # gathered after. False: every rank dispatches every token (N times the all-to-all bytes,
        # no gather): the comparison the bytes tests measure.
        self.drop_duplicates = True

    def owns(self, expert: int) -> bool:
        return self.first[self.rank] <= expert < self.first[self.rank] + self.num_local

    def local(self, expert: int) -> int:
        return expert - self.first[self.rank]

    def rank_config(self, cfg):
        """The model config as this rank's runtime sees it: its own experts (a token routes to at
        most min(top_k, local) of them)."""
        return dataclasses.replace(cfg, num_experts=self.num_local, top_k=min(cfg.top_k, self.num_local))

    def local_experts(self, experts: torch.Tensor | None) -> torch.Tensor | None:
        """Global expert ids -> the local ids of those this rank owns (a prefetch list)."""
        if experts is None:
            return None
        e = experts.long().cpu()
        mine = (e >= self.first[self.rank]) & (e < self.first[self.rank] + self.num_local)
        return (e[mine] - self.first[self.rank]).to(torch.int32)

    def check_same(self, summary: dict) -> None:
        """Every rank must run the same checkpoint and configuration; refused at start, naming
        the rank and what differs."""
        everyone = [None] * self.world
        self._collective(lambda: self.dist.all_gather_object(everyone, summary, group=self.group), "start")
        for r, other in enumerate(everyone):
            diff = {k: (everyone[0].get(k), other.get(k)) for k in set(everyone[0]) | set(other)
                    if everyone[0].get(k) != other.get(k)}
            if diff:
                what = "; ".join(f"{k}: rank 0 has {a!r}, rank {r} has {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"expert parallelism: rank {r}'s configuration differs from rank 0's ({what}); "
                                 "start every rank with the same checkpoint and options")

    def _collective(self, fn, what: str):
        try:
            return fn()
        except RuntimeError as e:
            raise ExpertParallelError(
                f"expert parallelism: a collective ({what}) of rank {self.rank} failed: {e}. Another rank died, "
                "stalled past the process group's timeout, or left; every rank must run the same "
                "generate() calls") from None

    def _on_link(self, t: torch.Tensor) -> torch.Tensor:
        """t where the backend moves it: gloo host tensors, NCCL this rank's GPU's (the counts and
        ids start on the host)."""
        return t.cpu() if self.comm_cpu else t.to(torch.device("cuda", torch.cuda.current_device()))

    def _a2a(self, data: torch.Tensor, out_rows: list[int], in_rows: list[int], what: str) -> torch.Tensor:
        src = self._on_link(data).contiguous()
        out = src.new_empty((sum(out_rows),) + tuple(src.shape[1:]))
        self._collective(lambda: self.dist.all_to_all_single(out, src, output_split_sizes=out_rows,
                                                              input_split_sizes=in_rows, group=self.group), what)
        return out.to(data.device)

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The sum of t over the ranks, in float32, on t's device (tensor_parallel.py)."""
        src = self._on_link(t.float())
        if src is t:
            src = src.clone()  # the caller's tensor stays as it was
        self._collective(lambda: self.dist.all_reduce(src, group=self.group), what)
        return src.to(t.device)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, run_local) -> torch.Tensor:
        """x [T, H] (the same on every rank), ids / weights [T, K] on the host (global expert
        ids) -> the block's output [T, H]. run_local(x_rows [R, H], local_ids [R] host long) ->
        [R, H] runs this rank's experts."""
        T, H = x.shape
        K = ids.shape[1]
        per, t0, t1 = T, 0, T  # every token from every rank, unless the duplicates are dropped
        if self.drop_duplicates:
            per = -(-T // self.world)
            t0, t1 = min(self.rank * per, T), min((self.rank + 1) * per, T)
        flat = ids[t0:t1].reshape(-1).long()
        w = weights[t0:t1].reshape(-1).float()
        dest = self.owner[flat]
        order = torch.argsort(dest, stable=True)
        token = torch.arange(t1 - t0).repeat_interleave(K)[order]
        send = torch.bincount(dest, minlength=self.world)
        recv = self._a2a(send, [1] * self.world, [1] * self.world, f"block {layer} counts")
        send_rows, recv_rows = send.tolist(), recv.tolist()
        x_out = x[t0:t1].index_select(0, token.to(x.device))
        # each row travels with its expert's local id in its last 4 bytes: one all-to-all
        row_bytes = H * x.element_size()
        ids_out = self.local_index[flat[order]].to(torch.int32).to(x.device)
        packed = torch.cat([x_out.contiguous().view(torch.uint8).view(-1, row_bytes),
                            ids_out.view(torch.uint8).view(-1, 4)], dim=1)
        got = self._a2a(packed, recv_rows, send_rows, f"block {layer} rows")
        x_in = got[:, :row_bytes].contiguous().view(x.dtype).view(-1, H)
        ids_in = got[:, row_bytes:].contiguous().view(torch.int32).view(-1).cpu()
        y_in = run_local(x_in, ids_in) if x_in.shape[0] else x_in
        y_out = self._a2a(y_in, send_rows, recv_rows, f"block {layer} outputs")
        self.bytes_sent += (x_out.numel() + y_in.numel()) * x.element_size()
        others = sum(send_rows) - send_rows[self.rank] + sum(recv_rows) - recv_rows[self.rank]
        self.bytes_remote += others * H * x.element_size()
        mine = torch.zeros(t1 - t0, H, dtype=torch.float32, device=x.device)
        mine.index_add_(0, token.to(x.device), y_out.float() * w[order].to(x.device)[:, None])
        if not self.drop_duplicates:
            return mine.to(x.dtype)
        # every rank's slice, padded to `per` rows for the gather
        padded = torch.zeros(per, H, dtype=x.dtype, device=x.device)
        padded[:t1 - t0] = mine.to(x.dtype)
        src = self._on_link(padded)
        parts = [torch.empty_like(src) for _ in range(self.world)]
        self._collective(lambda: self.dist.all_gather(parts, src, group=self.group), f"block {layer} gather")
        self.bytes_gathered += src.numel() * src.element_size()
        return torch.cat(parts)[:T].to(x.device)


def summary_of(engine_args: dict) -> dict:
    """What must agree across ranks, as plain JSON values."""
    return json.loads(json.dumps(engine_args, default=str))
