"""Continuous batching for the server: one thread owns the Engine and runs decode steps over a
batch that requests join (after their own prefill) and leave (done, stopped, cancelled, timed
out) at step boundaries, each with its own sampling parameters and stop rules.

A new request's prompt is prefilled in chunks of `prefill_chunk` tokens, one chunk between two
decode steps of the running batch, so a long prompt holds the running streams up by one chunk
at a time, not by its whole prefill.

The model side (the running batch's KV cache and the pending prompt's) lives in `BatchState`,
changed only through its operations. Under expert parallelism every rank must run the same
forwards: rank 0's scheduler sends each operation to the other ranks before running it
(`ReplicatedState`), and they apply it to their own state (`follow`): the requests, sampling
and HTTP stay on rank 0.

T = tokens, V = vocabulary, B = rows of the running batch.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cpu_dense import decode_threads
from .generation import SamplingParams, TextTracker, sample
from .kv_batch import can_join, join, keep_rows


class QueueFull(Exception):
    """The server's queue holds max_queue requests already."""


class ShuttingDown(Exception):
    """The server stopped accepting requests."""


@dataclass
class Request:
    """One completion. `emit(event)` is called from the scheduler's thread with
    {"text": piece, "token": id, "logprob": ..., "top_logprobs": ...} per token and, last,
    {"finish_reason": "stop" | "length" | "cancelled" | "timeout" | "error", ...}."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict], None]
    top_logprobs: int | None = None  # None: no log probabilities
    timeout_s: float | None = None
    id: int = field(default_factory=itertools.count().__next__)
    created: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the scheduler
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None
    generated: int = 0
    first_token_s: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Metrics:
    """Counters for /metrics (read from any thread; written by the scheduler)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # by finish reason
        self.tokens = 0
        self.prompt_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.batch_size = 0
        self.max_batch_seen = 0
        self.steps = 0
        self.step_rows = 0
        self.started = time.perf_counter()


class BatchState:
    """The scheduler's model state: the running batch's KV cache and the pending prompt's. Every
    change is one operation, `apply(op, *args)`, with host tensors as arguments."""

    def __init__(self, engine):
        self.engine, self.batch, self.pending = engine, None, None
        self.broken: Exception | None = None  # a failure no later operation can get past

    def apply(self, op: str, *args):
        return getattr(self, "_" + op)(*args)

    def _forward(self, tokens, positions, mask, cache, unpadded: bool = False):
        eng = self.engine
        rows = torch.ones(tokens.shape, dtype=torch.bool)
        return eng._forward(tokens.to(eng.device), mask.to(eng.device), positions.to(eng.device), cache, rows,
                            unpadded=unpadded)

    def _prefill(self, tokens, positions, mask, fresh: bool):
        """One chunk of the pending prompt (fresh: its first)."""
        with torch.inference_mode():
            logits, self.pending = self._forward(tokens, positions, mask, None if fresh else self.pending)
        return logits

    def _admit(self, batch_mask, mask):
        """The pending prompt joins the batch; returns the batch's mask."""
        if self.batch is None:
            self.batch, self.pending = self.pending, None
            return mask
        dev = self.engine.device
        self.batch, joined = join(self.batch, batch_mask.to(dev), self.pending, mask.to(dev))
        self.pending = None
        return joined.cpu()

    def _keep(self, mask, keep: list[int]):
        self.batch, mask = keep_rows(self.batch, mask.to(self.engine.device), keep)
        return mask.cpu()

    def _step(self, tokens, positions, mask):
        with torch.inference_mode(), decode_threads(self.engine.device, spin=self.engine.spin_between_jobs):
            # an all-ones mask (a host tensor): no row is padded, so the step may be the lean one
            out, self.batch = self._forward(tokens, positions, mask, self.batch, unpadded=bool(mask.all()))
        return out

    def _drop(self, which: str):  # "batch" or "pending"
        setattr(self, which, None)

    def _stop(self):
        self.batch = self.pending = None


