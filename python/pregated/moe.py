"""MoE blocks through the runtime: routing, the offloading policy and the pre-gate.

T = tokens routed, H = hidden, E = experts per layer, K = experts per token.

Policies (how experts reach the compute):
  gpu-only      every expert has a slot; after the first pass nothing moves
  on-demand     experts are loaded after routing, when a block needs them
  prefetch-all  while block i computes, every expert of block i+1 is queued
  pregated      while block i computes, the experts the pre-gate predicts for block i+1 are queued
  hybrid        pregated, and an expert that is not in a slot is either copied or computed on the
                host lane where it lives, whichever the cost model says finishes the block
                sooner; the most routed experts stay pinned as the hot set
"""

from __future__ import annotations

import os
import time

import torch

from . import _core
from .experts import run_experts, run_experts_device, run_experts_resident

POLICIES = ("gpu-only", "on-demand", "prefetch-all", "pregated", "hybrid")
LANE_PLANS = ("auto", "host", "copy", "alternate")


def min_expert_slots(policy: str, cfg) -> int:
    """Experts that must fit at once: one token's experts for one block; the prefetching
    policies also hold the next block's; hybrid computes what has no slot on the host."""
    if policy == "hybrid":
        return 1
    return cfg.top_k if policy == "on-demand" else 2 * cfg.top_k


