"""Hooks on transformers' decoder layers: block m's residual stream for the pre-gate, and (while
calibrating) block m's router logits.

The residual stream of block m is the input of the norm whose output feeds the MoE block (for
most families `post_attention_layernorm`). Which norm that is, is found on the first forward:
the norm whose output tensor *is* the MoE block's input. Families that feed the MoE block the
residual stream itself (post-norm layers) have no such norm; their stream is the block's input.

T = tokens, H = hidden, E = experts per layer.
"""

from __future__ import annotations

import torch


def _norm_children(decoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in decoder.named_children() if "norm" in n.lower() or "norm" in type(m).__name__.lower()}


class BlockTaps:
    def __init__(self, blocks):
        self.blocks = blocks
        self.residual: list[torch.Tensor | None] = [None] * len(blocks)   # [..., H] per block
        self.router_logits: list[torch.Tensor | None] = [None] * len(blocks)  # [T, E] while recording
        self.router_rank: list[int] = [2] * len(blocks)  # the rank of the input each block gives its router
        self.norm_name: str | None = None   # the decoder layer's norm that feeds the MoE block
        self.found = False                  # norm_name is known (None = the block takes the stream)
        self._handles: list = []
        self._norm_handles: dict[str, list] = {}  # by norm name: removed once the feeding norm is known
        self._router_handles: list = []
        self._rank_handles: list = []
        self._seen: dict[int, dict[str, tuple]] = {}
        for m, b in enumerate(blocks):
            for name, norm in _norm_children(b.decoder).items():
                self._norm_handles.setdefault(name, []).append(norm.register_forward_hook(self._norm_hook(m, name)))
            self._handles.append(b.block.register_forward_pre_hook(self._block_hook(m)))
            self._rank_handles.append(b.router.register_forward_pre_hook(self._rank_hook(m)))
        # the hooks that record the residual stream (fixed from here on; removing one only makes
        # its id absent from its module): a caller that runs a decoder layer without them sets
        # `residual[m]` itself
        self.recording_hooks = frozenset(h.id for h in self._handles + sum(self._norm_handles.values(), []))

    def _norm_hook(self, m: int, name: str):
        def hook(module, args, output):
            if self.found:
                if name == self.norm_name:
                    self.residual[m] = args[0]
            else:
                self._seen.setdefault(m, {})[name] = (args[0], output)
        return hook

    def _block_hook(self, m: int):
        def hook(module, args):
            x = args[0] if args else None
            if not self.found:
                seen = self._seen.pop(m, {})
                self.norm_name = next((n for n, (_, out) in seen.items() if out is x), None)
                self.found = True
                self._seen.clear()
                for name, handles in self._norm_handles.items():  # only the feeding norm's hooks stay
                    if name != self.norm_name:
                        for h in handles:
                            h.remove()
                if self.norm_name is not None:
                    self.residual[m] = seen[self.norm_name][0]
            if self.norm_name is None:
                self.residual[m] = x
        return hook

    def _rank_hook(self, m: int):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):  # the first block's call holds for every block
                self.router_rank = [args[0].dim()] * len(self.blocks)
                for h in self._rank_handles:
                    h.remove()
                self._rank_handles = []
        return hook

    def norm(self, m: int) -> torch.nn.Module | None:
        """Block m's norm in front of its MoE block (None: the block takes the stream as is)."""
        if not self.found:
            raise RuntimeError("the pre-gate ran before the first MoE block was seen")
        return None if self.norm_name is None else getattr(self.blocks[m].decoder, self.norm_name)

    def take_residual(self, m: int) -> torch.Tensor | None:
        """Block m's residual stream [..., H] from this forward (then forgotten)."""
        h, self.residual[m] = self.residual[m], None
        return h

    # --- router logits, for calibration ----------------------------------------------------------

    def record_router_logits(self, on: bool) -> None:
        for h in self._router_handles:
            h.remove()
        self._router_handles = []
        if on:
            for m, b in enumerate(self.blocks):
                self._router_handles.append(b.router.register_forward_hook(self._router_hook(m)))

    def _router_hook(self, m: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            self.router_logits[m] = logits.reshape(-1, logits.shape[-1])
        return hook

    def close(self) -> None:
        for h in self._handles + self._router_handles + self._rank_handles + sum(self._norm_handles.values(), []):
            h.remove()
        self._handles, self._router_handles, self._rank_handles, self._norm_handles = [], [], [], {}