class ReplicatedState(BatchState):
    """Rank 0's state under expert parallelism: each operation goes to the other ranks first."""

    def __init__(self, engine, group):
        super().__init__(engine)
        self.group = group

    def apply(self, op: str, *args):
        from .expert_parallel import ExpertParallelError

        if self.broken is not None:
            raise self.broken
        try:
            _broadcast(self.engine, self.group, [(op, args)], f"serve: sending {op}")
            return super().apply(op, *args)
        except ExpertParallelError as e:  # the group is gone: nothing more can run
            self.broken = e
            raise


def _broadcast(engine, group, box: list, what: str) -> None:
    """Rank 0's box[0] to every rank of `group`, in place."""
    import torch.distributed as dist

    engine.ep._collective(lambda: dist.broadcast_object_list(box, src=0, group=group), what)


def follow(engine, group) -> None:
    """The loop of a rank other than 0 under `pregated serve --expert-parallel`: applies rank 0's
    operations to its own state until rank 0 stops. An operation that fails here failed on rank 0
    too (the same forward): rank 0 reports it to its request, and both go on."""
    state = BatchState(engine)
    while True:
        box = [None]
        _broadcast(engine, group, box, "serve: waiting for rank 0")
        op, args = box[0]
        if op == "stop":
            return
        try:
            state.apply(op, *args)
        except Exception:  # noqa: BLE001 - see the docstring
            pass