def hybrid_split(cfg, expert_memory: int, hot_fraction: float | None = None) -> tuple[int, int]:
    """How policy hybrid splits a budget's slots: (hot, working). The working set keeps room for
    a block's copies and the next block's prefetches (2 * top_k slots) and the hot set takes the
    rest; `hot_fraction` in [0, 1) overrides. Nothing is hot when every expert fits. At least
    one slot always stays for copies."""
    total = cfg.num_routed_experts
    slots = min(total, expert_memory // cfg.expert_bytes())
    if slots >= total:
        return 0, slots
    hot = slots - min(slots, 2 * cfg.top_k) if hot_fraction is None else int(slots * hot_fraction)
    hot = max(0, min(hot, slots - 1))
    return hot, slots - hot


def min_expert_memory(policy: str, cfg) -> int:
    """The smallest expert budget (bytes) a policy runs with; all experts for gpu-only."""
    total = cfg.all_expert_bytes()
    if policy == "gpu-only":
        return total
    return min(total, min_expert_slots(policy, cfg) * cfg.expert_bytes())


def parse_expert_memory(value) -> int:
    """Bytes as an int, or a string like '8GiB' / '512MB' -> bytes (>= 0)."""
    what = ("expert_memory must be a byte count >= 0: an int, or a string like '8GiB' or '512MB'; "
            f"got {value!r}")
    if isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(what)
        try:
            return _core.parse_bytes(value)
        except ValueError as e:
            raise ValueError(f"{what} ({e})") from None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(what)


def resolve_policy(policy: str | None, expert_memory, cfg) -> tuple[str, int]:
    """Checks the policy and the budget; returns (policy, expert memory in bytes)."""
    total = cfg.all_expert_bytes()
    budget = total if expert_memory is None else parse_expert_memory(expert_memory)
    if policy is None:  # the fastest correct choice for the budget
        policy = "gpu-only" if budget >= total else "pregated"
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    minimum = min_expert_memory(policy, cfg)
    if policy == "gpu-only":
        if budget < total:
            raise ValueError(
                f"policy 'gpu-only' keeps all {cfg.num_routed_experts} experts on the "
                f"device: it needs expert_memory >= {total} bytes ({_core.format_bytes(total)}), got "
                f"{budget} bytes; lower the policy to 'pregated' or 'on-demand'")
        return policy, total
    if budget < minimum:
        raise ValueError(
            f"expert_memory of {budget} bytes ({_core.format_bytes(budget)}) is below the minimum "
            f"for policy '{policy}': {minimum} bytes ({_core.format_bytes(minimum)}), room for "
            f"{min_expert_slots(policy, cfg)} experts of {cfg.expert_bytes()} bytes "
            f"(experts per token = {cfg.top_k})")
    return policy, min(budget, total)


def check_eviction(policy: str, eviction: str) -> None:
    if eviction == "none" and policy == "gpu-only":
        raise ValueError("eviction 'none' drops experts after each block, which contradicts policy "
                         "'gpu-only'; use lru or lfu, or an offloading policy")


LANE_COSTS = ("link_bandwidth", "host_bandwidth", "host_row_seconds")


def check_hybrid(hot_fraction, lane_plan: str, lane_costs: dict | None) -> dict:
    """Checks policy hybrid's options; returns them as the runtime's set_host_lane takes them."""
    if hot_fraction is not None and (not isinstance(hot_fraction, (int, float)) or isinstance(hot_fraction, bool)
                                     or not 0 <= hot_fraction < 1):
        raise ValueError(f"hot_fraction must be a number in [0, 1), got {hot_fraction!r}")
    if lane_plan not in LANE_PLANS:
        raise ValueError(f"unknown lane plan {lane_plan!r}: choose one of {', '.join(LANE_PLANS)}")
    costs = dict(lane_costs or {})
    for k, v in costs.items():
        if k not in LANE_COSTS:
            raise ValueError(f"unknown lane cost {k!r}: give any of {', '.join(LANE_COSTS)}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"lane cost {k} must be a number > 0, got {v!r}")
    return {"hot_fraction": hot_fraction, "lane_plan": lane_plan, "lane_costs": costs}


ROUTING_MODES = ("exact", "pregate")


def check_routing(routing: str) -> None:
    if routing not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode '{routing}': choose exact or pregate")


def device_path_wanted() -> bool:
    """PREGATED_DEVICE_PATH: 1 (default) runs the offloading policies' decode blocks on the device
    path on a GPU (MoEExecutor.on_device), 0 never (each block then sends its routing to the host)."""
    value = os.environ.get("PREGATED_DEVICE_PATH", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PREGATED_DEVICE_PATH={value!r}: give 1 (decode blocks read missing experts in place "
                         "and the runtime learns the routing one step behind) or 0 (never)")
    return value == "1"


class MoEExecutor:
    """Runs MoE block m for the engine and issues the prefetch for block m + 1.

    routing "exact": each block routes with its own router; the pre-gate only prefetches.
    routing "pregate": block m + 1 computes with the experts (and weights) the pre-gate chose at
    block m (the paper's algorithm); the first block routes with its own router.
    """

    def __init__(self, runtime, handle: int, cfg, policy: str, pregate, taps, routing: str = "exact"):
        self.runtime = runtime
        self.stacks = [b.stack for b in taps.blocks]
        self.handle = handle  # the runtime's handle for the custom op
        self.cfg = cfg
        self.policy = policy
        self.pregate = pregate
        self.taps = taps
        self.set_routing(routing)
        self.recorder = None  # calibration hook: recorder(m, h, router_logits, ids)
        # Predict and score in every block, also where neither the policy nor the routing mode
        # uses the prediction (`pregated eval` measures the pre-gate under exact routing).
        self.score_pregate = False
        # Rows of this forward that go through the experts ([N] indices into the flattened
        # batch, on the device), or None for all: padding and finished sequences load nothing.
        self.rows: torch.Tensor | None = None
        # Host seconds per block of the forward being traced (Engine.trace_decode_step), or None.
        self.host_seconds: list[float] | None = None
        self.ep = None  # ExpertParallel: this rank's share of the experts, the blocks' all-to-all
        # Offloading policies run decode-sized blocks on the device path (see on_device); the
        # engine turns it on for CUDA unless PREGATED_DEVICE_PATH=0.
        self.device_path = False
        self._all_experts: list[int] = list(range(cfg.num_experts))
        self.reset()

    def set_routing(self, routing: str) -> None:
        check_routing(routing)
        self.routing = routing

    def reset(self) -> None:
        n = self.cfg.num_moe_layers
        self.predicted: list[torch.Tensor | None] = [None] * n  # [T, K'] predicted for block m
        self.pending: list[tuple | None] = [None] * n  # pregate routing chosen for block m
        # per block call: the set of predicted experts against the set routed (what prefetching sees)
        self.pred_hits, self.pred_count, self.routed_count = [0] * n, [0] * n, [0] * n
        # per token: its predicted experts against its routed ones (what routing by pre-gate sees)
        self.token_hits, self.token_pred, self.token_routed = [0] * n, [0] * n, [0] * n

    def __call__(self, m: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Block m's routed experts, from transformers' experts interface: x [T, H] (the MoE
        block's input), ids / weights [T, K] from the block's own router -> [T, H]."""
        if self.host_seconds is None:
            return self._block(m, x, ids, weights)
        t = time.perf_counter()
        out = self._block(m, x, ids, weights)
        self.host_seconds[m] += time.perf_counter() - t
        return out

    def resident(self, tokens: int = 1) -> bool:
        """Every expert is pinned in a slot (gpu-only) and nothing needs the routing on the host
        (exact routing, no pre-gate scoring, no recording): a block of `tokens` tokens runs on
        the device alone. Quantized experts take it for decode-sized blocks only (up to
        _core.RESIDENT_QUANTIZED_ROWS_MAX token-expert rows); larger ones take the general path."""
        return (self.policy == "gpu-only" and self._routing_stays_on_device()
                and (self.cfg.expert_format == "dense" or tokens * self.cfg.top_k <= _core.RESIDENT_QUANTIZED_ROWS_MAX))

    def on_device(self, tokens: int) -> bool:
        """An offloading policy (on-demand, prefetch-all, pregated) runs a block of `tokens`
        tokens on the device path: nothing needs the routing on the host now (exact routing, no
        scoring or recording, no EP), and the block has at most _core.DEVICE_ROWS_MAX
        token-expert rows. An expert in no ready slot is then read in place from the expert
        store, and the runtime learns the routing and the pre-gate's prediction one step behind,
        off this thread: the block never waits for the device."""
        return (self.device_path and self.policy in ("on-demand", "prefetch-all", "pregated")
                and self._routing_stays_on_device() and tokens * self.cfg.top_k <= _core.DEVICE_ROWS_MAX)

    def _routing_stays_on_device(self) -> bool:
        """Nothing of a block needs its routing on the host: exact routing, no pre-gate scoring,
        no recording, no expert parallelism (the resident and the device path)."""
        return self.routing == "exact" and not self.score_pregate and self.recorder is None and self.ep is None

    def _block(self, m: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0] if self.rows is None else len(self.rows)
        if self.on_device(tokens):
            return self._device_block(m, x, ids, weights)
        if self.resident(tokens):
            rows = self.rows
            xs, ids, weights = (x, ids, weights) if rows is None else (x[rows], ids[rows], weights[rows])
            out = run_experts_resident(
                xs.contiguous(), ids.to(torch.int32).contiguous(), weights.float().contiguous(), self.handle, m)
            self.taps.take_residual(m)
            return out if rows is None else torch.zeros_like(x).index_copy_(0, rows, out)
        n = self.cfg.num_moe_layers
        h = self.taps.take_residual(m)
        h = x if h is None else h.reshape(-1, h.shape[-1])
        rows = self.rows
        if rows is not None:
            full, x, ids, weights, h = x, x[rows], ids[rows], weights[rows], h[rows]
        if self.recorder is not None:
            logits = self.taps.router_logits[m]
            self.recorder(m, h, logits if rows is None else logits[rows], ids)
        predict = (m + 1 < n and self.stacks[m] == self.stacks[m + 1]  # not across encoder -> decoder
                   and (self.routing == "pregate" or self.policy in ("pregated", "hybrid") or self.score_pregate))
        pred = self.pregate.predict(m, h) if predict else None
        # One device -> host transfer (one synchronisation) for everything the host needs.
        ids, weights, pred = _to_host(ids, weights, pred)
        self._score(m, ids)  # the pre-gate is scored against the block's own router
        if self.routing == "pregate" and self.pending[m] is not None:
            ids, weights = self.pending[m]
        self.pending[m] = None
        nxt = None
        if pred is not None:
            self.predicted[m + 1] = pred[0]
            if self.routing == "pregate":
                self.pending[m + 1] = pred
            if self.policy in ("pregated", "hybrid"):
                nxt = torch.unique(pred[0]).to(torch.int32)
                nxt = nxt[nxt < self.cfg.num_experts]  # some routers mark "no expert" past the last
        if m + 1 < n and self.stacks[m] == self.stacks[m + 1] and self.policy == "prefetch-all":
            nxt = torch.arange(self.cfg.num_experts, dtype=torch.int32)
        if self.ep is not None:  # this rank's experts; every rank's prefetch is of its own experts
            nxt = self.ep.local_experts(nxt)
            nxt = nxt if nxt is not None and len(nxt) else None

            def run_local(xr, local_ids):
                return run_experts(xr.contiguous(), local_ids[:, None], torch.ones(len(local_ids), 1),
                                   self.handle, m, m + 1 if nxt is not None else -1, nxt)

            out = self.ep.forward(m, x.contiguous(), ids, weights, run_local)
        else:
            out = run_experts(x.contiguous(), ids, weights, self.handle, m,
                              m + 1 if nxt is not None else -1, nxt)
        if rows is not None:
            out = torch.zeros_like(full).index_copy_(0, rows, out)
        return out

    def _device_block(self, m: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = self.cfg.num_moe_layers
        h = self.taps.take_residual(m)
        h = x if h is None else h.reshape(-1, h.shape[-1])
        rows = self.rows
        xs = x if rows is None else x[rows]
        if rows is not None:
            ids, weights, h = ids[rows], weights[rows], h[rows]
        chained = m + 1 < n and self.stacks[m] == self.stacks[m + 1]  # not across encoder -> decoder
        next_ids = None
        if chained and self.policy == "pregated":
            next_ids = self.pregate.predict(m, h)[0].to(torch.int32).reshape(-1)[:_core.DEVICE_NEXT_MAX].contiguous()
        elif chained and self.policy == "prefetch-all":
            self.runtime.prefetch(m + 1, self._all_experts)  # a constant: nothing to learn from the device
        out = run_experts_device(xs.contiguous(), ids.to(torch.int32).contiguous(), weights.float().contiguous(),
                                 self.handle, m, m + 1 if next_ids is not None else -1, next_ids)
        return out if rows is None else torch.zeros_like(x).index_copy_(0, rows, out)

    def _score(self, m: int, ids: torch.Tensor) -> None:
        pred = self.predicted[m]
        if pred is not None:  # scored only where a prediction was made
            predicted, routed = set(pred.flatten().tolist()), set(ids.flatten().tolist())
            self.routed_count[m] += len(routed)
            self.pred_hits[m] += len(predicted & routed)
            self.pred_count[m] += len(predicted)
            self.token_hits[m] += int(token_hits(pred, ids).sum())
            self.token_pred[m] += pred.numel()
            self.token_routed[m] += ids.numel()
            self.predicted[m] = None

    def prediction_stats(self, layers: list[dict] | None = None) -> list[dict]:
        """Per block: precision and recall of the pre-gate's predictions (`layers`: the
        runtime's per-layer statistics when the caller has them)."""
        counts = self._prefetch_counts(layers)
        return [self._precision_recall(slice(m, m + 1), counts) for m in range(self.cfg.num_moe_layers)]

    def prediction_totals(self, layers: list[dict] | None = None) -> dict:
        """Precision and recall over every block."""
        return self._precision_recall(slice(None), self._prefetch_counts(layers))

    def _prefetch_counts(self, layers: list[dict] | None) -> tuple[list[int], list[int], list[int]]:
        """Per block: predicted experts that were routed, experts predicted, experts routed where
        a prediction was made; scored here on the planned path and by the runtime, one step
        behind, on the device path."""
        layers = self.runtime.stats()["layers"] if layers is None else layers
        return ([a + s["predicted_routed"] for a, s in zip(self.pred_hits, layers)],
                [a + s["predicted_experts"] for a, s in zip(self.pred_count, layers)],
                [a + s["routed_after_prediction"] for a, s in zip(self.routed_count, layers)])

    def _precision_recall(self, blocks: slice, counts: tuple[list[int], list[int], list[int]]) -> dict:
        """prefetch_*: the set of experts predicted for a block call against the set it routed
        (what a prefetch gets right). pregate_*: each token's predicted experts against its own
        routed experts, averaged over tokens (what routing by pre-gate gets right; the measure
        of `pregated calibrate`). None where no prediction was made."""
        def ratio(a, b):
            return sum(a[blocks]) / sum(b[blocks]) if sum(b[blocks]) else None

        hits, predicted, routed = counts
        return {"prefetch_precision": ratio(hits, predicted),
                "prefetch_recall": ratio(hits, routed),
                "pregate_precision": ratio(self.token_hits, self.token_pred),
                "pregate_recall": ratio(self.token_hits, self.token_routed)}


def token_hits(pred_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """[N, K'] predicted and [N, K] routed experts -> [N] experts of each token predicted right."""
    return (pred_ids[:, :, None] == true_ids[:, None, :]).any(-1).sum(-1)


def _to_host(ids: torch.Tensor, weights: torch.Tensor, pred):
    """(ids [T, K], weights [T, K], optional (ids, weights) prediction) -> the same on the CPU,
    moved as one float32 block (expert ids are exact in float32)."""
    parts = [ids.float(), weights.float()] + ([pred[0].float(), pred[1].float()] if pred is not None else [])
    host = torch.cat(parts, dim=1).cpu()
    K = ids.shape[1]
    out_ids, out_w = host[:, :K].long(), host[:, K:2 * K]
    out_pred = None
    if pred is not None:
        out_pred = (host[:, 2 * K:3 * K].long(), host[:, 3 * K:])
    return out_ids, out_w, out_pred
