"""The decode step of the resident path (policy gpu-only: every expert pinned, exact routing) as
one CUDA graph per batch size and cache length.

A `GraphStep` holds transformers' StaticCache (keys and values at fixed addresses; each layer
keeps its write position in a device tensor and advances it itself) and fixed input buffers: the
tokens [B, 1], their positions [B, 1] and the 2-D attention mask [B, N]. One step is the model's
own forward over those buffers (the experts through the runtime's resident op, whose experts are
found through the device slot table) and `positions += 1`: nothing in it reads the host or asks
the host anything, so it is captured once and replayed per token. The caller writes the sampled
tokens in and reads the logits out: the one synchronisation of a step is reading the token.

The mask holds ones past the prompt: the causal mask keeps a row from the cache slots not written
yet, so nothing in it changes while decoding. Prefill runs eagerly into the same cache. Before a
capture the runtime's resident workspace is reserved for the prefill's rows (where the prefill
takes the resident path; quantized experts' prefill does not), so that neither the prefill nor a
step allocates; a later, larger block grows it at a new address, and the graph is captured again
before it is replayed (`stats()["resident_workspace_bytes"]`). A capture's first replay is
compared with the same step run eagerly; a capture that fails or differs raises CaptureFailed,
and the engine then decodes eagerly.

Used where the policy allows it and where a check agrees: the engine's own decode against this
one (experts stubbed) for two padded sequences, and every layer of the static cache a plain
`StaticLayer` (sliding-window and state-space layers keep host-side counters a replay would not
advance). On the CPU the same step runs eagerly (`capture=False`): that is how CPU tests check it.

B = batch, L = prompt tokens (left-padded), N = cache length, K = experts per token, V = vocabulary.
"""

from __future__ import annotations

import os

import torch

from .experts import stubbed_experts

CACHE_ROUND = 256  # cache lengths are rounded up to a multiple of this: one graph serves many requests
KEPT_GRAPHS = 2    # graph steps (each with its cache) an engine keeps: the most recently used


class CaptureFailed(RuntimeError):
    """The step could not be captured as a CUDA graph (something in it synchronises or allocates)."""


