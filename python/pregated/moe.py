"""MoE blocks through the runtime: routing, the offloading policy and the pre-gate.

T = tokens routed, H = hidden, E = experts per layer, K = experts per token.

Policies (how experts reach the compute):
  gpu-only      every expert has a slot; after the first pass nothing moves
  on-demand     experts are loaded after routing, when a block needs them
  prefetch-all  while block i computes, every expert of block i+1 is queued
  pregated      while block i computes, the experts the pre-gate predicts for block i+1 are queued
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _core

POLICIES = ("gpu-only", "on-demand", "prefetch-all", "pregated")


def route(gate: torch.nn.Linear, x: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] -> ids [T, K] (int64), weights [T, K] float32, as transformers routes."""
    logits = F.linear(x, gate.weight)                       # [T, E] in the model dtype
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.router_weights_in_dtype:
        weights = weights.to(x.dtype)
    return ids, weights.float()


def resolve_policy(policy: str | None, expert_memory, cfg) -> tuple[str, int]:
    """Checks the policy and the budget; returns (policy, expert memory in bytes)."""
    one = cfg.expert_bytes()
    total = one * cfg.num_experts * cfg.num_moe_layers
    if expert_memory is None:
        budget = total
    elif isinstance(expert_memory, str):
        budget = _core.parse_bytes(expert_memory)
    elif isinstance(expert_memory, int) and not isinstance(expert_memory, bool) and expert_memory >= 0:
        budget = expert_memory
    else:
        raise ValueError(f"expert_memory must be bytes (int) or a string like '8GiB', got {expert_memory!r}")
    if policy is None:  # the fastest correct choice for the budget
        policy = "gpu-only" if budget >= total else "pregated"
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    if policy == "gpu-only":
        if budget < total:
            raise ValueError(
                f"policy 'gpu-only' keeps all {cfg.num_experts * cfg.num_moe_layers} experts on the "
                f"device: it needs expert_memory >= {total} bytes ({_core.format_bytes(total)}), got "
                f"{budget} bytes; lower the policy to 'pregated' or 'on-demand'")
        return policy, total
    # One token's experts for one block; the prefetching policies also hold the next block's.
    slots = cfg.top_k if policy == "on-demand" else 2 * cfg.top_k
    minimum = min(total, slots * one)
    if budget < minimum:
        raise ValueError(
            f"expert_memory of {budget} bytes ({_core.format_bytes(budget)}) is below the minimum "
            f"for policy '{policy}': {minimum} bytes ({_core.format_bytes(minimum)}), room for "
            f"{slots} experts of {one} bytes (experts per token = {cfg.top_k})")
    return policy, min(budget, total)


class MoEExecutor:
    """Runs MoE block m for the engine and issues the prefetch for block m + 1."""

    def __init__(self, runtime, model, cfg, policy: str):
        self.runtime = runtime
        self.cfg = cfg
        self.policy = policy
        layers = model.model.layers
        self.blocks = [layers[i].mlp for i in cfg.moe_layers]
        # The norm that block m + 1's router input goes through: the speculative pre-gate
        # applies it, and that router, to block m's hidden state.
        self.next_norms = [layers[i].post_attention_layernorm for i in cfg.moe_layers]
        n = cfg.num_moe_layers
        self.predicted: list[set[int] | None] = [None] * n
        self.pred_hits = [0] * n
        self.pred_count = [0] * n
        self.routed_count = [0] * n

    def predict_next(self, m: int, h: torch.Tensor) -> list[int] | None:
        """Experts to prefetch for block m + 1 given block m's residual stream h: [T, H]."""
        if m + 1 >= len(self.blocks) or self.policy in ("gpu-only", "on-demand"):
            return None
        if self.policy == "prefetch-all":
            return list(range(self.cfg.num_experts))
        x = self.next_norms[m + 1](h)
        ids, _ = route(self.blocks[m + 1].gate, x, self.cfg)
        return torch.unique(ids).tolist()

    def __call__(self, m: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x: [T, H] normed input of block m; h: [T, H] residual stream -> [T, H]."""
        block = self.blocks[m]
        ids, weights = route(block.gate, x, self.cfg)
        ids_cpu = ids.cpu()
        self._score(m, ids_cpu)
        nxt = self.predict_next(m, h)
        if nxt is not None and self.policy == "pregated":
            self.predicted[m + 1] = set(nxt)
        out = self.runtime.forward(m, x.contiguous(), ids_cpu, weights,
                                   next_layer=m + 1 if nxt else -1, next_experts=nxt)
        shared = block.shared(x)
        return out if shared is None else out + shared

    def _score(self, m: int, ids_cpu: torch.Tensor) -> None:
        pred = self.predicted[m]
        if pred is not None:  # scored only where a prediction was made
            routed = set(ids_cpu.flatten().tolist())
            self.routed_count[m] += len(routed)
            self.pred_hits[m] += len(pred & routed)
            self.pred_count[m] += len(pred)
            self.predicted[m] = None

    def prediction_stats(self) -> list[dict]:
        out = []
        for m in range(len(self.blocks)):
            scored = self.pred_count[m] > 0
            out.append({
                "prefetch_precision": self.pred_hits[m] / self.pred_count[m] if scored else None,
                "prefetch_recall": self.pred_hits[m] / self.routed_count[m] if scored else None,
            })
        return out

    def reset(self) -> None:
        n = len(self.blocks)
        self.predicted = [None] * n
        self.pred_hits, self.pred_count, self.routed_count = [0] * n, [0] * n, [0] * n