class Scheduler:
    """Runs requests on `engine` with continuous batching (see the module docstring).

    max_batch: rows decoded together; max_queue: requests waiting for a row (more: QueueFull);
    prefill_chunk: prompt tokens prefilled between two decode steps.
    """

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
                 state: BatchState | None = None):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch, max_queue and prefill_chunk must be >= 1, got {max_batch}, {max_queue} "
                             f"and {prefill_chunk}")
        self.engine = engine
        self.state = state or BatchState(engine)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._pending = None  # (request, tokens prefilled) of the prompt being prefilled
        self.fatal: str | None = None  # why the scheduler stopped for good (see _fail_queued)
        self.metrics = Metrics()
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._rows: list[Request] = []
        self._thread = threading.Thread(target=self._loop, name="pregated-scheduler", daemon=True)
        self._thread.start()

    # --- called from the server's threads ---------------------------------------------------

    def submit(self, req: Request) -> None:
        with self._cv:
            if self.fatal is not None:
                raise ShuttingDown(f"the server can no longer serve: {self.fatal}")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue})")
            self._queue.append(req)
            self._cv.notify()

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def running(self) -> int:
        return len(self._rows)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with drain, finish what is queued and running, else cancel it."""
        with self._cv:
            self._accepting = False
            if not drain:
                for r in list(self._queue) + list(self._rows):
                    r.cancel()
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- the scheduler's thread -------------------------------------------------------------

    def _loop(self) -> None:
        batch = None  # (mask [B, S], last positions [B], logits [B, V]); the cache is in self.state
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._rows and self._pending is None and not self._stop:
                        self._cv.wait()
                    if self._stop and not self._queue and not self._rows and self._pending is None:
                        return
                try:
                    batch = self._admit(batch)
                    if self._rows:
                        batch = self._step(batch)
                except Exception as e:  # noqa: BLE001 - every request hears of it; the server goes on
                    for r in self._rows:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                    self._rows, batch = [], None
                    if self._pending is not None:
                        self._finish(self._pending[0], "error", error=f"{type(e).__name__}: {e}")
                        self._pending = None
                    if self.state.broken is not None:  # e.g. a rank of the expert-parallel group died
                        self._fail_queued(f"{type(self.state.broken).__name__}: {self.state.broken}")
                        return
                    self.state.apply("drop", "batch")
                    self.state.apply("drop", "pending")
        finally:
            if self.state.broken is None:
                self.state.apply("stop")

    def _fail_queued(self, error: str) -> None:
        """A failure nothing can get past: stop accepting and fail what waits, not hang it."""
        with self._cv:
            self._accepting = False
            self.fatal = error
            waiting, self._queue = list(self._queue), collections.deque()
        for r in waiting:
            self._finish(r, "error", error=error)

    def _admit(self, batch):
        """Takes the next request when a row is free and runs one chunk of its prefill; once its
        whole prompt is in, it joins the batch."""
        if self._pending is None:
            if len(self._rows) >= self.max_batch:
                return batch
            with self._cv:
                if not self._queue:
                    return batch
                if batch is not None and not can_join(self.state.batch):
                    return batch  # this model's cache takes no rows of other lengths: wait
                req = self._queue.popleft()
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                return batch
            req.tracker = TextTracker(self.engine.tokenizer, req.params.stop)
            if req.params.seed is not None:
                req.generator = torch.Generator().manual_seed(req.params.seed)
            self._pending = (req, 0)
        req, done = self._pending
        if req.cancelled.is_set():
            self._pending = None
            self._finish(req, "cancelled")
            self.state.apply("drop", "pending")
            return batch
        ids = req.prompt_ids
        n = min(self.prefill_chunk, len(ids) - done)
        tokens = torch.tensor([ids[done:done + n]], dtype=torch.long)
        positions = torch.arange(done, done + n)[None]
        mask = torch.ones(1, done + n, dtype=torch.long)
        try:
            logits = self.state.apply("prefill", tokens, positions, mask, done == 0)
        except Exception as e:  # noqa: BLE001 - this request fails; the batch goes on
            self._pending = None
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            self.state.apply("drop", "pending")
            return batch
        done += n
        if done < len(ids):
            self._pending = (req, done)
            return batch
        self._pending = None
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(ids)
        last = torch.tensor([len(ids) - 1])
        logits = logits[:, -1].float()
        joined = self.state.apply("admit", None if batch is None else batch[0], mask)
        if batch is None:
            batch = (joined, last, logits)
        else:
            batch = (joined, torch.cat([batch[1], last]), torch.cat([batch[2], logits.to(batch[2].device)]))
        self._rows.append(req)
        return batch

    def _step(self, batch):
        """Sample one token per row, let finished rows leave, run the rest one position on."""
        mask, last, logits = batch
        nxt, keep = [], []
        now = time.perf_counter()
        for i, req in enumerate(self._rows):
            row = logits[i:i + 1]
            tok = int(sample(row, req.params, req.generator)[0])
            event = {"token": tok}
            if req.top_logprobs is not None:
                lp = torch.log_softmax(row[0].float().cpu(), dim=-1)
                event["logprob"] = float(lp[tok])
                if req.top_logprobs > 0:
                    top = torch.topk(lp, req.top_logprobs)
                    event["top_logprobs"] = list(zip(top.indices.tolist(), top.values.tolist()))
            event["text"] = req.tracker.add(tok)
            req.generated += 1
            if req.first_token_s is None:
                req.first_token_s = now - req.created
                with self.metrics.lock:
                    self.metrics.ttft_sum += req.first_token_s
                    self.metrics.ttft_count += 1
            req.emit(event)
            reason = None
            if tok in self.engine.eos_ids or req.tracker.stopped:
                reason = "stop"
            elif req.generated >= req.params.max_new_tokens:
                reason = "length"
            elif req.cancelled.is_set():
                reason = "cancelled"
            elif req.timeout_s is not None and now - req.created > req.timeout_s:
                reason = "timeout"
            if reason is None:
                keep.append(i)
                nxt.append(tok)
            else:
                self._finish(req, reason)
        with self.metrics.lock:
            self.metrics.tokens += len(self._rows)
            self.metrics.steps += 1
            self.metrics.step_rows += len(self._rows)
            self.metrics.max_batch_seen = max(self.metrics.max_batch_seen, len(self._rows))
        if not keep:
            self._rows = []
            self.state.apply("drop", "batch")
            return None
        if len(keep) < len(self._rows):
            mask = self.state.apply("keep", mask, keep)
            last = last[keep]
            self._rows = [self._rows[i] for i in keep]
        self.metrics.batch_size = len(self._rows)
        B = len(keep)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        last = last + 1
        tokens = torch.tensor(nxt, dtype=torch.long)[:, None]
        out = self.state.apply("step", tokens, last[:, None], mask)
        return mask, last, out[:, -1].float()

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        text = req.tracker.finish() if req.tracker is not None else ""
        event = {"finish_reason": reason, "text": text, "prompt_tokens": len(req.prompt_ids),
                 "completion_tokens": req.generated}
        if error:
            event["error"] = error
        with self.metrics.lock:
            self.metrics.requests[reason] += 1
        req.emit(event)