def graph_step_wanted() -> bool:
    """PREGATED_GRAPH_STEP: 1 (default) decodes through the graph step where it applies, 0 never."""
    value = os.environ.get("PREGATED_GRAPH_STEP", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PREGATED_GRAPH_STEP={value!r}: give 1 (decode through CUDA graphs where the policy "
                         "allows) or 0 (never)")
    return value == "1"


def cache_length(tokens: int, limit: int | None) -> int:
    """The cache length for sequences of up to `tokens` tokens: rounded up to CACHE_ROUND, within
    the model's `limit` (its max_position_embeddings) where that is larger."""
    rounded = -(-tokens // CACHE_ROUND) * CACHE_ROUND
    return max(tokens, min(rounded, limit)) if limit else rounded


def plain_static_layers(cache) -> bool:
    """Every layer of `cache` a plain StaticLayer (its state all in device tensors)."""
    from transformers.cache_utils import StaticLayer

    return bool(cache.layers) and all(type(layer) is StaticLayer for layer in cache.layers)


class GraphStep:
    """The static cache and buffers of one decode step for `batch` sequences of up to `length`
    tokens. `forward(tokens, mask, positions, cache, active)` is the engine's forward, returning
    (logits [B, 1, V], cache); `top_k` the experts per token and `resident(tokens)` whether a
    block of that many tokens takes the resident path (the workspace's rows)."""

    def __init__(self, forward, config, runtime, top_k: int, batch: int, length: int, device: str, capture: bool,
                 resident=lambda tokens: True):
        from transformers.cache_utils import StaticCache

        self.forward, self.runtime, self.top_k, self.resident = forward, runtime, top_k, resident
        self.batch, self.length, self.device, self.capture = batch, length, device, capture
        self.cache = StaticCache(config=config, max_cache_len=length)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, length, dtype=torch.long, device=device)
        # the host's tokens cross in pinned memory, without a synchronisation (CUDA only)
        self.staging = torch.empty(batch, 1, dtype=torch.long, pin_memory=True) if device.startswith("cuda") else None
        self.logits: torch.Tensor | None = None  # [B, V] float32 of the last step (the graph's output)
        self.logits_dtype = torch.float32  # the model's logits before the cast (the check's tolerance)
        self.graph = None
        self.workspace = -1  # the runtime's resident workspace (bytes) the graph was captured with

    def _step(self) -> None:
        logits, _ = self.forward(self.tokens, self.mask, self.positions, self.cache, None)  # every row
        self.logits_dtype = logits.dtype
        self.logits = logits[:, -1].float()
        self.positions.add_(1)

    def _reset(self) -> None:
        self.cache.reset()
        self.positions.zero_()
        self.mask.fill_(1)

    def _capture(self) -> None:
        """One eager step on the current stream (the cache's lazy tensors are made on the stream
        that uses them), two on a side stream (as torch asks before a capture: allocations,
        cuBLAS's setup), then the capture; the cache and buffers are reset after. Only this
        thread's calls are checked during the capture: the runtime's copy thread may go on."""
        self.graph = None
        self._step()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        self.graph = graph
        self._reset()

    def _check_replay(self) -> None:
        """The graph's first replay against the same step run eagerly, both from the reset state
        (a step of token 0 at position 0): a capture that recorded something other than the step
        fails here, before any user's tokens go through it."""
        from .cpu_fused import _tolerance

        self._reset()
        self._step()
        want = self.logits.clone()
        self._reset()
        self.graph.replay()
        got = self.logits
        self._reset()
        tol = _tolerance(self.logits_dtype)
        if got is None or got.shape != want.shape or not torch.allclose(
                got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-6)):
            raise RuntimeError("the graph's replay differs from the step run eagerly")

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] on the device; valid [B, L] bool (False: left padding) and positions
        [B, L] on the host (Engine._padded) -> the logits of each row's last token [B, V] float32;
        the cache then holds the prompts."""
        B, L = tokens.shape
        if B != self.batch or L >= self.length:
            raise ValueError(f"graph step for {self.batch} sequences of up to {self.length} tokens got a prefill "
                             f"of {B} x {L}")
        # the prefill's rows where it takes the resident path too (quantized experts: decode only)
        workspace = self.runtime.reserve_resident((B * L if self.resident(B * L) else B) * self.top_k)
        if self.capture:
            if self.graph is None or workspace != self.workspace:
                self._reset()
                try:
                    self._capture()
                    self._check_replay()
                except Exception as e:
                    self.graph = None
                    raise CaptureFailed(f"{type(e).__name__}: {e}") from e
                self.workspace = self.runtime.stats()["resident_workspace_bytes"]
        self._reset()
        self.mask[:, :L].copy_(valid)
        logits, _ = self.forward(tokens, self.mask, positions.to(self.device), self.cache, valid)
        self.positions.copy_(positions[:, -1:] + 1)
        return logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (each row's new token, on any device) -> the logits of the next one [B, V]
        float32, a buffer the next step overwrites. Tokens from the host go through pinned
        memory: the copy does not wait for the device (the caller has read the last step's
        output, so the staging buffer's previous copy is done)."""
        tokens = tokens.view(self.batch, 1)
        if self.staging is not None and tokens.device.type == "cpu":
            self.staging.copy_(tokens)
            tokens = self.staging
        self.tokens.copy_(tokens, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits


def graph_step_agrees(engine) -> bool:
    """The graph step's decode (run eagerly, experts stubbed) against the engine's own: two
    sequences, one left-padded, a prefill and three steps; the logits of every step."""
    from .cpu_fused import _tolerance

    vocab = engine.cfg.vocab_size
    prompts = [[t % vocab for t in (5, 6, 7, 8)], [t % vocab for t in (9, 10, 11)]]
    try:
        with stubbed_experts(engine.blocks), torch.inference_mode():
            cache, mask, last_pos, want = engine._prefill(prompts)
            step = GraphStep(engine._forward, engine.model.config, engine.runtime, engine.cfg.top_k, len(prompts),
                             cache_length(8, None), engine.device, capture=False)
            if not plain_static_layers(step.cache):
                return False
            tokens, valid, positions = engine._padded(prompts)
            got = step.prefill(tokens.to(engine.device), valid, positions)
            active = torch.ones(len(prompts), 1, dtype=torch.bool)
            tol = _tolerance(engine.dtype)
            for n in range(4):
                if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
                    return False
                if n == 3:
                    break
                nxt = torch.tensor([(20 + n) % vocab, (30 + n) % vocab])
                mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
                last_pos = last_pos + 1
                out, cache = engine._forward(nxt[:, None].to(engine.device), mask, last_pos[:, None], cache, active)
                want = out[:, -1].float()
                got = step.step(nxt.to(engine.device)).clone()
    except Exception:  # a model whose forward does not take a static cache
        return False
    finally:
        engine.taps.residual[:] = [None] * len(engine.taps.residual)  # what the check's forwards recorded
    return True
